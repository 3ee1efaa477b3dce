"""Make the core library importable as `qvgen` when the pack is used straight from a clone.

ComfyUI users clone the repository into `custom_nodes/` and install `requirements.txt`, which does
not install the repository itself. Then `qvgen/` sits next to this package but is not on
`sys.path`. It is loaded from its folder under its own name, the way `qvgen/kernels_import.py`
loads `kernels/` as `qvgen_kernels`; the repository root is *not* added to `sys.path` (that would
expose `kernels/` as a top-level `kernels`, a name that belongs to Hugging Face's package).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def ensure_qvgen() -> None:
    if "qvgen" in sys.modules or importlib.util.find_spec("qvgen") is not None:
        return
    folder = ROOT / "qvgen"
    spec = importlib.util.spec_from_file_location(
        "qvgen", folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    if spec is None or spec.loader is None:
        raise ImportError(f"QVGen: the core library is missing from {folder}; reinstall the node pack")
    module = importlib.util.module_from_spec(spec)
    sys.modules["qvgen"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["qvgen"]
        raise
