"""Print the CORE_NODES table of tests/test_workflows.py from a ComfyUI's node definitions.

    python scripts/comfyui_core_nodes.py http://127.0.0.1:8188    # or a saved /object_info JSON file

Covers the core node types the committed workflows use (plus a few that tests use), in the form
`qvgen_nodes.workflow_check.NodeDef` takes. Paste the output over the table in the test file.
"""

from __future__ import annotations

import importlib.util
import json
import pprint
import sys
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EXTRA = {"LoraLoaderModelOnly", "SaveLatent", "SaveAnimatedWEBP", "EmptyHunyuanLatentVideo"}


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    src = sys.argv[1]
    if src.startswith("http"):
        with urllib.request.urlopen(src.rstrip("/") + "/object_info", timeout=60) as r:
            info = json.loads(r.read())
    else:
        info = json.loads(Path(src).read_text())
    folder = REPO / "qvgen_nodes"
    spec = importlib.util.spec_from_file_location(
        "qvgen_nodes", folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["qvgen_nodes"] = module
    spec.loader.exec_module(module)
    from qvgen_nodes import workflow_check as wc

    defs = wc.defs_from_object_info(info)
    used = set(EXTRA)
    for path in (REPO / "workflows").glob("*.json"):
        used |= {n["type"] for n in json.loads(path.read_text())["nodes"]}
    core = {}
    for t in sorted(used):
        if t in wc.UI_ONLY or t.startswith("QVGen") or t not in defs:
            continue
        d = defs[t]
        core[t] = {
            "inputs": d.inputs,
            "required": sorted(d.required),
            "widgets": d.widgets,
            "extra": d.extra_widget_values,
            "outputs": d.outputs,
        }
    print("CORE_NODES = " + pprint.pformat(core, width=115, sort_dicts=False))


if __name__ == "__main__":
    main()
