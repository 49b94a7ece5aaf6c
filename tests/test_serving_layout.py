"""serving/ is laid out as rooms: imports inside it run one way (no cycles) and no module grows
past ~500 lines (issue 17 item 6). Static: reads the sources, imports nothing."""
from __future__ import annotations

import ast
from pathlib import Path

SERVING = Path(__file__).resolve().parent.parent / "serving"
MAX_LINES = 500


def _module_name(path: Path) -> tuple[str, str]:
    """(module, package it resolves relative imports from), e.g. ('serving.front.core', 'serving.front')."""
    parts = list(path.relative_to(SERVING.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
        return ".".join(parts), ".".join(parts)
    return ".".join(parts), ".".join(parts[:-1])


def import_graph() -> dict[str, set[str]]:
    """Module -> the serving modules it imports (relative and absolute `clipheads.serving` imports)."""
    files = {_module_name(f): f for f in SERVING.rglob("*.py")}
    known = {m for m, _ in files}
    graph: dict[str, set[str]] = {}
    for (mod, pkg), f in files.items():
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    root = ".".join(base + ([node.module] if node.module else []))
                elif node.module and node.module.startswith("clipheads.serving"):
                    root = "serving" + node.module[len("clipheads.serving"):]
                else:
                    continue
                targets = [root] + [f"{root}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = ["serving" + a.name[len("clipheads.serving"):] for a in node.names
                           if a.name.startswith("clipheads.serving")]
            deps |= {t for t in targets if t in known and t != mod}
        graph[mod] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(u: str) -> list[str]:
        state[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                return stack[stack.index(v):] + [v]
            if not state.get(v):
                found = visit(v)
                if found:
                    return found
        stack.pop()
        state[u] = 2
        return []

    for m in sorted(graph):
        if not state.get(m):
            found = visit(m)
            if found:
                return found
    return []


def test_serving_imports_run_one_way():
    graph = import_graph()
    assert "serving.runtimes.select" in graph and "serving.front.core" in graph
    cycle = find_cycle(graph)
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []


def test_runtimes_and_scoring_do_not_import_the_http_service():
    graph = import_graph()
    for mod, deps in graph.items():
        if mod.startswith(("serving.runtimes", "serving.scoring")):
            bad = {d for d in deps if d.startswith(("serving.front", "serving.encoder", "serving.service"))}
            assert not bad, f"{mod} imports {bad}"


def test_no_module_over_500_lines():
    long = {str(f.relative_to(SERVING)): n for f in SERVING.rglob("*.py")
            if (n := len(f.read_text().splitlines())) > MAX_LINES}
    assert not long, long
