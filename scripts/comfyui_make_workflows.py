"""Write the UI-format workflows in workflows/ (run after changing a node's inputs).

    python scripts/comfyui_make_workflows.py --object-info object_info.json   # a dump of GET /object_info

Socket order and widget lists come from the node definitions (ComfyUI's `/object_info` for core
nodes, `qvgen_nodes/schema.py` for QVGen's), so the files load by drag-and-drop and pass
`tests/test_workflows.py`. The graphs are the standard Wan 2.1 text-to-video graph
(ComfyUI's example: UMT5 text encoder, 832×480×33 frames, ModelSamplingSD3 shift 8, 30 uni_pc
steps at CFG 6) with the diffusion model loader swapped.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}

PROMPT = (
    "A red fox trotting through fresh snow in a sunlit pine forest, snow falling from the branches, "
    "tracking shot, cinematic lighting, highly detailed"
)
NEGATIVE = (
    "oversaturated, overexposed, static, blurry details, subtitles, watermark, text, painting, still image, "
    "grey tint, worst quality, low quality, JPEG artifacts, ugly, deformed, extra fingers, bad hands, bad face, "
    "malformed limbs, fused fingers, cluttered background, three legs, crowd in the background, walking backwards"
)
QVGEN_REPO = "Harahan/QVGen-Wan-1_3B-W4A4"  # the paper authors' W4A4 model, converted once by the loader
NO_LOCAL = "none (use repo_id)"
FP_CKPT = "wan2.1_t2v_1.3B_fp16.safetensors"
TEXT_ENCODER = "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
VAE = "wan_2.1_vae.safetensors"
SEED = 42


def _load_nodes_module(name: str):
    folder = REPO / "qvgen_nodes"
    if "qvgen_nodes" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "qvgen_nodes", folder / "__init__.py", submodule_search_locations=[str(folder)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["qvgen_nodes"] = module
        spec.loader.exec_module(module)
    return importlib.import_module(f"qvgen_nodes.{name}")


class Graph:
    """A UI-format workflow under construction (format version 0.4)."""

    def __init__(self, defs: dict) -> None:
        self.defs, self.nodes, self.links, self.groups = defs, [], [], []

    def node(self, type_: str, pos, widgets=(), title: str | None = None, size=(320, 120)) -> int:
        d = self.defs[type_]
        nid = len(self.nodes) + 1
        sockets = [n for n in d["order"] if d["inputs"][n] not in WIDGET_TYPES]
        node = {
            "id": nid,
            "type": type_,
            "pos": list(pos),
            "size": list(size),
            "flags": {},
            "order": nid - 1,
            "mode": 0,
            "inputs": [{"name": n, "type": d["inputs"][n], "link": None} for n in sockets],
            "outputs": [{"name": t, "type": t, "links": [], "slot_index": i} for i, t in enumerate(d["outputs"])],
            "properties": {"Node name for S&R": type_},
            "widgets_values": list(widgets),
        }
        if title:
            node["title"] = title
        self.nodes.append(node)
        return nid

    def note(self, pos, text: str, size=(420, 200), title: str = "Note") -> int:
        nid = len(self.nodes) + 1
        self.nodes.append(
            {
                "id": nid,
                "type": "MarkdownNote",
                "pos": list(pos),
                "size": list(size),
                "flags": {},
                "order": nid - 1,
                "mode": 0,
                "inputs": [],
                "outputs": [],
                "title": title,
                "properties": {},
                "widgets_values": [text],
                "color": "#432",
                "bgcolor": "#653",
            }
        )
        return nid

    def link(self, src: int, src_slot: int, dst: int, input_name: str) -> None:
        lid = len(self.links) + 1
        s, t = self.nodes[src - 1], self.nodes[dst - 1]
        slot = next(i for i, inp in enumerate(t["inputs"]) if inp["name"] == input_name)
        ltype = s["outputs"][src_slot]["type"]
        s["outputs"][src_slot]["links"].append(lid)
        t["inputs"][slot]["link"] = lid
        self.links.append([lid, src, src_slot, dst, slot, ltype])

    def group(self, title: str, box, color: str = "#3f789e") -> None:
        self.groups.append({"title": title, "bounding": list(box), "color": color, "font_size": 24, "flags": {}})

    def to_json(self) -> dict:
        return {
            "last_node_id": len(self.nodes),
            "last_link_id": len(self.links),
            "nodes": self.nodes,
            "links": self.links,
            "groups": self.groups,
            "config": {},
            "extra": {"ds": {"scale": 0.75, "offset": [40, 40]}},
            "version": 0.4,
        }


def node_defs(object_info: dict) -> dict:
    schema = _load_nodes_module("schema")
    defs = {}
    for name, node in object_info.items():
        order = node.get("input_order", {})
        names = list(order.get("required", [])) + list(order.get("optional", []))
        inputs = {}
        for group in ("required", "optional"):
            for n, spec in (node.get("input", {}).get(group) or {}).items():
                t = spec[0] if isinstance(spec, list) else spec
                inputs[n] = "COMBO" if isinstance(t, list) else t
        defs[name] = {"order": names, "inputs": inputs, "outputs": list(node.get("output", []))}
    for spec in schema.NODE_SPECS.values():
        defs[spec.node_id] = {
            "order": [i.name for i in spec.inputs],
            "inputs": {i.name: i.type for i in spec.inputs},
            "outputs": [o.type for o in spec.outputs],
        }
    return defs


def _text_and_latent(g: Graph, x0: int) -> tuple[int, int, int, int]:
    clip = g.node("CLIPLoader", (x0, 80), [TEXT_ENCODER, "wan", "default"], size=(380, 110))
    pos = g.node("CLIPTextEncode", (x0, 240), [PROMPT], title="Positive prompt", size=(420, 180))
    neg = g.node("CLIPTextEncode", (x0, 460), [NEGATIVE], title="Negative prompt", size=(420, 180))
    g.link(clip, 0, pos, "clip")
    g.link(clip, 0, neg, "clip")
    lat = g.node("EmptyHunyuanLatentVideo", (x0, 680), [832, 480, 33, 1], size=(320, 150))
    vae = g.node("VAELoader", (x0, 870), [VAE], size=(320, 60))
    return pos, neg, lat, vae


def _sample(g: Graph, model: int, pos: int, neg: int, lat: int, vae: int, x: int, y: int, prefix: str, label: str):
    ms = g.node("ModelSamplingSD3", (x, y), [8.0], size=(300, 60))
    g.link(model, 0, ms, "model")
    ks = g.node("KSampler", (x, y + 110), [SEED, "fixed", 30, 6.0, "uni_pc", "simple", 1.0], size=(300, 270))
    g.link(ms, 0, ks, "model")
    g.link(pos, 0, ks, "positive")
    g.link(neg, 0, ks, "negative")
    g.link(lat, 0, ks, "latent_image")
    dec = g.node("VAEDecode", (x, y + 420), [], size=(220, 50))
    g.link(ks, 0, dec, "samples")
    g.link(vae, 0, dec, "vae")
    vid = g.node("CreateVideo", (x, y + 510), [16], size=(220, 80))
    g.link(dec, 0, vid, "images")
    save = g.node("SaveVideo", (x + 330, y), [prefix, "auto", "auto"], title=f"Save video ({label})", size=(480, 420))
    g.link(vid, 0, save, "video")
    return dec


def t2v_w4a4(defs: dict) -> dict:
    g = Graph(defs)
    pos, neg, lat, vae = _text_and_latent(g, 40)
    model = g.node("QVGenLoader", (520, 80), [NO_LOCAL, QVGEN_REPO, "", "auto", "default"], size=(380, 180))
    _sample(g, model, pos, neg, lat, vae, 520, 300, "video/wan2.1_qvgen_w4a4", "W4A4")
    g.note(
        (1260, 760),
        "## Wan 2.1 T2V 1.3B, QVGen W4A4\n"
        "The standard Wan 2.1 text-to-video graph with **Load QVGen Model** in place of *Load Diffusion Model*.\n\n"
        f"- `repo_id` is prefilled with the paper authors' W4A4 Wan 2.1 1.3B (`{QVGEN_REPO}`): the first run "
        "downloads it into `models/diffusion_models/qvgen/` with a progress bar and converts it once to QVGen's "
        "packed format; later runs use that file, offline too. To use another QVGen checkpoint, clear `repo_id` "
        "and pick the file in `checkpoint`.\n"
        f"- Text encoder `{TEXT_ENCODER}` in `models/text_encoders/`, VAE `{VAE}` in `models/vae/` "
        "(the files ComfyUI's own Wan example uses).\n"
        "- LoRA loaders, other samplers and schedulers plug in as usual.",
        size=(520, 260),
    )
    return g.to_json()


def fp_vs_w4a4(defs: dict) -> dict:
    g = Graph(defs)
    pos, neg, lat, vae = _text_and_latent(g, 40)
    fp = g.node("UNETLoader", (520, 80), [FP_CKPT, "default"], title="Full precision (fp16)", size=(380, 90))
    q = g.node("QVGenLoader", (1380, 80), [NO_LOCAL, QVGEN_REPO, "", "auto", "default"], size=(380, 180))
    rtn = g.node("QVGenQuantize", (2240, 80), ["4", "4", "", False, "auto"], size=(380, 200))
    g.link(fp, 0, rtn, "model")
    d_fp = _sample(g, fp, pos, neg, lat, vae, 520, 300, "video/wan2.1_fp16", "full precision")
    d_q = _sample(g, q, pos, neg, lat, vae, 1380, 300, "video/wan2.1_qvgen_w4a4", "QVGen W4A4")
    d_r = _sample(g, rtn, pos, neg, lat, vae, 2240, 300, "video/wan2.1_rtn_w4a4", "RTN W4A4")
    st1 = g.node("ImageStitch", (520, 960), ["right", True, 8, "white"], size=(300, 150))
    g.link(d_fp, 0, st1, "image1")
    g.link(d_q, 0, st1, "image2")
    st2 = g.node("ImageStitch", (860, 960), ["right", True, 8, "white"], size=(300, 150))
    g.link(st1, 0, st2, "image1")
    g.link(d_r, 0, st2, "image2")
    vid = g.node("CreateVideo", (1200, 960), [16], size=(220, 80))
    g.link(st2, 0, vid, "images")
    save = g.node("SaveVideo", (1460, 960), ["video/wan2.1_fp_vs_w4a4", "auto", "auto"], size=(900, 420))
    g.nodes[save - 1]["title"] = "Side by side: full precision | QVGen W4A4 | RTN W4A4"
    g.link(vid, 0, save, "video")
    g.group("Full precision", (500, 0, 840, 940))
    g.group("QVGen W4A4 (trained)", (1360, 0, 840, 940), color="#8A8")
    g.group("RTN W4A4 (no training, preview)", (2220, 0, 840, 940), color="#a1309b")
    g.note(
        (40, 1010),
        "## Full precision vs W4A4\n"
        "Same prompt, seed and sampler for three diffusion models: the fp16 model, the QVGen-trained W4A4 model, "
        "and a round-to-nearest W4A4 copy of the fp16 model (**QVGen Quantize**), which shows what 4-bit "
        "inference does without QVGen's training. The last video puts the three next to each other.\n\n"
        "ComfyUI keeps one model on the GPU at a time and swaps between branches. Bypass a group (Ctrl+B) to "
        "skip a branch.",
        size=(440, 330),
    )
    return g.to_json()


WORKFLOWS = {
    "wan2.1_t2v_1.3B_qvgen_w4a4.json": t2v_w4a4,
    "wan2.1_t2v_1.3B_fp_vs_w4a4.json": fp_vs_w4a4,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--object-info", required=True, type=Path, help="JSON dump of a ComfyUI's GET /object_info")
    ap.add_argument("--out", type=Path, default=REPO / "workflows")
    args = ap.parse_args()
    defs = node_defs(json.loads(args.object_info.read_text()))
    args.out.mkdir(parents=True, exist_ok=True)
    for name, build in WORKFLOWS.items():
        (args.out / name).write_text(json.dumps(build(defs), indent=1) + "\n")
        print(f"wrote {args.out / name}")


if __name__ == "__main__":
    main()
