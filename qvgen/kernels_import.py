"""Import point of the kernels package, whichever way QVGen was installed.

`kernels/` is installed as `qvgen_kernels` (pip install). In a source tree (a clone used as a
ComfyUI node pack, or an editable install) the kernels are the `kernels/` folder beside this
package, and that copy is used under the name `qvgen_kernels` even when another `qvgen_kernels` is
installed: the library and its kernels always come from the same tree. Every module of the library
imports the kernels through here. A top-level `kernels` import is never attempted: that name
belongs to Hugging Face's package.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

_TREE = Path(__file__).resolve().parent.parent
_SOURCE = _TREE / "kernels"


def _in_source_tree() -> bool:
    """A checkout has `pyproject.toml` beside `kernels/`; an installed qvgen (site-packages) has neither."""
    return (_TREE / "pyproject.toml").is_file() and (_SOURCE / "__init__.py").is_file()


def _load() -> ModuleType:
    if not _in_source_tree():
        import qvgen_kernels

        return qvgen_kernels
    loaded = sys.modules.get("qvgen_kernels")
    if loaded is not None:
        if Path(loaded.__file__ or "").resolve().parent == _SOURCE:
            return loaded
        raise ImportError(
            f"qvgen_kernels from {loaded.__file__} is already imported, but the qvgen in {_TREE} needs its own "
            f"kernels ({_SOURCE}): two copies of QVGen are in use in one process"
        )
    spec = importlib.util.spec_from_file_location(
        "qvgen_kernels", _SOURCE / "__init__.py", submodule_search_locations=[str(_SOURCE)]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["qvgen_kernels"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        for name in [n for n in sys.modules if n == "qvgen_kernels" or n.startswith("qvgen_kernels.")]:
            del sys.modules[name]
        raise
    return module


qvgen_kernels = _load()

__all__ = ["qvgen_kernels"]
