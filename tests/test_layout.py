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
    assert graph["ftloop.errors"] == [] and graph["ftloop.loss"] == []
    assert [t for t, _ in graph["ftloop.config"]] == ["ftloop.errors", "ftloop.loss"]  # loss: --loss-chunk-size's default


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == [["a", "b", "c"]]


# What ftloop may read from the environment: the launcher's and the libraries' own variables. A test hook read
# from the environment (the old FTLOOP_TEST_*) would be a name outside this list.
ENVIRONMENT = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "TORCHELASTIC_ERROR_FILE", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_USE_AGENT_STORE",
               "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID",
               "WANDB_API_KEY", "WANDB_MODE", "TOKENIZERS_PARALLELISM", "OMP_NUM_THREADS",
               "PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF", "CUBLAS_WORKSPACE_CONFIG", "FLASH_ATTENTION_DETERMINISTIC"}
TEST_WORDS = {"fault", "faults", "hook", "hooks", "inject", "test", "tests", "testing"}  # parts of a snake_case name


def environment_names(tree: ast.AST) -> set[str]:
    """The variable names a module reads or sets through os.environ / os.getenv; "?" for a name not written out."""
    def is_environ(node) -> bool:
        return isinstance(node, ast.Attribute) and node.attr == "environ"

    def name(node) -> str:
        return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else "?"

    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and is_environ(node.value):
            names.add(name(node.slice))
        elif isinstance(node, ast.Compare) and any(is_environ(c) for c in node.comparators):
            names.add(name(node.left))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if is_environ(node.func.value) and node.func.attr in ("get", "setdefault", "pop"):
                names.add(name(node.args[0]))
            elif is_environ(node.func.value) and node.func.attr == "update":
                names |= {k.arg or "?" for k in node.keywords} | ({"?"} if node.args else set())
            elif node.func.attr == "getenv":
                names.add(name(node.args[0]))
    return names


def test_production_code_reads_no_test_hooks():
    """No test hooks in production: ftloop reads no environment variable of its own, and no module, function or
    parameter of it is named for faults or hooks (tests patch functions from outside: tests/faulty_train.py)."""
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        assert environment_names(tree) <= ENVIRONMENT, (path, environment_names(tree) - ENVIRONMENT)
        names = [path.stem] + [n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
        names += [a.arg for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)
                  for a in n.args.args + n.args.kwonlyargs]
        assert not [n for n in names if TEST_WORDS & set(n.lower().split("_"))], path


def test_the_hook_finder_finds_hooks():
    tree = ast.parse("import os\nx = os.environ.get('FTLOOP_TEST_PAUSE')\n'A' in os.environ\nos.getenv(k)\n"
                     "os.environ.update(RANK='0')\ny = os.environ['MASTER_PORT']")
    assert environment_names(tree) == {"FTLOOP_TEST_PAUSE", "A", "?", "RANK", "MASTER_PORT"}


LONG = 500  # lines; a module past it says why in its docstring


def test_long_modules_say_why():
    """A guide, not a cap: one concern per module, and a module longer than LONG lines explains in its docstring
    why it is one module ("This file is long because ...")."""
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        if len(text.splitlines()) > LONG:
            assert "This file is long because" in (ast.get_docstring(ast.parse(text)) or ""), path


def test_data_modules_import_only_the_stages_before_them():
    """ftloop/data/__init__.py lists its modules stage by stage; each may import only those listed before it, so the
    folder reads as the pipeline."""
    modules = {p.stem for p in (PACKAGE / "data").glob("*.py")} - {"__init__"}
    listing = ast.get_docstring(ast.parse((PACKAGE / "data" / "__init__.py").read_text()))
    listed = []
    for line in listing.splitlines():  # "<stage> <module> <what it does>", or "<module> <what it does>"
        words = line.split()[:2]
        if len(words) == 2 and words[0] in ("read", "encode", "check", "batch") and words[1] in modules:
            listed.append(words[1])
        elif words and words[0] in modules:
            listed.append(words[0])
    assert sorted(listed) == sorted(modules)
    graph = imports()
    for position, name in enumerate(listed):
        data_imports = {t.removeprefix("ftloop.data.") for t, _ in graph[f"ftloop.data.{name}"]
                        if t.startswith("ftloop.data.")}
        assert data_imports <= set(listed[:position]), (name, data_imports - set(listed[:position]))
