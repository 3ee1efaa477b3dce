"""Check a UI-format ComfyUI workflow against node definitions, without running ComfyUI.

Node definitions come from a running ComfyUI's `/object_info` (`defs_from_object_info`) or, for
QVGen's own nodes, from `schema.py` (`defs_from_specs`). `check_workflow` reports node types that
do not exist, links whose types do not match the sockets at either end, link tables that disagree
with the nodes, required inputs left unconnected, and widget value lists of the wrong length.
A list may leave out trailing *optional* widgets: the frontend gives them their defaults, which is
how a workflow saved on an older ComfyUI keeps loading after a node gains one (ComfyUI 0.29's
`CreateVideo` added `bit_depth`). Used by the tests on everything in `workflows/`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .schema import NODE_SPECS, NodeSpec

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
UI_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}


@dataclass
class NodeDef:
    inputs: dict[str, str] = field(default_factory=dict)  # name → type
    required: set[str] = field(default_factory=set)
    widgets: list[str] = field(default_factory=list)  # widget inputs in order
    extra_widget_values: int = 0  # e.g. the seed's "control after generate" value
    outputs: list[str] = field(default_factory=list)
    optional_tail: int = 0  # trailing widgets that are optional and may be left out (their defaults apply)

    def widget_counts(self) -> range:
        """How many widget values a saved workflow may hold for this node."""
        full = len(self.widgets) + self.extra_widget_values
        return range(full - self.optional_tail, full + 1)


def _optional_tail(flags: list[bool]) -> int:
    """The number of trailing True flags (widgets that may be omitted, in widget order)."""
    n = 0
    for omissible in reversed(flags):
        if not omissible:
            break
        n += 1
    return n


def _input_type(spec: Any) -> str:
    t = spec[0] if isinstance(spec, (list, tuple)) else spec
    return "COMBO" if isinstance(t, (list, tuple)) else str(t)


def defs_from_object_info(info: dict[str, Any]) -> dict[str, NodeDef]:
    out: dict[str, NodeDef] = {}
    for name, node in info.items():
        d = NodeDef(outputs=[str(o) if not isinstance(o, list) else "COMBO" for o in node.get("output", [])])
        order = node.get("input_order") or {}
        omissible: list[bool] = []
        for group in ("required", "optional"):
            entries = node.get("input", {}).get(group, {}) or {}
            names = order.get(group) or list(entries)
            for n in names:
                spec = entries[n]
                t = _input_type(spec)
                d.inputs[n] = t
                if group == "required":
                    d.required.add(n)
                if t in WIDGET_TYPES:
                    d.widgets.append(n)
                    opts = spec[1] if isinstance(spec, (list, tuple)) and len(spec) > 1 else {}
                    control = isinstance(opts, dict) and bool(opts.get("control_after_generate"))
                    d.extra_widget_values += control
                    omissible.append(group == "optional" and not control)
        d.optional_tail = _optional_tail(omissible)
        out[name] = d
    return out


def defs_from_specs(specs: dict[str, NodeSpec] | None = None) -> dict[str, NodeDef]:
    out: dict[str, NodeDef] = {}
    for node_id, spec in (specs or NODE_SPECS).items():
        d = NodeDef(outputs=[o.type for o in spec.outputs])
        for i in spec.inputs:
            d.inputs[i.name] = i.type
            if not i.optional:
                d.required.add(i.name)
            if i.is_widget:
                d.widgets.append(i.name)
        d.optional_tail = _optional_tail([i.optional for i in spec.inputs if i.is_widget])
        out[node_id] = d
    return out


def types_match(out_type: str, in_type: str) -> bool:
    if "*" in (out_type, in_type):
        return True
    return bool(set(out_type.split(",")) & set(in_type.split(",")))


def check_workflow(wf: dict[str, Any], defs: dict[str, NodeDef]) -> list[str]:
    """Problems found in a UI-format workflow (an empty list when it is consistent)."""
    errors: list[str] = []
    nodes = {n["id"]: n for n in wf.get("nodes", [])}
    links = {link[0]: link for link in wf.get("links", [])}
    for nid, node in nodes.items():
        t = node.get("type")
        where = f"node {nid} ({t})"
        if t in UI_ONLY:
            continue
        d = defs.get(t)
        if d is None:
            errors.append(f"{where}: unknown node type")
            continue
        linked = set()
        for slot, inp in enumerate(node.get("inputs") or []):
            name = inp.get("name")
            if name not in d.inputs:
                errors.append(f"{where}: input '{name}' does not exist")
                continue
            if inp.get("link") is not None:
                linked.add(name)
                link = links.get(inp["link"])
                if link is None:
                    errors.append(f"{where}: input '{name}' refers to missing link {inp['link']}")
                elif link[3] != nid or link[4] != slot:
                    errors.append(f"{where}: link {link[0]} targets node {link[3]} slot {link[4]}, not slot {slot}")
        for name in sorted(d.required - linked):
            if d.inputs[name] not in WIDGET_TYPES:
                errors.append(f"{where}: required input '{name}' ({d.inputs[name]}) is not connected")
        for slot, out in enumerate(node.get("outputs") or []):
            if slot >= len(d.outputs):
                errors.append(f"{where}: output slot {slot} does not exist")
            elif not types_match(d.outputs[slot], out.get("type", "*")):
                errors.append(f"{where}: output {slot} is {d.outputs[slot]}, workflow says {out.get('type')}")
        values = node.get("widgets_values")
        if isinstance(values, list):
            counts = d.widget_counts()
            if len(values) not in counts:
                expected = str(counts[-1]) if len(counts) == 1 else f"{counts[0]} to {counts[-1]}"
                errors.append(f"{where}: {len(values)} widget values, expected {expected} for {d.widgets}")
    for lid, link in links.items():
        _, src, src_slot, dst, dst_slot, ltype = link[:6]
        where = f"link {lid}"
        s, t = nodes.get(src), nodes.get(dst)
        if s is None or t is None:
            errors.append(f"{where}: connects missing node(s) {src} → {dst}")
            continue
        sd, td = defs.get(s["type"]), defs.get(t["type"])
        outs = s.get("outputs") or []
        if src_slot >= len(outs) or lid not in (outs[src_slot].get("links") or []):
            errors.append(f"{where}: not listed on output {src_slot} of node {src}")
        ins = t.get("inputs") or []
        if dst_slot >= len(ins) or ins[dst_slot].get("link") != lid:
            errors.append(f"{where}: not listed on input {dst_slot} of node {dst}")
            continue
        if sd is not None and src_slot < len(sd.outputs) and not types_match(sd.outputs[src_slot], ltype):
            errors.append(f"{where}: carries {ltype} but {s['type']} output {src_slot} is {sd.outputs[src_slot]}")
        name = ins[dst_slot].get("name")
        if td is not None and name in td.inputs and not types_match(ltype, td.inputs[name]):
            errors.append(f"{where}: {ltype} into {t['type']}.{name}, which takes {td.inputs[name]}")
    return errors
