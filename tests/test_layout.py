"""The package's shape: no function over 80 lines, no class over 200, no import circle
(counting imports inside functions too: a circle there still ties two modules together),
and every subpackage says in its docstring what it owns."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "gemma_mtp_mlx"
MAX_FUNCTION_LINES = 80
MAX_CLASS_LINES = 200


def modules() -> dict:
    """Dotted module name -> parsed source, for every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = (path, ast.parse(path.read_text()))
    return out


def imported(name: str, path: Path, tree: ast.Module, known: set) -> set:
    """The package modules `name` imports anywhere in its source, with the packages
    those imports pass through (importing a.b.c runs a/__init__ and a/b/__init__)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                prefix = ".".join(parts[:i])
                if prefix in known and prefix != name:
                    found.add(prefix)
    return found


def circle(graph: dict):
    """A list of modules importing each other in a circle, or None."""
    state = {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt, stack)
                if found:
                    return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node, [])
            if found:
                return found
    return None


def test_no_function_over_80_lines_and_no_class_over_200():
    too_long = []
    for name, (path, tree) in modules().items():
        for node in ast.walk(tree):
            lines = getattr(node, "end_lineno", 0) - getattr(node, "lineno", 0) + 1
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and lines > MAX_FUNCTION_LINES:
                too_long.append(f"{name}.{node.name}: {lines} lines")
            elif isinstance(node, ast.ClassDef) and lines > MAX_CLASS_LINES:
                too_long.append(f"{name}.{node.name}: {lines} lines")
    assert not too_long, too_long


def package_graph() -> dict:
    """Each package module's imports of other package modules. A package's own
    `__init__` depends on its submodules only through what it imports itself; the edge from
    a submodule to its parent package is the import system's, not a circle of the code's."""
    mods = modules()
    known = set(mods)
    graph = {}
    for name, (path, tree) in mods.items():
        graph[name] = {m for m in imported(name, path, tree, known) if not name.startswith(m + ".")}
    return graph


def test_no_import_circle():
    assert circle(package_graph()) is None, " -> ".join(circle(package_graph()))


def test_the_circle_finder_finds_circles():
    assert circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert circle({"a": {"b"}, "b": set()}) is None
    # a function-level import counts: cli -> server, server -> cli inside a function
    source = "def f():\n    from ..cli import draft_tokens\n"
    found = imported("gemma_mtp_mlx.server", PACKAGE / "server" / "__init__.py", ast.parse(source),
                     {"gemma_mtp_mlx.cli", "gemma_mtp_mlx.server"})
    assert found == {"gemma_mtp_mlx.cli"}


@pytest.mark.parametrize("package", sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py")))
def test_every_subpackage_says_what_it_owns(package):
    doc = ast.get_docstring(ast.parse((PACKAGE / package / "__init__.py").read_text()))
    assert doc and len(doc.split()) >= 20, f"gemma_mtp_mlx/{package}/__init__.py needs a docstring"
