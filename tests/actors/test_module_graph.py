"""The actors package imports in one direction: shared helpers (common, weight_sync, group,
storage) import no role, and no chain of imports, at module level or inside functions,
leads from a module back to itself."""

from __future__ import annotations

import ast
import pathlib

ACTORS = pathlib.Path(__file__).resolve().parents[2] / "actors"
ROLES = {"policy", "reference", "critic", "reward", "rollout", "generator"}


def imported_actors_modules(path: pathlib.Path) -> set[str]:
    """actors.* modules a file imports anywhere in it (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("actors."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {alias.name.split(".")[1] for alias in node.names if alias.name.startswith("actors.")}
    return found


def graph() -> dict[str, set[str]]:
    return {path.stem: imported_actors_modules(path) - {path.stem} for path in ACTORS.glob("*.py")
            if path.stem != "__init__"}


def cycle_from(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None (depth-first search)."""
    state: dict[str, str] = {}

    def visit(node, trail):
        state[node] = "open"
        for target in sorted(edges.get(node, ())):
            if state.get(target) == "open":
                return trail[trail.index(target):] + [target]
            if target not in state and (found := visit(target, trail + [target])):
                return found
        state[node] = "done"
        return None

    for start in sorted(edges):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_the_cycle_finder_finds_a_planted_cycle():
    assert cycle_from({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle_from({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_actors_modules_import_without_cycles():
    edges = graph()
    assert {"policy", "reference", "rollout", "common", "weight_sync"} <= set(edges)
    assert cycle_from(edges) is None


def test_shared_helpers_import_no_role():
    edges = graph()
    for shared in ("common", "weight_sync", "group", "storage", "deepspeed_engine"):
        assert not edges[shared] & ROLES, (shared, edges[shared] & ROLES)
