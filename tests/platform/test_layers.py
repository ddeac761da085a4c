"""Imports only go down: ``dino_core`` never imports the platform, each platform module imports only
from its own layer or lower ones, and no two modules import each other (directly or through others)
except inside ``dino_core/ops``, where the kernel registration and its dispatcher are one unit.

Every import counts, at the top of a module or inside a function.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

import pytest
from support import REPO

ROOTS = {"dino_core": REPO / "dino_core", "dino_platform": REPO / "platform" / "dino_platform"}

# The platform's layers, lowest first; a top-level module or package of dino_platform belongs to one.
PLATFORM_LAYERS: List[Set[str]] = [
    {"__init__", "errors"},
    {"storage", "typed_config", "yaml_docs", "spec_cli", "drawing", "run_state"},
    {"ray_session", "tracking", "watchdog"},
    {"data"},
    {"registry"},
    {"model"},
    {"evaluation"},
    {"serving"},
    {"train"},
    {"pipeline"},
    {"sweep"},
    {"cli"},
]
CIRCLES_ALLOWED_UNDER = "dino_core.ops"


def _module_name(path: Path) -> str:
    for package, root in ROOTS.items():
        if root in path.parents:
            parts = [package, *path.relative_to(root).with_suffix("").parts]
            return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    raise ValueError(path)


def _modules() -> Dict[str, Path]:
    return {_module_name(path): path for root in ROOTS.values() for path in sorted(root.rglob("*.py"))}


def _imports(name: str, path: Path, known: Set[str]) -> Set[str]:
    """The project modules ``name`` imports: ``from package import submodule`` names the submodule,
    ``from module import attribute`` the module."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _graph() -> Dict[str, Set[str]]:
    modules = _modules()
    known = set(modules)
    graph = {name: _imports(name, path, known | {"dino_core._C"}) for name, path in modules.items()}
    graph["dino_core._C"] = set()  # the compiled kernels (csrc/), present once built
    return graph


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    for index, members in enumerate(PLATFORM_LAYERS):
        if top in members:
            return index
    raise AssertionError(f"{module}: not in any layer of tests/test_layers.py PLATFORM_LAYERS; add its "
                         "top-level module or package to the layer it belongs to")


def _circles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    circles: List[List[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    circles.append(sorted(component))
    return circles


GRAPH = _graph()


def test_dino_core_never_imports_the_platform():
    offenders = {name: sorted(t for t in targets if t.startswith("dino_platform"))
                 for name, targets in GRAPH.items() if name.startswith("dino_core")}
    assert not {name: targets for name, targets in offenders.items() if targets}


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if m.startswith("dino_platform.")))
def test_platform_module_imports_only_its_layer_or_lower(module):
    upward = sorted(target for target in GRAPH[module]
                    if target.startswith("dino_platform") and _layer(target) > _layer(module))
    assert not upward, f"{module} imports from a higher layer: {upward}"


def test_no_import_circles_outside_the_ops_registration():
    circles = [circle for circle in _circles(GRAPH)
               if not all(member.startswith(CIRCLES_ALLOWED_UNDER) for member in circle)]
    assert not circles


def test_the_checks_see_a_circle_and_an_upward_import():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _layer("dino_platform.train.loop") > _layer("dino_platform.data.streaming")
    assert "dino_platform.data.manifest" in GRAPH["dino_platform.data.streaming"]
