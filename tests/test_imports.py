"""The shape of the package's import graph: every `import` of a kronsparse module, at module level
or inside a function, is an edge. The graph has no cycle, the library never imports the application
(training/, experiments/; only the door, cli.py and __main__.py, does), and its height stays low."""

import ast
import functools
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "kronsparse"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    """True when `name` is a module or a package of the source tree."""
    path = PACKAGE.parent / name.replace(".", "/")
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports_of(path: Path) -> set[str]:
    return imports_in(path.read_text(), module_name(path), path.name == "__init__.py")


def imports_in(source: str, name: str, is_package: bool = False) -> set[str]:
    """The kronsparse modules that the source of module `name` imports, anywhere in it."""
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")
            base = base[: len(base) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:  # `from . import functional` imports a module
                sub = f"{target}.{alias.name}"
                found.add(sub if is_module(sub) else target)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kronsparse"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("kronsparse"))
    return {m for m in found if m != name}


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    # a package's __init__ re-exports its submodules: importing them through it is not a cycle of theirs
    return {m: {t for t in imports_of(p) if t in modules and not (m.startswith(t + ".") and modules[t].name == "__init__.py")}
            for m, p in modules.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_walker_sees_a_cycle_when_there_is_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    edges = graph()
    assert "kronsparse.functional" in edges["kronsparse.layers"]  # `from . import functional as F` is seen


def test_no_import_circle_in_the_package():
    cycle = find_cycle(graph())
    assert cycle is None, " -> ".join(cycle)


APP = ("kronsparse.training", "kronsparse.experiments")
DOORS = ("kronsparse.cli", "kronsparse.__main__")


def in_app(module: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in APP)


def layering_violations(edges: dict[str, set[str]]) -> list[tuple[str, str]]:
    """(importer, imported) for every library module that imports the application."""
    return sorted((m, t) for m, targets in edges.items() if not in_app(m) and m not in DOORS
                  for t in targets if in_app(t))


def floors(edges: dict[str, set[str]]) -> list[str]:
    """The longest import chain, from the top module down to a leaf (its length: the graph's height)."""
    @functools.cache
    def chain(m: str) -> tuple[str, ...]:
        return (m, *max((chain(t) for t in edges.get(m, ())), key=len, default=()))

    return list(max((chain(m) for m in edges), key=len))


def test_the_layering_rule_fires_when_a_library_module_imports_the_app():
    source = "import torch\n\ndef load():\n    from .training.models import LeNet5\n    return LeNet5\n"
    found = imports_in(source, "kronsparse.export")
    assert found == {"kronsparse.training.models"}  # a function-level import is an edge too
    edges = {"kronsparse.export": found, "kronsparse.cli": {"kronsparse.training.train"},
             "kronsparse.training.train": {"kronsparse.layers"}, "kronsparse.methods.select": {"kronsparse.experiments"}}
    assert layering_violations(edges) == [("kronsparse.export", "kronsparse.training.models"),
                                          ("kronsparse.methods.select", "kronsparse.experiments")]
    assert imports_in("from . import training\n", "kronsparse", is_package=True) == {"kronsparse.training"}


def test_the_library_never_imports_the_application():
    edges = graph()
    assert {"kronsparse.training.train", "kronsparse.experiments"} <= edges["kronsparse.cli"]  # the door does
    assert layering_violations(edges) == []


def test_importing_the_library_and_the_door_loads_no_application_module():
    """The same rule at run time, in a fresh process: what a user imports pulls in neither the app nor matplotlib."""
    code = ("import sys, kronsparse, kronsparse.cli, kronsparse.export, kronsparse.inference, kronsparse.sparsifier\n"
            "print(sorted(m for m in sys.modules if m.startswith(('kronsparse.training', 'kronsparse.experiments', "
            "'matplotlib'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.strip() == "[]", out.stdout


def test_the_import_graph_is_lower_than_before_the_app_moved_out():
    """18 modules tall before (17 imports: __main__, cli, vit_reproduce, reproduce, train, sparsifier,
    methods, select, plots, export, models, vit, model_tree, layers, functional, kernels, costs, blocks)."""
    assert floors({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == ["a", "b", "c"]
    chain = floors(graph())
    assert len(chain) <= 16, " -> ".join(chain)
