"""The workflow checker's widget count: a workflow may leave out trailing optional widgets (the
frontend fills in their defaults), so one file suits a ComfyUI from before and after a node gained
one. The case that prompted it: ComfyUI 0.29's `CreateVideo` added an optional `bit_depth` widget."""

from __future__ import annotations

import pytest
from comfy_fakes import import_nodes


def _checker():
    import_nodes()
    from qvgen_nodes import workflow_check

    return workflow_check


def _create_video(with_bit_depth: bool) -> dict:
    """`/object_info["CreateVideo"]` as ComfyUI 0.3.64 (without) and 0.29 (with `bit_depth`) serve it."""
    optional = {"audio": ["AUDIO", {"tooltip": "The audio to add to the video."}]}
    if with_bit_depth:
        optional["bit_depth"] = ["INT", {"default": 8, "min": 8, "max": 10, "step": 2}]
    return {
        "input": {"required": {"images": ["IMAGE", {}], "fps": ["FLOAT", {"default": 30.0}]}, "optional": optional},
        "input_order": {"required": ["images", "fps"], "optional": list(optional)},
        "output": ["VIDEO"],
    }


def _sampler() -> dict:
    """A node whose optional widget is followed by nothing, and a seed with its extra control value."""
    return {
        "input": {
            "required": {"seed": ["INT", {"control_after_generate": True}], "steps": ["INT", {}]},
            "optional": {"denoise": ["FLOAT", {"default": 1.0}]},
        },
        "input_order": {"required": ["seed", "steps"], "optional": ["denoise"]},
        "output": ["LATENT"],
    }


SOURCE = {"input": {}, "output": ["IMAGE"]}  # feeds CreateVideo's required `images`


def _workflow(node_type: str, values: list) -> dict:
    node = {"id": 1, "type": node_type, "inputs": [], "outputs": [], "widgets_values": values}
    nodes, links = [node], []
    if node_type == "CreateVideo":
        node["inputs"] = [{"name": "images", "type": "IMAGE", "link": 1}]
        nodes.append({"id": 2, "type": "Source", "inputs": [], "outputs": [{"type": "IMAGE", "links": [1]}]})
        links.append([1, 2, 0, 1, 0, "IMAGE"])
    return {"nodes": nodes, "links": links}


@pytest.mark.parametrize("with_bit_depth", [False, True])
def test_a_workflow_without_the_new_optional_widget_suits_both_versions(with_bit_depth):
    check = _checker()
    defs = check.defs_from_object_info({"CreateVideo": _create_video(with_bit_depth), "Source": SOURCE})
    assert check.check_workflow(_workflow("CreateVideo", [16]), defs) == []
    saved_on_029 = check.check_workflow(_workflow("CreateVideo", [16, 10]), defs)
    assert (saved_on_029 == []) == with_bit_depth, saved_on_029  # 0.3.64 has no widget for the 10
    assert check.check_workflow(_workflow("CreateVideo", []), defs)  # fps is required


def test_only_trailing_optional_widgets_may_be_left_out():
    check = _checker()
    defs = check.defs_from_object_info({"KSamplerLike": _sampler()})
    assert list(defs["KSamplerLike"].widget_counts()) == [3, 4]  # seed, control, steps (, denoise)
    assert check.check_workflow(_workflow("KSamplerLike", [1, "fixed", 20]), defs) == []
    assert check.check_workflow(_workflow("KSamplerLike", [1, "fixed", 20, 0.5]), defs) == []
    errors = check.check_workflow(_workflow("KSamplerLike", [1, 20]), defs)
    assert errors and "expected 3 to 4" in errors[0], errors


def test_qvgen_specs_allow_leaving_out_their_optional_widgets():
    check = _checker()
    loader = check.defs_from_specs()["QVGenLoader"]
    n_optional = sum(i.optional and i.is_widget for i in check.NODE_SPECS["QVGenLoader"].inputs)
    assert n_optional and loader.optional_tail == n_optional
    assert loader.widget_counts()[0] == len(loader.widgets) - n_optional
