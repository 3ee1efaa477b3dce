"""What a demo figure depends on besides its command: versions, CPU, threads (recorded in metrics.json).

Float results move with the torch build and the CPU's vector units (summation order), so a figure
is only reproducible together with this record.
"""

from __future__ import annotations

import platform
from importlib import metadata
from pathlib import Path
from typing import Any

import torch


def cpu_model() -> str:
    """The CPU's marketing name (Linux `/proc/cpuinfo`), else what `platform` knows."""
    info = Path("/proc/cpuinfo")
    if info.is_file():
        for line in info.read_text(errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def environment(argv: list[str]) -> dict[str, Any]:
    return {
        "argv": list(argv),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "qvgen": _version("qvgen"),
        "diffusers": _version("diffusers"),
        "numpy": _version("numpy"),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "torch_threads": torch.get_num_threads(),
    }
