"""ComfyUI entry point: this repository is also a ComfyUI node pack (clone it into custom_nodes/).

The nodes live in `qvgen_nodes/`. ComfyUI imports this file as a package; pytest and plain
Python may import it too, so it must import without ComfyUI (and without torch). On a ComfyUI
without the V3 node API the pack registers nothing and says why, instead of failing start-up.

The package name is the importer's choice: ComfyUI names it after the folder's path, Python's
own import after the folder, which users choose when they clone (`QVGen`, `ComfyUI-QVGen`, or
`qvgen`, as a `git clone` or the registry names it). Under the library's own names the pack
renames itself first, so `qvgen` and `qvgen_kernels` always mean the library (see
`qvgen_nodes/_bootstrap.py`).
"""

if __name__ in ("qvgen", "qvgen_kernels"):  # folder named like the library: free the name
    import sys as _sys

    _sys.modules[f"qvgen_pack_{__name__}"] = _sys.modules.pop(__name__)
    __name__ = __package__ = __spec__.name = f"qvgen_pack_{__name__}"

if __package__:  # imported as a package, the way ComfyUI loads custom nodes
    import logging as _logging

    from .qvgen_nodes import MIN_COMFYUI as _MIN
    from .qvgen_nodes import has_v3_api as _has_v3
    from .qvgen_nodes import in_comfyui as _in_comfyui

    if _has_v3() or not _in_comfyui():
        from .qvgen_nodes import comfy_entrypoint  # noqa: F401
    else:
        NODE_CLASS_MAPPINGS: dict = {}
        _logging.getLogger("qvgen").warning(
            "QVGen: this ComfyUI has no V3 node API (comfy_api.latest); update ComfyUI to %s or newer "
            "to get the QVGen nodes.",
            _MIN,
        )
