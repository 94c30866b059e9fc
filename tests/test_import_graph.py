"""The pack's import graph, read from the sources (ast, so that nothing is imported): no import circle among the
modules of nodes/ and training/ (an import inside a function counts: it is a circle all the same, only deferred), and
no module of one method (IDAdapter, AdaFace, W+) imports a module of another; the shared modules serve them all."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACK = "comfyui_idadapter"
METHODS = ("idadapter", "adaface", "wplus")
# method modules whose names do not say which method they serve
METHOD_OF = {"nodes.arch.e4e": "wplus", "nodes.arch.arc2face": "adaface"}


def module_files() -> dict[str, pathlib.Path]:
    """Every module of nodes/ and training/ by its dotted name inside the pack (a package by its own name)."""
    found = {}
    for folder in ("nodes", "training"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = module_files()


def imported_modules(name: str, path: pathlib.Path) -> set[str]:
    """The pack's modules that ``name`` imports anywhere in its source (relative, or absolute through the package
    name as the scripts do), a ``from package import module`` naming the module itself."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # one dot: this package; each further dot: one package up
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1])
                module = ".".join(part for part in (base, node.module) if part)
            else:
                module = node.module or ""
            candidates = [f"{module}.{alias.name}" for alias in node.names] + [module]
        else:
            continue
        for candidate in candidates:
            candidate = candidate.removeprefix(f"{PACK}.")
            if candidate in MODULES:
                targets.add(candidate)
                break  # `from a import b`: the module b when there is one, else a
    targets.discard(name)
    return targets


GRAPH = {name: imported_modules(name, path) for name, path in MODULES.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
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

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def method_of(module: str) -> str | None:
    words = module.rpartition(".")[2].split("_")
    return next((method for method in METHODS if method in words), METHOD_OF.get(module))


def test_the_graph_sees_what_the_trainers_import():
    """The reader follows relative, lazy and absolute imports (a check of the test itself)."""
    assert "training.checkpoint" in GRAPH["training.loop"]  # relative, module level
    assert "training.idadapter_config" in GRAPH["training.train_idadapter"]  # absolute, through the package name
    assert "training.idadapter_task" in GRAPH["training.train_idadapter"]  # inside a function
    assert "nodes.arch.idadapter" in GRAPH["training.idadapter_task"]  # `from ..nodes.arch import idadapter as ida`
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circle():
    assert cycles(GRAPH) == []


@pytest.mark.parametrize("part", ["training", "nodes"])
def test_no_method_module_imports_another_methods(part):
    crossings = [f"{name} ({method_of(name)}) imports {target} ({method_of(target)})"
                 for name, targets in GRAPH.items() if name.startswith(f"{part}.") and method_of(name)
                 for target in sorted(targets) if method_of(target) not in (None, method_of(name))]
    assert crossings == []
