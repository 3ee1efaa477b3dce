"""The node pack loads from a plain copy of the repository, whatever its folder is called, and uses
its own copy of the library whatever qvgen is installed (issue 12, item 1).

Each case runs in a fresh interpreter with a clean `sys.path` (`python -I`; `-S` as well where no
installed qvgen is wanted, with site-packages appended by hand so that torch is there but not the
editable install of this checkout). The pack is a copy of the repository's tracked layout in a
temporary `custom_nodes/NAME/`, loaded the way ComfyUI loads custom nodes (`spec_from_file_location`
under the folder's path) or the way Python imports a folder on `sys.path` (under the folder's name).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACK_FILES = ("__init__.py", "pyproject.toml", "requirements.txt", "qvgen", "qvgen_nodes", "kernels")

# Another qvgen "installed" (another version, on sys.path ahead of everything): if the pack used it,
# the files reported below would be in this folder.
OTHER_QVGEN = {
    "qvgen/__init__.py": "__version__ = '9.9.9'\n",
    "qvgen_kernels/__init__.py": "__version__ = '9.9.9'\n",
}

# Loads the pack, lets it load its nodes (none register without ComfyUI: each node module fails on
# `comfy_api` alone), imports the module holding its layers and reports where everything came from.
PROBE = """
import importlib, importlib.util, json, logging, sys
logging.disable(logging.CRITICAL)
mode, folder, other, preload = sys.argv[1:5]
if other:
    sys.path.insert(0, other)
if preload:
    import qvgen
if mode == "comfyui":  # ComfyUI's load_custom_node (0.3.64 and 0.29): the module named after the path
    name = folder.replace(".", "_x_")
    spec = importlib.util.spec_from_file_location(name, folder + "/__init__.py")
    pack = importlib.util.module_from_spec(spec)
    sys.modules[name] = pack
    spec.loader.exec_module(pack)
else:  # plain Python: custom_nodes/ on sys.path, the module named after the folder
    parent, _, name = folder.rpartition("/")
    sys.path.insert(0, parent)
    pack = importlib.import_module(name)
nodes_pkg = importlib.import_module(pack.__name__ + ".qvgen_nodes")
try:
    nodes = nodes_pkg.load_nodes()
except ImportError as e:
    print(json.dumps({"error": str(e)}))
    raise SystemExit(0)
ops = importlib.import_module(pack.__name__ + ".qvgen_nodes.ops")
import qvgen, qvgen.quantizers, qvgen_kernels
print(json.dumps({
    "pack": pack.__name__,
    "entrypoint": callable(getattr(pack, "comfy_entrypoint", None)),
    "nodes": len(nodes),
    "qvgen": qvgen.__file__,
    "kernels": qvgen_kernels.__file__,
    "layers": sys.modules[ops.PackedLinear.__module__].__file__,
    "exact_div": sys.modules[qvgen.quantizers.exact_div.__module__].__file__,
}))
"""


def _copy_pack(dest: Path) -> Path:
    dest.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in PACK_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore)
        else:
            shutil.copy2(src, dest / name)
    return dest


@pytest.fixture(scope="module")
def other_qvgen(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("site_other")
    for rel, text in OTHER_QVGEN.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def _probe(folder: Path, mode: str, *, site: str, other: Path | None = None, preload: bool = False) -> dict:
    """Run PROBE in a fresh interpreter; `site` is "none" (no installed qvgen) or "venv" (this
    venv as it is, with the editable install of this checkout: another copy than `folder`)."""
    if site == "none":
        flags = ["-I", "-S"]
        code = f"import sys; sys.path.append({sysconfig.get_paths()['purelib']!r})\n" + PROBE
    else:
        flags, code = ["-I"], PROBE
    args = [mode, str(folder), str(other or ""), "1" if preload else ""]
    out = subprocess.run([sys.executable, *flags, "-c", code, *args], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _assert_own_copy(report: dict, folder: Path) -> None:
    assert "error" not in report, report
    assert report["entrypoint"] and report["nodes"] == 0  # no ComfyUI here
    own = folder.resolve()
    assert Path(report["qvgen"]).parent == own / "qvgen", report
    assert Path(report["kernels"]).parent == own / "kernels", report
    assert Path(report["layers"]).parent == own / "qvgen", report
    assert Path(report["exact_div"]).parent == own / "kernels", report


@pytest.mark.parametrize(
    "name,mode,site,other",
    [
        ("QVGen", "comfyui", "none", False),  # the documented clone, nothing installed
        ("qvgen", "comfyui", "none", True),  # the registry's folder name, another version installed
        ("ComfyUI-QVGen", "comfyui", "venv", False),  # pip install -e of another clone
        ("qvgen", "import", "venv", True),  # Python names the pack `qvgen`: it steps aside
    ],
)
def test_pack_uses_its_own_library(tmp_path, other_qvgen, name, mode, site, other):
    folder = _copy_pack(tmp_path / "custom_nodes" / name)
    report = _probe(folder, mode, site=site, other=other_qvgen if other else None)
    _assert_own_copy(report, folder)
    if mode == "import":
        assert report["pack"] == "qvgen_pack_qvgen"  # `import qvgen` now finds the library, not the pack


def test_another_qvgen_already_imported_is_not_replaced(tmp_path, other_qvgen):
    folder = _copy_pack(tmp_path / "custom_nodes" / "QVGen")
    report = _probe(folder, "comfyui", site="none", other=other_qvgen, preload=True)
    assert "9.9.9" in report["error"] and str(other_qvgen) in report["error"], report
    assert str(folder.resolve() / "qvgen") in report["error"], report
