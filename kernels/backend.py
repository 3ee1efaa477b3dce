"""Which implementation runs: argument, then the `QVGEN_KERNEL_BACKEND` environment variable, then auto."""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

ENV_VAR = "QVGEN_KERNEL_BACKEND"
BACKENDS = ("auto", "triton", "cpu", "torch")


@functools.cache
def triton_importable() -> bool:
    """Triton is an optional dependency (`pip install qvgen[triton]`); never imported just to check."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # blocked (sys.modules["triton"] = None) or broken install
        return False


def triton_interpreting() -> bool:
    """`TRITON_INTERPRET=1` lets the Triton kernels run on CPU tensors (slowly; for tests)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def available_backends() -> list[str]:
    """Backends usable in this process: torch and cpu always; triton with triton and a CUDA device."""
    out = ["torch", "cpu"]
    if triton_importable() and (torch.cuda.is_available() or triton_interpreting()):
        out.append("triton")
    return out


def _validate(value: str, where: str) -> str:
    v = value.strip().lower()
    if v not in BACKENDS:
        raise ValueError(f"unknown kernel backend {value!r} in {where}; allowed values: {', '.join(BACKENDS)}")
    return v


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """The concrete backend ("triton", "cpu" or "torch") for tensors on `device`.

    An explicit `backend` other than "auto" wins; with "auto" the environment variable
    `QVGEN_KERNEL_BACKEND` is consulted; if that is unset or "auto": triton on CUDA when triton
    is importable, otherwise "cpu" (the fast pure-PyTorch path, which also runs on any device).
    """
    device = torch.device(device)
    choice = _validate(backend, "the backend argument")
    if choice == "auto":
        env = os.environ.get(ENV_VAR, "").strip()
        if env:
            choice = _validate(env, f"the environment variable {ENV_VAR}")
    if choice == "auto":
        return "triton" if device.type == "cuda" and triton_importable() else "cpu"
    if choice == "triton":
        if not triton_importable():
            raise RuntimeError("the triton backend needs the `triton` package: pip install 'qvgen[triton]'")
        if device.type != "cuda" and not triton_interpreting():
            raise RuntimeError(
                f"the triton backend runs on CUDA tensors, got a tensor on {device} "
                "(set TRITON_INTERPRET=1 to run the kernels in Triton's CPU interpreter)"
            )
    return choice
