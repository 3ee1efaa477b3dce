"""ComfyUI node "Load QVGen Model (Wan W4A4, 4-bit)": inputs in `schema.LOADER`, logic in `loader.py`."""

from __future__ import annotations

from comfy_api.latest import io

from . import loader, schema, v3


class QVGenLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return v3.schema(schema.LOADER)

    @classmethod
    def execute(cls, checkpoint, repo_id="", revision="", backend="auto", compute_dtype="default") -> io.NodeOutput:
        path = loader.locate(checkpoint, repo_id or "", revision or "")
        loaded = loader.load_model(path, backend=backend or "auto", compute_dtype=compute_dtype or "default")
        return io.NodeOutput(loaded.patcher)


NODES = [QVGenLoader]
