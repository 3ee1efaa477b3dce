"""Import point of the kernels package, whichever way QVGen was installed.

`kernels/` is installed as `qvgen_kernels` (pip install), but when the repository is used as a
ComfyUI node pack without installation, the directory sits next to `qvgen/` under its own name.
A top-level `kernels` import is never attempted: that name belongs to Hugging Face's package.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

try:
    import qvgen_kernels
except ImportError:  # source checkout used without `pip install`
    _dir = Path(__file__).resolve().parent.parent / "kernels"
    _spec = importlib.util.spec_from_file_location(
        "qvgen_kernels", _dir / "__init__.py", submodule_search_locations=[str(_dir)]
    )
    if _spec is None or _spec.loader is None:
        raise
    qvgen_kernels = importlib.util.module_from_spec(_spec)
    sys.modules["qvgen_kernels"] = qvgen_kernels
    _spec.loader.exec_module(qvgen_kernels)

__all__ = ["qvgen_kernels"]
