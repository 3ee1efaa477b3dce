"""QVGen's ComfyUI nodes. The repository root's `__init__.py` is ComfyUI's entry point and only
re-exports what this package defines.

- `node_loader.py`, `node_quantize.py`: the nodes (ComfyUI's V3 schema), thin;
- `loader.py`, `quantize.py`, `download.py`: what they do, testable without ComfyUI;
- `ops.py`: the custom operations class handed to ComfyUI's model loader (the only seam into
  ComfyUI's models);
- `host.py`: every call into ComfyUI, in one place.

Each node module is imported on its own: one that fails (say, a missing optional dependency) is
logged and drops that node, not the pack. Nothing here imports Triton or needs a GPU.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging

from ._bootstrap import ensure_qvgen

log = logging.getLogger("qvgen")

NODE_MODULES = ("node_loader", "node_quantize")
MIN_COMFYUI = "0.3.48"


def has_v3_api() -> bool:
    """Whether this ComfyUI has the V3 node API (`comfy_api.latest`)."""
    try:
        return importlib.util.find_spec("comfy_api.latest") is not None
    except (ImportError, ValueError):
        return False


def in_comfyui() -> bool:
    """Whether ComfyUI's own modules are importable (they are when ComfyUI loads the pack)."""
    try:
        return importlib.util.find_spec("folder_paths") is not None and importlib.util.find_spec("comfy") is not None
    except (ImportError, ValueError):
        return False


def load_nodes() -> list[type]:
    """The node classes that import cleanly (failures are logged, one node at a time)."""
    ensure_qvgen()
    nodes: list[type] = []
    for name in NODE_MODULES:
        try:
            module = importlib.import_module(f".{name}", __name__)
            nodes.extend(module.NODES)
        except Exception as e:
            log.warning("QVGen: the nodes of %s could not be loaded and are skipped: %s", name, e, exc_info=True)
    return nodes


async def comfy_entrypoint():
    """ComfyUI's V3 entry point: the extension listing QVGen's nodes."""
    from comfy_api.latest import ComfyExtension

    class QVGenExtension(ComfyExtension):
        async def get_node_list(self) -> list[type]:
            return load_nodes()

    return QVGenExtension()


__all__ = ["MIN_COMFYUI", "NODE_MODULES", "comfy_entrypoint", "has_v3_api", "in_comfyui", "load_nodes"]
