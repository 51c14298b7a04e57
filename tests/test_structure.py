"""The package's structure, checked by reading its source (nothing is imported or run).

- No module over 600 lines: a module that long has usually become the home of several ideas;
  each idea gets one home, which a reader can find by its name.
- No import cycle at module import time: in a package whose import order matters, a cycle
  works or breaks depending on which module happens to be imported first (a name that is
  "not yet defined" in a partly initialised module), and it breaks subtly, far from the change.
- No private names across modules: a leading underscore says "not a seam". A module (or a
  notebook) that reads or writes another module's `_name` depends on a detail its owner is
  free to change, and the owner cannot see that dependency. What is needed from outside gets
  a public name.

Only the standard library is used: `ast` and `pathlib` (and `json` for the notebooks).
"""

from __future__ import annotations

import ast
import json
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "hangkit"
NOTEBOOKS = ROOT / "notebooks"
MAX_LINES = 600


# --- the package's modules --------------------------------------------------------------------


def module_name(path: Path) -> str:
    """hangkit/monitor/watch.py -> hangkit.monitor.watch, hangkit/agent/__init__.py ->
    hangkit.agent."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_files() -> dict[str, Path]:
    """Every module of the package, by its dotted name."""
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


MODULES = package_files()


def relative(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def is_private(name: str) -> bool:
    """_name is private; __name__ (a dunder) is not."""
    return name.startswith("_") and not name.startswith("__")


def is_inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def ancestors(module: str) -> list[str]:
    """hangkit.a.b -> [hangkit, hangkit.a]: the packages whose __init__ runs first."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def from_base(node: ast.ImportFrom, importer: str | None) -> str | None:
    """The module a `from X import ...` names, with relative imports resolved against the
    importing module (None where it cannot be resolved: a relative import in a notebook)."""
    if node.level == 0:
        return node.module
    if importer is None:
        return None
    is_package = MODULES.get(importer, Path()).name == "__init__.py"
    package = importer if is_package else importer.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def imported_modules(node: ast.Import | ast.ImportFrom, importer: str | None) -> list[str]:
    """The hangkit modules an import statement names: `from hangkit.a import b` names
    hangkit.a.b when that is a module, else hangkit.a."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = from_base(node, importer)
        if base is None:
            return []
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
                 for a in node.names]
    return [name for name in dict.fromkeys(names) if name in MODULES]


# --- 1. module length -------------------------------------------------------------------------


def test_no_module_over_600_lines():
    too_long = []
    for path in MODULES.values():
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > MAX_LINES:
            too_long.append(f"{relative(path)}: {lines} lines")
    assert not too_long, f"modules over {MAX_LINES} lines:\n" + "\n".join(too_long)


# --- 2. import cycles -------------------------------------------------------------------------


def is_type_checking(test: ast.expr) -> bool:
    """`if TYPE_CHECKING:` or `if typing.TYPE_CHECKING:`."""
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def import_time_imports(body: list[ast.stmt]):
    """The import statements that run when the module is imported: at top level, in `if`,
    `try`, `with` blocks and class bodies, but not in function bodies nor under
    `if TYPE_CHECKING:`."""
    for stmt in body:
        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
            yield stmt
        elif isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        elif isinstance(stmt, ast.If):
            if not is_type_checking(stmt.test):
                yield from import_time_imports(stmt.body)
            yield from import_time_imports(stmt.orelse)
        else:  # try/except/else/finally, with, for, while, class: each runs its blocks
            for field in ("body", "handlers", "orelse", "finalbody"):
                block = getattr(stmt, field, [])
                if field == "handlers":
                    for handler in block:
                        yield from import_time_imports(handler.body)
                else:
                    yield from import_time_imports(block)


def import_graph() -> dict[str, dict[str, int]]:
    """module -> {module it imports at import time: the line of the first such import}.
    Importing hangkit.a.b also runs hangkit.a's __init__ (an edge to hangkit.a), unless the
    importer is inside hangkit.a: its parent packages are loaded before it anyway."""
    graph: dict[str, dict[str, int]] = {}
    for importer, path in MODULES.items():
        edges = graph.setdefault(importer, {})
        for node in import_time_imports(parse(path).body):
            for target in imported_modules(node, importer):
                implied = [p for p in ancestors(target) if not is_inside(importer, p)]
                for name in [*implied, target]:
                    if name != importer and name in MODULES:
                        edges.setdefault(name, node.lineno)
    return graph


def strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's algorithm: the groups of modules that all reach each other."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph.get(node, {}):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [g for g in groups if len(g) > 1]


def shortest_path(graph: dict[str, dict[str, int]], start: str, goal: str,
                  within: set[str]) -> list[str]:
    """Breadth-first, so that each reported cycle is as short as it can be."""
    came_from = {start: start}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for succ in sorted(graph[node]):
                if succ in within and succ not in came_from:
                    came_from[succ] = node
                    nxt.append(succ)
        frontier = nxt
    path = [goal]
    while path[-1] != start:
        path.append(came_from[path[-1]])
    return path[::-1]


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One shortest cycle through each import edge inside a group (a group can hold several
    cycles: each is listed once, starting from its smallest module)."""
    found: dict[tuple[str, ...], list[str]] = {}
    for group in strongly_connected(graph):
        members = set(group)
        for source in group:
            for target in graph[source]:
                if target in members:
                    cycle = [source, *shortest_path(graph, target, source, members)]
                    start = cycle.index(min(cycle[:-1]))
                    rotated = cycle[start:-1] + cycle[:start + 1]
                    found.setdefault(tuple(rotated), rotated)
    return [found[key] for key in sorted(found)]


def describe_cycle(cycle: list[str], graph: dict[str, dict[str, int]]) -> str:
    where = ", ".join(f"{relative(MODULES[a])}:{graph[a][b]}" for a, b in zip(cycle, cycle[1:]))
    return f"{' -> '.join(cycle)}  (imports at {where})"


def test_no_module_level_import_cycle():
    graph = import_graph()
    found = [describe_cycle(c, graph) for c in cycles(graph)]
    assert not found, "import cycles at module import time:\n" + "\n".join(found)


# --- 3. private names across modules ----------------------------------------------------------


def module_aliases(tree: ast.AST, importer: str | None) -> dict[str, str]:
    """Names bound to hangkit modules by the imports anywhere in a file (functions included):
    `import hangkit.x as y`, `import hangkit.x` (binds hangkit), `from hangkit import x`,
    `from hangkit.x import y` where y is a module."""
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname and alias.name in MODULES:
                    aliases[alias.asname] = alias.name
                elif not alias.asname and alias.name.split(".")[0] in MODULES:
                    aliases[alias.name.split(".")[0]] = alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            base = from_base(node, importer)
            for alias in node.names:
                if base and f"{base}.{alias.name}" in MODULES:
                    aliases[alias.asname or alias.name] = f"{base}.{alias.name}"
    return aliases


def receiver_module(expr: ast.expr, aliases: dict[str, str]) -> str | None:
    """The hangkit module an expression names: `beacon` or `hangkit.agent.beacon`."""
    if isinstance(expr, ast.Name):
        return aliases.get(expr.id)
    if isinstance(expr, ast.Attribute):
        outer = receiver_module(expr.value, aliases)
        if outer and f"{outer}.{expr.attr}" in MODULES:
            return f"{outer}.{expr.attr}"
    return None


def private_uses(tree: ast.AST, own: str | None, aliases: dict[str, str]):
    """(line, what) for each use of another hangkit module's private name: (a) imported from
    it, (b) read as an attribute of it, (c) assigned (or deleted) as an attribute of it."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = from_base(node, own)
            if base in MODULES and base != own:
                for alias in node.names:
                    if is_private(alias.name):
                        line = getattr(alias, "lineno", node.lineno)  # Python >= 3.10
                        yield line, f"imports {base}.{alias.name}"
        elif isinstance(node, ast.Attribute) and is_private(node.attr):
            target = receiver_module(node.value, aliases)
            if target and target != own:
                verb = {ast.Load: "reads", ast.Store: "writes", ast.Del: "deletes"}[type(node.ctx)]
                yield node.lineno, f"{verb} {target}.{node.attr}"


def notebook_cells(path: Path):
    """(number, source) for each code cell, numbered from 1 over all the notebook's cells,
    with IPython's `%` and `!` lines blanked (not removed: line numbers still match)."""
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    for number, cell in enumerate(cells, start=1):
        if cell["cell_type"] != "code":
            continue
        source = cell["source"]
        text = "".join(source) if isinstance(source, list) else source
        lines = ["" if line.lstrip().startswith(("%", "!")) else line
                 for line in text.splitlines()]
        yield number, "\n".join(lines)


def notebook_private_uses(path: Path) -> tuple[list[str], list[str]]:
    """The private-name uses in a notebook's code cells (every hangkit module counts as
    another module), and a note for each cell that does not parse. An import in one cell
    binds its name for the cells after it, so the aliases are gathered from all of them."""
    trees, notes = [], []
    for number, source in notebook_cells(path):
        try:
            trees.append((number, ast.parse(source)))
        except SyntaxError as e:
            notes.append(f"{relative(path)} cell {number}: not checked, does not parse ({e.msg})")
    aliases: dict[str, str] = {}
    for _, tree in trees:
        aliases.update(module_aliases(tree, None))
    found = [f"{relative(path)} cell {number} line {line}: {what}"
             for number, tree in trees for line, what in private_uses(tree, None, aliases)]
    return found, notes


def private_attributes_by_module(trees: dict[str, ast.Module]) -> dict[str, set[str]]:
    """module -> the private attributes its classes give their instances (`self._x = ...`)."""
    defined: dict[str, set[str]] = {}
    for module, tree in trees.items():
        names = defined.setdefault(module, set())
        for cls in ast.walk(tree):
            if not isinstance(cls, ast.ClassDef):
                continue
            for node in ast.walk(cls):
                if (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
                        and isinstance(node.value, ast.Name) and node.value.id == "self"
                        and is_private(node.attr)):
                    names.add(node.attr)
    return defined


def local_names(func: ast.FunctionDef | ast.AsyncFunctionDef) -> set[str]:
    """A function's parameters and the names it assigns (nested functions excluded)."""
    args = func.args
    params = [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]
    names = {a.arg for a in params if a is not None}
    pending = list(func.body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            continue
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        pending.extend(ast.iter_child_nodes(node))
    return names - {"self", "cls"}


def reached_private_attributes(tree: ast.Module, own: str, elsewhere: dict[str, set[str]]):
    """(d): `x._name` in a function, where x is a parameter or local variable (not self or
    cls) and `_name` is an instance attribute of a class in another module, not this one."""
    own_names = elsewhere.get(own, set())

    def walk(node: ast.AST, visible: set[str]):
        for child in ast.iter_child_nodes(node):
            inner = visible
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inner = (visible | local_names(child)) - {"self", "cls"}
            elif isinstance(child, ast.ClassDef):
                inner = set()  # a class body does not see the enclosing function's names
            if (isinstance(child, ast.Attribute) and isinstance(child.value, ast.Name)
                    and child.value.id in visible and is_private(child.attr)
                    and child.attr not in own_names):
                owners = sorted(m for m, names in elsewhere.items()
                                if m != own and child.attr in names)
                if owners:
                    yield child.lineno, (f"reaches {child.value.id}.{child.attr}, an attribute "
                                         f"of a class in {', '.join(owners)}")
            yield from walk(child, inner)

    yield from walk(tree, set())


def test_no_private_names_across_modules():
    trees = {module: parse(path) for module, path in MODULES.items()}
    defined = private_attributes_by_module(trees)
    found, notes = [], []
    for module, tree in trees.items():
        aliases = module_aliases(tree, module)
        uses = sorted({*private_uses(tree, module, aliases),
                       *reached_private_attributes(tree, module, defined)})
        found += [f"{relative(MODULES[module])}:{line} {what}" for line, what in uses]
    for notebook in sorted(NOTEBOOKS.glob("*.ipynb")):
        uses, skipped = notebook_private_uses(notebook)
        found += uses
        notes += skipped
    for note in notes:  # shown in pytest's warnings summary, whether or not the test fails
        warnings.warn(note, stacklevel=1)
    message = "private names used across modules:\n" + "\n".join(found)
    if notes:
        message += "\n\nnotes:\n" + "\n".join(notes)
    assert not found, message
