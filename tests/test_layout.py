"""The package is a house with floors: each floor imports only the floors below it, and nothing of
ours is imported in a circle, counting the imports inside functions (``if TYPE_CHECKING:`` blocks
aside). Read from the source with ``ast``, so a lazy import cannot hide a circle."""

import ast
from pathlib import Path

import offgrid_jupyter

PACKAGE = Path(offgrid_jupyter.__file__).parent
FLOORS = [  # lowest first; a module belongs to the first floor whose prefix it has
    ("ground", ("offgrid_jupyter.errors", "offgrid_jupyter.validation", "offgrid_jupyter.version")),
    ("inference", ("offgrid_jupyter.inference",)),
    ("retrieval", ("offgrid_jupyter.retrieval",)),
    ("chat", ("offgrid_jupyter.chat",)),
    ("services", ("offgrid_jupyter.stats", "offgrid_jupyter.client", "offgrid_jupyter.runtime")),
    ("kernel", ("offgrid_jupyter.kernel",)),
    ("server", ("offgrid_jupyter.server",)),
    ("package", ("offgrid_jupyter",)),
]
# deferred imports of our own modules, each for a reason (never to dodge a circle)
DEFERRED_OK = {
    ("offgrid_jupyter", "offgrid_jupyter.kernel.widget"),  # `ChatPanel` imports ipywidgets on first use only
    ("offgrid_jupyter.kernel.magics", "offgrid_jupyter.kernel.widget"),  # ipywidgets: at `%offgrid chat` only
    ("offgrid_jupyter", "offgrid_jupyter.kernel.magics"),  # %load_ext: IPython only when loaded as an extension
    ("offgrid_jupyter", "offgrid_jupyter.server"),  # jupyter-server's discovery: the server only when it asks
}


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        if "labextension" in path.parts:
            continue
        parts = ["offgrid_jupyter", *path.relative_to(PACKAGE).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def floor(module: str) -> int:
    for i, (_, prefixes) in enumerate(FLOORS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{module} is on no floor")


class Imports(ast.NodeVisitor):
    """Every import of the module, with whether it sits inside a function; TYPE_CHECKING blocks skipped."""

    def __init__(self, module: str, is_package: bool, known: set[str]):
        self.module, self.known = module, known
        self.package = module if is_package else module.rsplit(".", 1)[0]
        self.depth = 0
        self.found: list[tuple[str, bool, int]] = []

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
                isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"):
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def _function(self, node) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name == "offgrid_jupyter" or alias.name.startswith("offgrid_jupyter."):
                self.found.append((alias.name, self.depth > 0, node.lineno))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self.package.split(".")
            base = base[: len(base) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        if not (target == "offgrid_jupyter" or target.startswith("offgrid_jupyter.")):
            return
        for alias in node.names:  # `from . import tools` imports a module
            sub = f"{target}.{alias.name}"
            self.found.append((sub if sub in self.known else target, self.depth > 0, node.lineno))


def graph() -> dict[str, list[tuple[str, bool, int]]]:
    mods = modules()
    known = set(mods)
    out = {}
    for name, path in mods.items():
        visitor = Imports(name, path.name == "__init__.py", known)
        visitor.visit(ast.parse(path.read_text(), str(path)))
        out[name] = [(t, deferred, line) for t, deferred, line in visitor.found if t != name]
    return out


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for start in edges:
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                    break
                if child in on:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    scc = []
                    while True:
                        m = stack.pop()
                        on.discard(m)
                        scc.append(m)
                        if m == node:
                            break
                    if len(scc) > 1:
                        out.append(sorted(scc))
    return out


def test_no_module_imports_another_in_a_circle_even_inside_functions():
    g = graph()
    edges = {m: {t for t, _, _ in targets if t in g} for m, targets in g.items()}
    assert cycles(edges) == [], "import circles: " + "; ".join(" <-> ".join(c) for c in cycles(edges))


def test_each_floor_imports_only_the_floors_below_it():
    wrong = [f"{m} (floor {FLOORS[floor(m)][0]}) imports {t} (floor {FLOORS[floor(t)][0]}), line {line}"
             for m, targets in graph().items() for t, _, line in targets if floor(t) > floor(m)]
    assert wrong == [], "\n".join(wrong)


def test_our_own_modules_are_imported_at_the_top_of_a_module():
    """A deferred import of our own module is a circle being dodged; only the listed reasons may defer."""
    deferred = [f"{m} imports {t} inside a function (line {line})" for m, targets in graph().items()
                for t, lazy, line in targets if lazy and (m, t) not in DEFERRED_OK]
    assert deferred == [], "\n".join(deferred)


def test_every_error_class_lives_in_errors_py():
    from offgrid_jupyter import errors

    strays = []
    for name, path in modules().items():
        if name == "offgrid_jupyter.errors":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(
                    isinstance(b, (ast.Name, ast.Attribute)) and (getattr(b, "id", None) or getattr(b, "attr", ""))
                    .endswith("Error") for b in node.bases):
                strays.append(f"{name}.{node.name}")
    assert strays == [], f"error classes outside errors.py: {strays}"
    assert issubclass(errors.PathRefusedError, errors.OffgridError)
