"""The package's imports follow the pipeline: a stage never imports a higher one, and no module imports
itself through a cycle. Imports inside functions count (a lazy import is still a dependency); imports
under ``if TYPE_CHECKING:`` do not (they never run)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "avdiag"

# Lower numbers sit lower in the pipeline; a module may import its own level or lower ones.
LEVELS = {
    "avdiag._version": 0, "avdiag.errors": 0, "avdiag.results": 0, "avdiag.progress": 0, "avdiag.findings": 0,
    "avdiag.load": 1,
    "avdiag.data": 2, "avdiag.models": 2,
    "avdiag.locate": 3,
    "avdiag.measure": 4,
    "avdiag.rewrite": 5,
    "avdiag.report": 6,
    "avdiag.workflows": 7, "avdiag.monitor": 7,
    "avdiag.cli": 8, "avdiag.__main__": 8, "avdiag": 9,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def stage(module: str) -> str:
    """The LEVELS key ``module`` belongs to (its longest listed prefix)."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        key = ".".join(parts[:n])
        if key in LEVELS:
            return key
    raise AssertionError(f"{module} belongs to no stage: add it to LEVELS")


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                skip.update(id(n) for n in ast.walk(child))
    return skip


def imports_of(module: str) -> set[str]:
    """The avdiag modules ``module`` imports (``from pkg import submodule`` names the submodule)."""
    path = MODULES[module]
    return imports_in(path.read_text(encoding="utf-8"), module, is_package=path.name == "__init__.py")


def imports_in(source: str, module: str, is_package: bool = False) -> set[str]:
    """The avdiag modules that ``source`` (the text of ``module``) imports, lazy ones included."""
    tree = ast.parse(source)
    skip = _type_checking_nodes(tree)
    package = module if is_package else module.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "avdiag")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "avdiag":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in MODULES else base)
    out.discard(module)
    return {m for m in out if m in MODULES}


GRAPH = {m: imports_of(m) for m in MODULES}


def test_every_module_belongs_to_a_stage():
    for m in MODULES:
        stage(m)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_upward_import(module):
    here = LEVELS[stage(module)]
    upward = sorted(m for m in GRAPH[module] if LEVELS[stage(m)] > here)
    assert not upward, f"{module} (level {here}) imports higher stages: {upward}"


def test_no_import_cycle():
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for m in sorted(GRAPH):
        if m not in index:
            visit(m)
    assert not cycles, f"import cycles: {cycles}"


def test_the_checker_sees_lazy_relative_and_submodule_imports():
    source = ("from typing import TYPE_CHECKING\n"
              "from . import static\n"
              "from ..workflows import inspect\n"
              "if TYPE_CHECKING:\n    from avdiag.cli import app\n"
              "def f():\n    from avdiag.report.plots import write_conflict_plots\n    import avdiag.rewrite.abri\n")
    found = imports_in(source, "avdiag.measure.probe")
    assert found == {"avdiag.measure.static", "avdiag.workflows.inspect", "avdiag.report.plots", "avdiag.rewrite.abri"}
    upward = {m for m in found if LEVELS[stage(m)] > LEVELS[stage("avdiag.measure.probe")]}
    assert upward == {"avdiag.workflows.inspect", "avdiag.report.plots", "avdiag.rewrite.abri"}
