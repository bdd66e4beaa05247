"""The package's data flow, checked from the source: imports go one way, and only commands print.

How imports are read: every ``import``/``from ... import`` in every module of
``promptus/`` is parsed with :mod:`ast` (nothing is imported or executed) and
resolved to the module it names; ``from package import name`` counts as importing
``package.name`` when that is a module, else ``package``. Importing a submodule
(``promptus.backends.base``) is not counted as importing its package
(``promptus.backends``): Python runs the package's ``__init__`` first, but that is
the interpreter's mechanics, not a dependency the code chose.

Imports are counted wherever they sit:

* module level and **lazy imports inside functions count alike**, for the direction
  rules and for cycles: a lazy import defers the cost of a dependency, it does not
  remove it (a cycle through a lazy import still ties two modules together, and
  breaks as soon as someone hoists the import);
* imports under ``if TYPE_CHECKING:`` count for the direction rules (a type
  annotation is a dependency of the reader) but not for cycles (they never run).

Rules: the bitstream imports no models, backends, decoder or encoder; models import
no bitstream; backends import no bitstream, decoder or encoder; nothing outside
``promptus/commands/`` imports ``promptus.commands`` (except the entry point
``promptus/__main__.py``); the import graph has no cycles;
no module outside ``promptus/commands/`` calls ``print`` to stdout.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "promptus"

# Exceptions still waiting for their issue to land (none now); the tests below fail when an
# entry is no longer needed, so that it is removed here.
PENDING_CYCLE_EDGES: set[tuple[str, str]] = set()
PENDING_PRINTERS: set[str] = set()


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base if is_package(module) else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def imports(module: str) -> list[tuple[str, str]]:
    """(imported promptus module, kind) for every import in ``module``; kind: "top", "lazy" or "typing"."""
    tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
    found: list[tuple[str, str]] = []

    def visit(node: ast.AST, kind: str) -> None:
        for child in ast.iter_child_nodes(node):
            k = kind
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) and kind == "top":
                k = "lazy"
            if isinstance(child, ast.If) and _type_checking(child):
                for sub in child.body:
                    visit_node(sub, "typing")
                for sub in child.orelse:
                    visit_node(sub, k)
                continue
            visit_node(child, k)

    def visit_node(node: ast.AST, kind: str) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "promptus":
                    found.append((alias.name, kind))
        elif isinstance(node, ast.ImportFrom):
            target = resolve(module, node)
            if target.split(".")[0] == "promptus":
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    found.append((sub if sub in MODULES else target, kind))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) and kind == "top":
            kind = "lazy"
        visit(node, kind)

    visit(tree, "top")
    return [(m, k) for m, k in found if m in MODULES and m != module]


GRAPH = {m: imports(m) for m in MODULES}


def imported_by(module: str, *, kinds=("top", "lazy", "typing")) -> set[str]:
    return {m for m, k in GRAPH[module] if k in kinds}


def within(name: str, area: str) -> bool:
    return name == area or name.startswith(area + ".")


def test_the_import_reader_sees_lazy_and_typing_imports():
    """The reader itself: a lazy import and a TYPE_CHECKING import are both found and told apart."""
    kinds = dict(GRAPH["promptus.backends.tensorrt"])
    assert kinds.get("promptus.models") in ("lazy", "typing")
    assert ("promptus.backends.base", "top") in GRAPH["promptus.decoder"]
    assert ("promptus.bitstream", "lazy") in GRAPH["promptus.bench.clips"]
    assert "promptus.commands.common" in imported_by("promptus.commands.main")


@pytest.mark.parametrize("area, forbidden", [
    ("promptus.bitstream", ["promptus.models", "promptus.backends", "promptus.decoder", "promptus.encoder",
                            "promptus.pipeline"]),
    ("promptus.models", ["promptus.bitstream", "promptus.decoder", "promptus.encoder"]),
    ("promptus.backends", ["promptus.bitstream", "promptus.decoder", "promptus.encoder", "promptus.pipeline"]),
    ("promptus.config", [m for m in MODULES if m not in ("promptus", "promptus.config", "promptus.errors")]),
])
def test_data_flows_one_way(area, forbidden):
    bad = sorted(f"{m} imports {t}" for m in MODULES if within(m, area)
                 for t in imported_by(m) if any(within(t, f) for f in forbidden))
    assert not bad, "the flow doubles back:\n" + "\n".join(bad)


def test_nothing_outside_commands_imports_commands():
    # promptus/__main__.py is an entry point (`python -m promptus`), like the console script.
    bad = sorted(f"{m} imports {t}" for m in MODULES if not within(m, "promptus.commands") and m != "promptus.__main__"
                 for t in imported_by(m) if within(t, "promptus.commands"))
    assert not bad, "library code must not depend on the command line:\n" + "\n".join(bad)


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a list of modules (first = last), or None."""
    state: dict[str, int] = defaultdict(int)  # 0 new, 1 on the stack, 2 done
    stack: list[str] = []

    def dfs(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t in sorted(edges.get(m, ())):
            if state[t] == 1:
                return stack[stack.index(t):] + [t]
            if state[t] == 0 and (c := dfs(t)):
                return c
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if state[m] == 0 and (c := dfs(m)):
            return c
    return None


def test_no_import_cycles():
    edges = {m: {t for t in imported_by(m, kinds=("top", "lazy")) if (m, t) not in PENDING_CYCLE_EDGES}
             for m in MODULES}
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle (lazy imports count): " + " → ".join(cycle)


def test_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a"}}) is None


def test_pending_exceptions_are_still_needed():
    for m, t in PENDING_CYCLE_EDGES:
        assert t in imported_by(m), f"{m} no longer imports {t}: remove it from PENDING_CYCLE_EDGES"
    for path in PENDING_PRINTERS:
        assert stdout_prints(PACKAGE.parent / path), f"{path} no longer prints: remove it from PENDING_PRINTERS"


def stdout_prints(path: Path) -> list[int]:
    """Lines of ``print(...)`` calls that write to stdout (no ``file=``, or ``file=sys.stdout``)."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
            out = next((k.value for k in node.keywords if k.arg == "file"), None)
            if out is None or ast.unparse(out) in ("sys.stdout", "stdout"):
                lines.append(node.lineno)
        elif isinstance(node, ast.Attribute) and node.attr == "stdout" and ast.unparse(node) == "sys.stdout":
            lines.append(node.lineno)
    return lines


def test_only_commands_print_to_stdout():
    bad = []
    for name, path in MODULES.items():
        rel = str(path.relative_to(PACKAGE.parent))
        if within(name, "promptus.commands") or rel in PENDING_PRINTERS:
            continue
        bad += [f"{rel}:{n}" for n in stdout_prints(path)]
    assert not bad, ("library code returns data and logs; printing belongs to promptus/commands/: "
                     + ", ".join(bad))
