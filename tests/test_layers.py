"""The import graph of the library: layers only import downward, no cycles, no private names across modules.

Layers, lowest first (``docs/architecture.md`` draws them): the base (errors, fileio, data), checkpoints,
training and merging (peers: neither imports the other), scoring, search, the asset builder (which trains and
scores the embedded world), experiments, then the front ends: the demo, the workbench, and the CLI that launches
them all. Every import counts, also the ones inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RANK = {"base": 0, "checkpoints": 1, "training": 2, "merging": 2, "scoring": 3, "search": 4, "engine": 4, "assets": 5,
        "experiments": 6, "demo": 7, "workbench": 8, "cli_search": 9, "cli_models": 9.5, "cli": 10, "__init__": 10}
BASE = ("errors", "fileio", "data")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in ("optimer_lib", "workbench"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def layer(module: str) -> str:
    """The layer a module belongs to: its package under optimer_lib (or its own name at the top level)."""
    parts = module.split(".")
    if parts[0] == "workbench":
        return "workbench"
    if len(parts) == 1:
        return "__init__"
    return "base" if parts[1] in BASE else parts[1]


def imports(path: Path) -> list[tuple[str, list[str], int]]:
    """Every ``(imported module, names, line)`` of a file, inside functions too (TYPE_CHECKING blocks excepted)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = set()
    for node in ast.walk(tree):  # imports only for the type checker do not run
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for b in node.body for n in ast.walk(b))
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [a.name for a in node.names]
            subs = [f"{node.module}.{n}" for n in names if f"{node.module}.{n}" in MODULES]
            out += [(s, [], node.lineno) for s in subs]
            out.append((node.module, [n for n in names if f"{node.module}.{n}" not in MODULES], node.lineno))
    return [(m, n, line) for m, n, line in out if m.split(".")[0] in ("optimer_lib", "workbench")]


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def graph() -> dict[str, set[str]]:
    return {mod: {m for m, _, _ in imports(path) if m in MODULES and m != mod} for mod, path in MODULES.items()}


def downward_problems(modules: dict[str, Path]) -> list[str]:
    problems = []
    for mod, path in modules.items():
        own = layer(mod)
        for target, _, line in imports(path):
            if target not in MODULES:
                continue
            other = layer(target)
            if other == own or target in ("optimer_lib", "workbench"):
                continue
            if RANK[other] >= RANK[own]:
                problems.append(f"{_rel(path)}:{line}: {mod} ({own}) imports {target} ({other})")
    return problems


def private_problems(modules: dict[str, Path]) -> list[str]:
    return [f"{_rel(path)}:{line}: {mod} imports private {target}.{name}"
            for mod, path in modules.items() for target, names, line in imports(path)
            for name in names if name.startswith("_") and target != mod]


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle found by a depth-first search (each reported once, from its first module)."""
    found, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(g.get(node, ())):
            if state.get(nxt) == 1:
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node, [node])
    return found


def test_every_layer_is_known():
    assert {layer(m) for m in MODULES} <= set(RANK)


def test_layers_import_only_downward():
    problems = downward_problems(MODULES)
    assert not problems, "imports against the layers:\n" + "\n".join(problems)


def test_no_import_cycle():
    found = cycles(graph())
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_no_private_name_crosses_modules():
    problems = private_problems(MODULES)
    assert not problems, "\n".join(problems)


def test_the_checks_catch_what_they_guard(tmp_path):
    """Each check flags a planted violation (so a green run means something)."""
    up = tmp_path / "up.py"
    up.write_text("def f():\n    from optimer_lib.search.study import run_search\n")
    assert downward_problems({"optimer_lib.checkpoints.planted": up})
    priv = tmp_path / "priv.py"
    priv.write_text("from optimer_lib.scoring.evaluate import _secret\n")
    assert private_problems({"optimer_lib.search.planted": priv})
    typed = tmp_path / "typed.py"
    typed.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                     "    from optimer_lib.search.study import SearchConfig\n")
    assert not downward_problems({"optimer_lib.checkpoints.planted": typed})  # type-only imports do not run
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("layer_name", ["checkpoints", "merging", "training", "scoring", "search", "experiments"])
def test_each_layer_is_a_package_with_a_docstring(layer_name):
    init = ROOT / "optimer_lib" / layer_name / "__init__.py"
    assert ast.get_docstring(ast.parse(init.read_text())), f"{init} should say what the layer is for"
