"""Imports inside moe_jax point one way: the module graph has no cycle, and no function imports a moe_jax module
(the usual way to hide a cycle). Read from the source with `ast`, so nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "moe_jax"


def modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if "remote_code" in path.parts:  # copied beside exports, never imported by moe_jax
            continue
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = ast.parse(path.read_text(), filename=str(path))
    return out


def imported(node: ast.AST, known: set[str]) -> list[str]:
    """The moe_jax modules an import statement names (`from pkg import sub` names the submodule)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in known]
    if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "moe_jax":
        subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known]
        return subs + ([node.module] if len(subs) < len(node.names) and node.module in known else [])
    return []


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: {m for node in ast.walk(tree) for m in imported(node, set(mods)) if m != name}
            for name, tree in mods.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state, path = {}, []

    def visit(v):
        state[v] = "open"
        path.append(v)
        for w in sorted(edges[v]):
            if state.get(w) == "open":
                return path[path.index(w):] + [w]
            if w not in state and (found := visit(w)):
                return found
        state[v] = "done"
        path.pop()
        return None

    for v in sorted(edges):
        if v not in state and (found := visit(v)):
            return found
    return None


def test_module_imports_form_no_cycle():
    edges = graph()
    assert len(edges) > 50 and edges["moe_jax.train"] >= {"moe_jax.model", "moe_jax.timing"}
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges))


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_function_imports_a_moe_jax_module():
    mods = modules()
    inside = []
    for name, tree in mods.items():
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inside += [f"{name}.{fn.name} imports {m}" for node in ast.walk(fn) for m in imported(node, set(mods))]
    assert not inside, inside
