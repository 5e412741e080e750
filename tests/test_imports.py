"""The package layout keeps the pipeline's shape: stages import each other's faces, one way.

Every import statement in workbench/ (at module level or inside a function) is read with
`ast`, resolved to the module that defines the imported name, and checked: no module
imports itself back through others, stages depend on each other without a circle, a stage
reaches another stage only through its face (`workbench/STAGE/__init__.py`'s EXPORTS), and
the UI never touches torch, transformers or safetensors.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "workbench"
HEAVY = ("torch", "transformers", "safetensors")
# What may sit at the top of workbench/ beside the stage packages: entry points and small
# cross-cutting modules. A new module belongs in a stage; adding one here is a decision.
ENTRY_POINTS = ("workbench", "workbench.__main__")
TOP_LEVEL = {"__init__", "__main__", "errors", "progress", "device", "staging", "spaces_compat", "faces",
             "timings"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
STAGES = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file() and p.name != "ui")


@cache
def exports(package: str) -> dict[str, str]:
    """A face's EXPORTS table, read from its source: name -> defining module, in full."""
    tree = ast.parse(MODULES[package].read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "EXPORTS" for t in node.targets):
            return {name: f"{package}.{mod}" for name, mod in ast.literal_eval(node.value).items()}
    return {}


def stage_of(module: str) -> str:
    """'gates' for workbench.gates and workbench.gates.compute, 'ui' for the UI, '' for the top."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and (PACKAGE / parts[1] / "__init__.py").is_file() else ""


def imports_of(module: str) -> list[tuple[int, str, str]]:
    """(line, imported module as written, imported name or '') for every workbench import."""
    found = []
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, "") for a in node.names if a.name.startswith("workbench")]
        elif isinstance(node, ast.ImportFrom) and node.level:
            found.append((node.lineno, "." * node.level + (node.module or ""), "<relative>"))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("workbench"):
            found += [(node.lineno, node.module, a.name) for a in node.names]
    return found


def targets(written: str, name: str) -> list[str]:
    """The modules an import really loads: through a face, the module defining the name."""
    if name == "<relative>":
        return []
    if name and f"{written}.{name}" in MODULES:  # from workbench.P import submodule
        return [f"{written}.{name}"]
    table = exports(written) if written in MODULES else {}
    if name and table:
        return [table[name]] if name in table else []
    if not name and table:  # `import workbench.P`: the face used as a namespace
        return sorted(set(table.values()))
    return [written]


@cache
def graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for module in MODULES:
        for _, written, name in imports_of(module):
            for target in targets(written, name):
                if target != module and target in MODULES:
                    edges[module].add(target)
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_top_of_workbench_holds_stages_and_a_few_cross_cutting_modules() -> None:
    top = {p.stem for p in PACKAGE.glob("*.py")}
    assert top == TOP_LEVEL, f"move {sorted(top - TOP_LEVEL)} into the stage that owns it"
    assert {"recipe", "models", "gates", "build", "chat", "routing", "jobs", "cli"} <= set(STAGES)


def test_every_import_resolves_to_a_module_that_exists() -> None:
    bad = [f"{m}:{line}: from {w} import {n}" for m in MODULES for line, w, n in imports_of(m)
           if not targets(w, n) or not set(targets(w, n)) <= set(MODULES)]
    assert not bad, "imports of names no face exports (add the name to EXPORTS):\n" + "\n".join(bad)


def test_no_module_imports_itself_back_through_others() -> None:
    assert find_cycle(graph()) is None, " -> ".join(find_cycle(graph()) or [])


def test_stages_depend_on_each_other_one_way() -> None:
    edges: dict[str, set[str]] = {}
    for module, outs in graph().items():
        for target in outs:
            a, b = stage_of(module), stage_of(target)
            if a and b and a != b:
                edges.setdefault(a, set()).add(b)
    assert find_cycle(edges) is None, "stages import each other: " + " -> ".join(find_cycle(edges) or [])
    for module, outs in graph().items():
        if not stage_of(module) and module not in ENTRY_POINTS:  # cross-cutting: below every stage
            assert not [t for t in outs if stage_of(t)], f"{module} imports a stage: {sorted(outs)}"


def test_a_stage_reaches_another_only_through_its_face() -> None:
    bad = []
    for module in MODULES:
        here = stage_of(module)
        for line, written, name in imports_of(module):
            there = stage_of(written) if written in MODULES else ""
            inner = written.count(".") >= 2 or (name and f"{written}.{name}" in MODULES)
            if there and there != here and there != "ui" and inner:
                bad.append(f"{module}:{line}: from {written} import {name}")
    assert not bad, "import these from the stage's face (workbench.STAGE):\n" + "\n".join(bad)


@pytest.mark.parametrize("stage", STAGES)
def test_each_face_says_what_its_stage_does_and_exports_what_it_names(stage: str) -> None:
    package = f"workbench.{stage}"
    face = importlib.import_module(package)
    assert face.__doc__ and len(face.__doc__.split()) > 20, f"{package} needs a docstring: takes, gives"
    for name, module in exports(package).items():
        assert module in MODULES, f"{package} exports {name} from {module}, which does not exist"
        assert name not in {m.rsplit(".", 1)[1] for m in MODULES if m.startswith(package + ".")}, (
            f"{package}.{name} is both an export and a module: importing the module would hide the export")
        assert getattr(face, name) is getattr(importlib.import_module(module), name)


def test_the_ui_never_imports_torch_transformers_or_safetensors() -> None:
    bad = []
    for path in sorted((PACKAGE / "ui").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            bad += [f"{path.name}:{node.lineno}: {n}" for n in names if n.split(".")[0] in HEAVY]
    assert not bad, bad
    # Building the whole app loads none of them either, not even through another stage.
    code = ("import sys, app, workbench.ui.blocks as blocks; blocks.create_app(); "
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            check=True)
    assert loaded.stdout.strip() == "", f"building the app imported {loaded.stdout.strip()}"


def test_the_checks_see_a_cycle_and_an_inner_import() -> None:
    """The walkers above are code too: a made-up circle and a reach past a face are caught."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert targets("workbench.gates", "GateDiagnostics") == ["workbench.gates.types"]
    assert targets("workbench.gates", "no_such_name") == []
    assert stage_of("workbench.gates.compute") == "gates" and stage_of("workbench.errors") == ""
    assert stage_of("workbench.gates") == "gates"
