"""The packages depend only downwards: data <- text <- cf <- llm <- pipeline <- serve <- cli (the top-level
modules, such as reclm.rundir, sit just above data). Imports inside functions are allowed for start-up
speed (torch, transformers), never to dodge a cycle: hoisted to module level, none may close one."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "reclm"
LAYERS = ["data", "<top>", "text", "cf", "llm", "pipeline", "serve", "cli"]


def module_name(path: Path) -> str:
    parts = ["reclm", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS):
        return parts[1]
    return "<top>"


def imports_of(path: Path) -> tuple[set[str], set[str]]:
    """reclm modules imported at module level and inside functions (``from a import b`` may name a module)."""
    modules = {module_name(p) for p in ROOT.rglob("*.py")}
    top, inner = set(), set()
    tree = ast.parse(path.read_text())
    nested = {
        id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef) for n in ast.walk(f)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found = [
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module for a in node.names
            ]
        elif isinstance(node, ast.Import):
            found = [a.name for a in node.names]
        else:
            continue
        found = {m for m in found if m.startswith("reclm.") and m in modules}
        (inner if id(node) in nested else top).update(found)
    return top, inner


GRAPH = {module_name(p): imports_of(p) for p in ROOT.rglob("*.py")}


def test_no_package_imports_one_above_it():
    upward = [
        f"{mod} imports {dep}"
        for mod, (top, inner) in GRAPH.items()
        for dep in top | inner
        if LAYERS.index(layer_of(dep)) > LAYERS.index(layer_of(mod))
    ]
    assert not upward, upward


def reaches(start: str, goal: str, edges: dict[str, set[str]]) -> bool:
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        if node == goal:
            return True
        if node not in seen:
            seen.add(node)
            todo.extend(edges.get(node, ()))
    return False


def parents(module: str) -> set[str]:
    """Importing ``a.b.c`` runs ``a/__init__`` and ``a/b/__init__`` first."""
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(2, len(parts))}


def test_no_function_level_import_hides_a_cycle():
    edges = {mod: top | {p for t in top for p in parents(t)} for mod, (top, _) in GRAPH.items()}
    hidden = [
        f"{mod} -> {dep}"
        for mod, (_, inner) in GRAPH.items()
        for dep in inner
        if not dep.startswith(mod + ".") and not mod.startswith(dep + ".") and reaches(dep, mod, edges)
    ]
    assert not hidden, hidden


def test_the_checks_see_a_violation():
    """The graph is real: cli imports pipeline, and pipeline never imports cli."""
    assert any(layer_of(dep) == "pipeline" for top, inner in [GRAPH["reclm.cli.pipeline"]] for dep in top | inner)
    assert LAYERS.index("cli") > LAYERS.index("pipeline")


def test_the_cli_starts_without_torch():
    """`reclm --help` and every command's parsing stay fast: torch loads only inside the commands."""
    import subprocess
    import sys

    code = "import sys, reclm.cli.main; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"
