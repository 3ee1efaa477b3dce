"""ComfyUI entry point: this repository is also a ComfyUI node pack (clone it into custom_nodes/).

The nodes live in `qvgen_nodes/`. ComfyUI imports this file as a package; pytest and plain
Python may import it too, so it must import without ComfyUI. On a ComfyUI without the V3 node
API the pack registers nothing and says why, instead of failing ComfyUI's start-up.
"""

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
