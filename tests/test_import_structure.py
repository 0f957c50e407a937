"""The package's import structure: no import cycles, no imports hidden in functions.

The graph is read from the source with :mod:`ast` (nothing is imported): an edge
``a -> b`` for each ``import``/``from`` statement that runs when module ``a`` is
imported (module level and class bodies, not ``if TYPE_CHECKING:`` blocks, not
function bodies) and names pyroem module ``b``. A cycle in it means some module
sees another half-initialised, depending on which one is imported first.

An import inside a function usually hides such a cycle. The only ones allowed are
listed in ``LOCAL_IMPORTS_ALLOWED``, each with its reason, and the list must match
the code exactly, so that a new one fails here.

A private name (one leading underscore, not a dunder) belongs to its module: no other
pyroem module imports it or reads it as ``module._name``, and a private module
(``pkg/_mod.py``) is imported by its own package's ``__init__`` only. A name shared
between modules is public, with a docstring.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pyroem"

#: Modules that import pyroem modules inside functions: the modules so imported, and why.
LOCAL_IMPORTS_ALLOWED: dict[str, tuple[set[str], str]] = {
    "pyroem.cli": (
        {
            "pyroem.api",
            "pyroem.outputs.comparison",
            "pyroem.datasets",
            "pyroem.plots",
            "pyroem.outputs.selection",
            "pyroem.sources",
            "pyroem.model.mixture",
        },
        "the command answers --help and bad arguments before torch is imported",
    ),
}


#: Uses of another module's private name or of a private module, as
#: ``"importer -> module:name"`` or ``"importer -> private.module"``, and why (none).
PRIVATE_USES_ALLOWED: dict[str, str] = {}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, ast.Module]:
    return {
        _module_name(path): ast.parse(path.read_text(), filename=str(path))
        for path in sorted(PACKAGE.rglob("*.py"))
    }


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _targets(node: ast.Import | ast.ImportFrom, module: str, names: set[str]) -> set[str]:
    """The pyroem modules an import statement in ``module`` loads."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name in names}
    assert node.level == 0, f"{module} imports relatively (line {node.lineno}); name the module"
    base = node.module or ""
    found = {base} if base in names else set()
    found |= {f"{base}.{alias.name}" for alias in node.names} & names
    return found


def _imports(
    tree: ast.Module, module: str, names: set[str]
) -> tuple[set[str], list[tuple[int, str]]]:
    """Modules imported when ``module`` is, and ``(line, module)`` imported inside functions."""
    top: set[str] = set()
    local: list[tuple[int, str]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            targets = _targets(node, module, names) - {module}
            if in_function:
                local.extend((node.lineno, target) for target in sorted(targets))
            else:
                top.update(targets)
            return
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child, in_function)
            return
        inside = in_function or isinstance(
            node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
        )
        for child in ast.iter_child_nodes(node):
            visit(child, inside)

    visit(tree, False)
    return top, local


def _structure() -> tuple[dict[str, set[str]], dict[tuple[str, str], list[int]]]:
    modules = _modules()
    names = set(modules)
    graph: dict[str, set[str]] = {}
    local: dict[tuple[str, str], list[int]] = {}
    for module, tree in modules.items():
        graph[module], found = _imports(tree, module, names)
        for line, target in found:
            local.setdefault((module, target), []).append(line)
    return graph, local


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of modules (first = last), or ``None``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_find_cycle_reports_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _find_cycle(graph) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_imports_tells_module_level_from_function_imports() -> None:
    source = """
from typing import TYPE_CHECKING
import pyroem.a
from pyroem import b
if TYPE_CHECKING:
    from pyroem.c import C
class K:
    from pyroem.d import D
def f():
    from pyroem.e import E
    import numpy
"""
    names = {"pyroem", "pyroem.a", "pyroem.b", "pyroem.c", "pyroem.d", "pyroem.e"}
    top, local = _imports(ast.parse(source), "pyroem.z", names)
    assert top == {"pyroem.a", "pyroem", "pyroem.b", "pyroem.d"}
    assert local == [(10, "pyroem.e")]


def test_no_import_cycles() -> None:
    graph, _ = _structure()
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_function_local_imports_are_exactly_the_allowed_ones() -> None:
    _, local = _structure()
    allowed = {
        (module, target)
        for module, (targets, _) in LOCAL_IMPORTS_ALLOWED.items()
        for target in targets
    }
    unlisted = {
        f"{module}:{lines} imports {target}"
        for (module, target), lines in local.items()
        if (module, target) not in allowed
    }
    assert not unlisted, "imports inside functions (move them to the top):\n" + "\n".join(
        sorted(unlisted)
    )
    stale = allowed - set(local)
    assert not stale, f"allowed local imports no longer in the code: {sorted(stale)}"


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _private_uses(tree: ast.Module, module: str, names: set[str]) -> set[str]:
    """The private names of other pyroem modules, and the private pyroem modules, that
    ``module`` imports or reads as attributes of an imported module, anywhere in it."""
    found: set[str] = set()
    aliases: dict[str, str] = {}  # local name -> the pyroem module it is bound to

    def private_module(target: str) -> None:
        parent = target.rpartition(".")[0]
        if target != module and module != parent and any(map(_is_private, target.split("."))):
            found.add(f"{module} -> {target}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in names:
                    private_module(alias.name)
                    if alias.asname:
                        aliases[alias.asname] = alias.name
        elif isinstance(node, ast.ImportFrom) and node.module in names:
            private_module(node.module)
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                if full in names:
                    private_module(full)
                    aliases[alias.asname or alias.name] = full
                elif _is_private(alias.name) and node.module != module:
                    found.add(f"{module} -> {node.module}:{alias.name}")
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and aliases.get(node.value.id, module) != module
            and _is_private(node.attr)
        ):
            found.add(f"{module} -> {aliases[node.value.id]}:{node.attr}")
    return found


def test_private_uses_are_found() -> None:
    source = """
import pyroem.a._hidden
from pyroem.a import _helper, Public as _Alias, __version__
from pyroem.b import _inner
from pyroem import b, c as _c
from pyroem.a._hidden import thing
x = b._secret + _c._other + _c.public
"""
    names = {"pyroem", "pyroem.a", "pyroem.a._hidden", "pyroem.b", "pyroem.b._inner", "pyroem.c"}
    assert _private_uses(ast.parse(source), "pyroem.z", names) == {
        "pyroem.z -> pyroem.a._hidden",
        "pyroem.z -> pyroem.a:_helper",
        "pyroem.z -> pyroem.b._inner",
        "pyroem.z -> pyroem.b:_secret",
        "pyroem.z -> pyroem.c:_other",
    }
    # A package's __init__ may import its own private module; a module its own names.
    init = "from pyroem.b import _inner\nfrom pyroem.b._inner import _detail\n"
    assert _private_uses(ast.parse(init), "pyroem.b", names) == {
        "pyroem.b -> pyroem.b._inner:_detail"
    }


def test_no_module_uses_another_modules_private_names() -> None:
    modules = _modules()
    names = set(modules)
    found = set().union(*(_private_uses(tree, module, names) for module, tree in modules.items()))
    unlisted = sorted(found - set(PRIVATE_USES_ALLOWED))
    assert not unlisted, (
        "private names or modules used across modules (make them public with a "
        "docstring, or move them to their one user):\n" + "\n".join(unlisted)
    )
    stale = sorted(set(PRIVATE_USES_ALLOWED) - found)
    assert not stale, f"allowed private uses no longer in the code: {stale}"
