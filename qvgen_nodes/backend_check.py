"""Whether the kernel backend a node asks for can run here, with advice that fits a node pack.

`qvgen_kernels.resolve_backend` knows the rules; its messages are written for a `pip install`ed
library. A ComfyUI user installed a cloned folder into ComfyUI's own Python, so the advice names
that interpreter and the package to add there.
"""

from __future__ import annotations

import sys

from qvgen.kernels_import import qvgen_kernels

from . import host
from .schema import BACKENDS


class BackendError(RuntimeError):
    """The chosen kernel backend cannot run in this ComfyUI (the message says what to do)."""


def triton_advice() -> str:
    return (
        "the 'triton' backend needs the triton package in the Python that runs ComfyUI: "
        f"`{sys.executable} -m pip install triton` (Linux with an NVIDIA GPU; on Windows the package is "
        "`triton-windows`), then restart ComfyUI. Or choose backend 'auto', which uses the PyTorch int8 path "
        "when Triton is missing."
    )


def check_backend(backend: str) -> str:
    """The concrete backend for ComfyUI's compute device, or `BackendError` saying what to do."""
    if backend not in BACKENDS:
        raise BackendError(f"backend {backend!r}: expected one of {BACKENDS}")
    device = host.torch_device()
    if backend == "triton" and not qvgen_kernels.backend.triton_importable():
        raise BackendError(triton_advice())
    try:
        return qvgen_kernels.resolve_backend(backend, device)
    except (RuntimeError, ValueError) as e:
        raise BackendError(
            f"kernel backend {backend!r} cannot run on ComfyUI's device {device}: {e}; choose 'auto' or 'cpu'"
        ) from None
