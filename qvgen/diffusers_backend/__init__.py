"""The diffusers door: `quant_method: "qvgen"` in `from_pretrained` and `save_pretrained`.

    import qvgen                      # the one extra line
    from diffusers import WanTransformer3DModel, WanPipeline
    transformer = WanTransformer3DModel.from_pretrained("org/wan-w4a4", subfolder="transformer")

- `config.py`: `QVGenQuantizationConfig`, the diffusers `quantization_config` class;
- `quantizer.py`: `QVGenQuantizer`, the `DiffusersQuantizer` diffusers dispatches to.

Registration (this file) is the only place QVGen touches diffusers' internals. diffusers has no
plugin API for quantizers: it looks `quant_method` up in two dicts of `diffusers.quantizers.auto`
(`AUTO_QUANTIZER_MAPPING`, `AUTO_QUANTIZATION_CONFIG_MAPPING`). `register()` adds "qvgen" to both.
`import qvgen` runs `install()` (qvgen/__init__.py): when that diffusers module is already imported it registers at
once; otherwise a one-shot import hook registers the moment diffusers imports it. So `import qvgen`
never imports diffusers itself (that costs seconds) and works where diffusers is not installed.
A registration failure (an incompatible diffusers) is a warning, never a broken diffusers import.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings
from typing import Any

from ..config import QUANT_METHOD

AUTO_MODULE = "diffusers.quantizers.auto"

__all__ = ["QVGenQuantizationConfig", "QVGenQuantizer", "install", "is_registered", "register"]


def register() -> None:
    """Add "qvgen" to diffusers' quantizer mappings (imports diffusers). Idempotent."""
    from diffusers.quantizers import auto

    from .config import QVGenQuantizationConfig
    from .quantizer import QVGenQuantizer

    auto.AUTO_QUANTIZER_MAPPING[QUANT_METHOD] = QVGenQuantizer
    auto.AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] = QVGenQuantizationConfig


def is_registered() -> bool:
    """Whether diffusers (if imported) dispatches "qvgen" to QVGen. Does not import diffusers."""
    auto = sys.modules.get(AUTO_MODULE)
    return auto is not None and QUANT_METHOD in getattr(auto, "AUTO_QUANTIZER_MAPPING", {})


def _register_or_warn() -> None:
    try:
        register()
    except Exception as e:  # an incompatible diffusers must not break `import diffusers`
        warnings.warn(f"QVGen could not register its diffusers quantizer: {e!r}", RuntimeWarning, stacklevel=2)


class _RegisteringLoader(importlib.abc.Loader):
    """Wraps the loader of `diffusers.quantizers.auto`: runs it, then registers."""

    def __init__(self, inner: importlib.abc.Loader) -> None:
        self._inner = inner

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module) -> None:
        self._inner.exec_module(module)
        _register_or_warn()

    def __getattr__(self, name: str) -> Any:  # get_source, get_code, is_package, …
        return getattr(self._inner, name)


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """One-shot finder: hands out the real spec of `diffusers.quantizers.auto` with a wrapped loader."""

    def find_spec(self, fullname, path, target=None):
        if fullname != AUTO_MODULE:
            return None
        uninstall()
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisteringLoader(spec.loader)
        return spec


_finder: _RegisterOnImport | None = None


def install() -> None:
    """Register now if diffusers' quantizers are loaded, else as soon as diffusers loads them."""
    global _finder
    if AUTO_MODULE in sys.modules:
        _register_or_warn()
    elif _finder is None:
        _finder = _RegisterOnImport()
        sys.meta_path.insert(0, _finder)


def uninstall() -> None:
    """Remove the import hook (registration already done stays)."""
    global _finder
    if _finder is not None and _finder in sys.meta_path:
        sys.meta_path.remove(_finder)
    _finder = None


def __getattr__(name: str) -> Any:
    if name == "QVGenQuantizationConfig":
        from .config import QVGenQuantizationConfig

        return QVGenQuantizationConfig
    if name == "QVGenQuantizer":
        from .quantizer import QVGenQuantizer

        return QVGenQuantizer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
