"""The dependency rules of the code base (docs/architecture.md), read from the source.

Every import counts, also those inside functions: a lazy import is still a dependency. Rules:
- the core (the method and the QVGen format) imports no adapter, door, diffusers, accelerate or ComfyUI;
- the core reaches the kernels only through `qvgen.kernels_import`;
- `kernels/` imports nothing of `qvgen`;
- the ComfyUI nodes import neither the diffusers door nor training;
- the modules of `qvgen` form no import cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# not core: the adapters, the doors, the tools, and the modules that join core and adapters
NOT_CORE = ("adapters", "diffusers_backend", "train", "demo", "bench", "eval", "convert", "api.py", "hub.py")
THIRD_PARTY_DOORS = ("diffusers", "accelerate", "comfy", "comfy_kitchen", "comfy_api", "folder_paths", "nodes")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "kernels":
        parts[0] = "qvgen_kernels"
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the nodes under `if TYPE_CHECKING:` (imports for type hints only, never run)."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def _imports(path: Path, *, runtime_only: bool = False) -> set[str]:
    """Absolute names of every module `path` imports (relative imports resolved); with
    `runtime_only`, without the imports for type hints only."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    skip = _type_checking_nodes(tree) if runtime_only else set()
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)  # `from . import x` may import module x
    return out


def _files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def _core_files() -> list[Path]:
    return [p for p in _files("qvgen") if p.relative_to(ROOT / "qvgen").parts[0] not in NOT_CORE]


def _hits(imports: set[str], forbidden: tuple[str, ...]) -> list[str]:
    return sorted(i for i in imports if any(i == f or i.startswith(f + ".") for f in forbidden))


def test_rules_see_the_modules_they_govern():
    core = {_module_name(p) for p in _core_files()}
    assert {"qvgen.layers", "qvgen.checkpoint", "qvgen.schemes.convrot", "qvgen.surgery"} <= core
    assert not core & {"qvgen.api", "qvgen.adapters.comfy.native", "qvgen.train.cli"}
    # the parser sees lazy imports: the adapter's diffusers import sits inside a function
    assert "diffusers" in _imports(ROOT / "qvgen/adapters/diffusers_models.py")


@pytest.mark.parametrize("path", _core_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_core_imports_no_adapter_door_or_host(path):
    forbidden = ("qvgen.adapters", "qvgen.diffusers_backend", "qvgen.train", "qvgen.api", "qvgen_nodes")
    forbidden += THIRD_PARTY_DOORS
    if path.name == "__init__.py" and path.parent.name == "qvgen":  # the package's public face
        return
    assert _hits(_imports(path), forbidden) == []


@pytest.mark.parametrize("path", _core_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_core_reaches_kernels_through_one_seam(path):
    if path.name == "kernels_import.py":
        return
    assert _hits(_imports(path), ("qvgen_kernels", "kernels")) == []


def test_kernels_import_nothing_of_qvgen():
    bad = {str(p.relative_to(ROOT)): _hits(_imports(p), ("qvgen",)) for p in _files("kernels")}
    assert {k: v for k, v in bad.items() if v} == {}


def test_nodes_import_neither_the_diffusers_door_nor_training():
    files = _files("qvgen_nodes") + [ROOT / "__init__.py"]
    bad = {str(p.relative_to(ROOT)): _hits(_imports(p), ("qvgen.diffusers_backend", "qvgen.train")) for p in files}
    assert {k: v for k, v in bad.items() if v} == {}


def test_qvgen_has_no_import_cycle():
    modules = {_module_name(p): p for p in _files("qvgen")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for imp in _imports(path, runtime_only=True):
            while imp and imp not in modules:  # `from .x import f` → module qvgen.x
                imp = imp.rpartition(".")[0]
            if imp and imp != name and not name.startswith(imp + "."):  # a module's own package is not a cycle
                deps.add(imp)
        graph[name] = deps
    cycles = _cycles(graph)
    assert cycles == [], "import cycles: " + "; ".join(" → ".join(c) for c in cycles)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


@pytest.mark.parametrize("folder", ["qvgen", "kernels", "qvgen_nodes"])
def test_no_private_name_is_imported_across_modules(folder):
    bad = []
    for path in _files(folder):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("qvgen")):
                bad += [f"{path.relative_to(ROOT)}: {a.name}" for a in node.names if a.name.startswith("_")]
    assert bad == []
