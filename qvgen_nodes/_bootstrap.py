"""Make the pack's own copy of the core library the `qvgen` its nodes import.

ComfyUI users clone the repository into `custom_nodes/` (any folder name) and install only
`requirements.txt`, so `qvgen/` sits next to this package but is not on `sys.path`; or they have
another qvgen installed (a release from PyPI, an editable install of another clone), possibly of
another version. The nodes are written against the library in *this* tree, so that is the one
loaded, under its own name, whatever is installed; `qvgen/kernels_import.py` does the same for the
kernels (`kernels/` as `qvgen_kernels`). The repository root is *not* added to `sys.path`: that
would expose `kernels/` as a top-level `kernels`, a name that belongs to Hugging Face's package.

If another copy of qvgen was imported into the process before the pack loaded (a second clone of
the pack, or a custom node importing an installed qvgen), it is not replaced under the feet of its
users: the nodes fail to load with an error naming both copies.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = ROOT / "qvgen"


def _folder(module: ModuleType) -> Path | None:
    file = getattr(module, "__file__", None)
    return Path(file).resolve().parent if file else None


def ensure_qvgen() -> ModuleType:
    """The pack's own `qvgen`, imported under that name if it is not already."""
    loaded = sys.modules.get("qvgen")
    if loaded is not None:
        if _folder(loaded) == LIBRARY:
            return loaded
        raise ImportError(
            f"QVGen: another qvgen ({getattr(loaded, '__file__', loaded)}, version "
            f"{getattr(loaded, '__version__', 'unknown')}) was imported before this node pack, which needs its "
            f"own copy ({LIBRARY}); remove the other copy from custom_nodes/ or whatever imports it first"
        )
    spec = importlib.util.spec_from_file_location(
        "qvgen", LIBRARY / "__init__.py", submodule_search_locations=[str(LIBRARY)]
    )
    if spec is None or spec.loader is None or not (LIBRARY / "__init__.py").is_file():
        raise ImportError(f"QVGen: the core library is missing from {LIBRARY}; reinstall the node pack")
    module = importlib.util.module_from_spec(spec)
    sys.modules["qvgen"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        for name in [n for n in sys.modules if n == "qvgen" or n.startswith("qvgen.")]:
            del sys.modules[name]
        raise
    return module
