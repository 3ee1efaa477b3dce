"""Every workflow in workflows/ uses only node types that exist, with links that type-check.

Runs without ComfyUI: QVGen's own nodes are checked against `qvgen_nodes/schema.py`, ComfyUI's core
nodes against the definitions below (taken from ComfyUI 0.3.64's `/object_info`; refresh them with
`python scripts/comfyui_core_nodes.py`). With COMFYUI_PATH set, tests/test_comfyui_integration.py
checks the same files against a live ComfyUI's `/object_info`.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from comfy_fakes import import_nodes

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))

CORE_NODES = {
    "CLIPLoader": {
        "inputs": {"clip_name": "COMBO", "type": "COMBO", "device": "COMBO"},
        "required": ["clip_name", "type"],
        "widgets": ["clip_name", "type", "device"],
        "extra": 0,
        "outputs": ["CLIP"],
    },
    "CLIPTextEncode": {
        "inputs": {"text": "STRING", "clip": "CLIP"},
        "required": ["clip", "text"],
        "widgets": ["text"],
        "extra": 0,
        "outputs": ["CONDITIONING"],
    },
    "CreateVideo": {
        "inputs": {"images": "IMAGE", "fps": "FLOAT", "audio": "AUDIO"},
        "required": ["fps", "images"],
        "widgets": ["fps"],
        "extra": 0,
        "outputs": ["VIDEO"],
    },
    "EmptyHunyuanLatentVideo": {
        "inputs": {"width": "INT", "height": "INT", "length": "INT", "batch_size": "INT"},
        "required": ["batch_size", "height", "length", "width"],
        "widgets": ["width", "height", "length", "batch_size"],
        "extra": 0,
        "outputs": ["LATENT"],
    },
    "ImageStitch": {
        "inputs": {
            "image1": "IMAGE",
            "direction": "COMBO",
            "match_image_size": "BOOLEAN",
            "spacing_width": "INT",
            "spacing_color": "COMBO",
            "image2": "IMAGE",
        },
        "required": ["direction", "image1", "match_image_size", "spacing_color", "spacing_width"],
        "widgets": ["direction", "match_image_size", "spacing_width", "spacing_color"],
        "extra": 0,
        "outputs": ["IMAGE"],
    },
    "KSampler": {
        "inputs": {
            "model": "MODEL",
            "seed": "INT",
            "steps": "INT",
            "cfg": "FLOAT",
            "sampler_name": "COMBO",
            "scheduler": "COMBO",
            "positive": "CONDITIONING",
            "negative": "CONDITIONING",
            "latent_image": "LATENT",
            "denoise": "FLOAT",
        },
        "required": [
            "cfg",
            "denoise",
            "latent_image",
            "model",
            "negative",
            "positive",
            "sampler_name",
            "scheduler",
            "seed",
            "steps",
        ],
        "widgets": ["seed", "steps", "cfg", "sampler_name", "scheduler", "denoise"],
        "extra": 1,
        "outputs": ["LATENT"],
    },
    "LoraLoaderModelOnly": {
        "inputs": {"model": "MODEL", "lora_name": "COMBO", "strength_model": "FLOAT"},
        "required": ["lora_name", "model", "strength_model"],
        "widgets": ["lora_name", "strength_model"],
        "extra": 0,
        "outputs": ["MODEL"],
    },
    "ModelSamplingSD3": {
        "inputs": {"model": "MODEL", "shift": "FLOAT"},
        "required": ["model", "shift"],
        "widgets": ["shift"],
        "extra": 0,
        "outputs": ["MODEL"],
    },
    "SaveAnimatedWEBP": {
        "inputs": {
            "images": "IMAGE",
            "filename_prefix": "STRING",
            "fps": "FLOAT",
            "lossless": "BOOLEAN",
            "quality": "INT",
            "method": "COMBO",
        },
        "required": ["filename_prefix", "fps", "images", "lossless", "method", "quality"],
        "widgets": ["filename_prefix", "fps", "lossless", "quality", "method"],
        "extra": 0,
        "outputs": [],
    },
    "SaveLatent": {
        "inputs": {"samples": "LATENT", "filename_prefix": "STRING"},
        "required": ["filename_prefix", "samples"],
        "widgets": ["filename_prefix"],
        "extra": 0,
        "outputs": [],
    },
    "SaveVideo": {
        "inputs": {"video": "VIDEO", "filename_prefix": "STRING", "format": "COMBO", "codec": "COMBO"},
        "required": ["codec", "filename_prefix", "format", "video"],
        "widgets": ["filename_prefix", "format", "codec"],
        "extra": 0,
        "outputs": [],
    },
    "UNETLoader": {
        "inputs": {"unet_name": "COMBO", "weight_dtype": "COMBO"},
        "required": ["unet_name", "weight_dtype"],
        "widgets": ["unet_name", "weight_dtype"],
        "extra": 0,
        "outputs": ["MODEL"],
    },
    "VAEDecode": {
        "inputs": {"samples": "LATENT", "vae": "VAE"},
        "required": ["samples", "vae"],
        "widgets": [],
        "extra": 0,
        "outputs": ["IMAGE"],
    },
    "VAELoader": {
        "inputs": {"vae_name": "COMBO"},
        "required": ["vae_name"],
        "widgets": ["vae_name"],
        "extra": 0,
        "outputs": ["VAE"],
    },
}


def _workflow_check():
    import_nodes()
    from qvgen_nodes import workflow_check

    return workflow_check


wc = _workflow_check()


def node_defs() -> dict:
    defs = wc.defs_from_specs()
    for name, d in CORE_NODES.items():
        defs[name] = wc.NodeDef(
            inputs=dict(d["inputs"]),
            required=set(d["required"]),
            widgets=list(d["widgets"]),
            extra_widget_values=d["extra"],
            outputs=list(d["outputs"]),
        )
    return defs


def test_there_are_workflows():
    names = {p.name for p in WORKFLOWS}
    assert {"wan2.1_t2v_1.3B_qvgen_w4a4.json", "wan2.1_t2v_1.3B_fp_vs_w4a4.json"} <= names


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_nodes_exist_and_links_type_check(path):
    wf = json.loads(path.read_text())
    assert wf.get("version") == 0.4 and wf["nodes"] and wf["links"]  # UI format (drag-and-drop)
    assert not wc.check_workflow(wf, node_defs())
    types = {n["type"] for n in wf["nodes"]}
    assert "QVGenLoader" in types
    assert {"KSampler", "ModelSamplingSD3", "CLIPTextEncode", "VAEDecode"} <= types
    for node in wf["nodes"]:
        if node["type"] == "QVGenLoader":  # the authors' Hub model, converted once by the loader: nothing to place
            assert node["widgets_values"][:2] == ["none (use repo_id)", "Harahan/QVGen-Wan-1_3B-W4A4"]


def test_fp_vs_w4a4_runs_every_branch_from_the_same_inputs():
    wf = json.loads((REPO / "workflows" / "wan2.1_t2v_1.3B_fp_vs_w4a4.json").read_text())
    samplers = [n for n in wf["nodes"] if n["type"] == "KSampler"]
    assert len(samplers) == 3 and len({json.dumps(n["widgets_values"]) for n in samplers}) == 1
    links = {link[0]: link for link in wf["links"]}
    for input_name in ("positive", "negative", "latent_image"):
        sources = {links[i["link"]][1] for n in samplers for i in n["inputs"] if i["name"] == input_name}
        assert len(sources) == 1, input_name


def test_checker_catches_broken_workflows():
    wf = json.loads(WORKFLOWS[0].read_text())
    defs = node_defs()
    bad = copy.deepcopy(wf)
    bad["nodes"][0]["type"] = "NoSuchNode"
    assert any("unknown node type" in e for e in wc.check_workflow(bad, defs))
    bad = copy.deepcopy(wf)
    bad["links"][0][5] = "LATENT" if bad["links"][0][5] != "LATENT" else "MODEL"
    assert any("carries" in e or "into" in e for e in wc.check_workflow(bad, defs))
    bad = copy.deepcopy(wf)
    ks = next(n for n in bad["nodes"] if n["type"] == "KSampler")
    ks["widgets_values"] = ks["widgets_values"][:-1]
    assert any("widget values" in e for e in wc.check_workflow(bad, defs))
    bad = copy.deepcopy(wf)
    ks = next(n for n in bad["nodes"] if n["type"] == "KSampler")
    model_in = next(i for i in ks["inputs"] if i["name"] == "model")
    bad["links"] = [link for link in bad["links"] if link[0] != model_in["link"]]
    model_in["link"] = None
    errors = wc.check_workflow(bad, defs)
    assert any("'model' (MODEL) is not connected" in e for e in errors)
