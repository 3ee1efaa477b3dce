"""`schema.NodeSpec` → ComfyUI V3 `io.Schema` (the only module that knows ComfyUI's node API)."""

from __future__ import annotations

import dataclasses

from comfy_api.latest import io

from .schema import Input, NodeSpec

_TYPES = {"COMBO": io.Combo, "STRING": io.String, "BOOLEAN": io.Boolean, "INT": io.Int, "MODEL": io.Model}


def _input(i: Input):
    cls = _TYPES[i.type].Input
    kw = {"tooltip": i.tooltip, "optional": i.optional}
    if i.type == "COMBO":
        kw["options"] = i.option_list()
    if i.default is not None:
        kw["default"] = i.default
    return cls(i.name, **kw)


def schema(spec: NodeSpec) -> io.Schema:
    extra = {}
    if "search_aliases" in {f.name for f in dataclasses.fields(io.Schema)}:  # newer ComfyUI only
        extra["search_aliases"] = list(spec.search_aliases)
    return io.Schema(
        node_id=spec.node_id,
        display_name=spec.display_name,
        category=spec.category,
        description=spec.description,
        inputs=[_input(i) for i in spec.inputs],
        outputs=[_TYPES[o.type].Output(display_name=o.name, tooltip=o.tooltip) for o in spec.outputs],
        **extra,
    )
