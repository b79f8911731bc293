"""The shape of the code: a one-way import graph, errors in one module, no test hooks read by production code."""

from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "ftloop"


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, list[tuple[str, bool]]]:
    """For each ftloop module, the ftloop modules it imports and whether each import is at module level."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        top_level = {id(node) for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                     and _at_module_level(tree, node)}
        edges = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                           for alias in node.names]
            else:
                continue
            edges += [(t, id(node) in top_level) for t in targets if t in modules and t != name]
        graph[name] = edges
    return graph


def _at_module_level(tree: ast.Module, node: ast.AST) -> bool:
    """Directly in the module body, or inside a module-level if/try (never inside a function or class)."""
    def body_nodes(statements):
        for statement in statements:
            yield statement
            if isinstance(statement, (ast.If, ast.Try)):
                for block in (statement.body, statement.orelse, getattr(statement, "finalbody", []),
                              *[h.body for h in getattr(statement, "handlers", [])]):
                    yield from body_nodes(block)
    return any(node is statement for statement in body_nodes(tree.body))


def cycles(graph: dict[str, list[str]]) -> list[list[str]]:
    """Every strongly connected set of more than one node (Tarjan), each a cycle or several."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, []):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def package_of(module: str) -> str:
    """ftloop.data.rows -> ftloop.data; ftloop.config -> ftloop.config (a top-level module is its own)."""
    parts = module.split(".")
    return ".".join(parts[:2])


def test_no_import_cycles_between_modules_or_packages():
    graph = imports()
    modules = {m: [t for t, _ in edges] for m, edges in graph.items()}
    assert cycles(modules) == []
    packages: dict[str, set[str]] = {}
    for module, targets in modules.items():
        packages.setdefault(package_of(module), set()).update(
            package_of(t) for t in targets if package_of(t) != package_of(module))
    assert cycles({p: sorted(t) for p, t in packages.items()}) == []


def test_no_ftloop_import_inside_a_function():
    inside = sorted(f"{m} imports {t}" for m, edges in imports().items() for t, top in edges if not top)
    assert inside == []


def test_errors_import_nothing_of_ours_and_config_nothing_of_data():
    graph = imports()
    assert graph["ftloop.errors"] == []
    assert [t for t, _ in graph["ftloop.config"]] == ["ftloop.errors"]
    assert {t for t, _ in graph["ftloop.checks"]} == {"ftloop.config", "ftloop.errors"}


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == [["a", "b", "c"]]


def test_production_code_reads_no_test_hooks_and_stays_small():
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        assert "FTLOOP_TEST" not in text, path
        assert len(text.splitlines()) <= 400, f"{path}: {len(text.splitlines())} lines"
