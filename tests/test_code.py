"""The code a reader can hold: short library functions, no formatter opt-outs, scripts that reach the library as a
package (no sys.path edits), and no import cycle between the library's modules."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = sorted((ROOT / "villa").rglob("*.py"))


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_nodes(tree: ast.AST):
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        yield node
        yield from _runtime_nodes(node)


def test_no_library_function_is_over_80_lines():
    long = []
    for path in LIBRARY:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 80:
                    long.append(f"{path.relative_to(ROOT)}:{node.name} ({n} lines)")
    assert LIBRARY and not long, long


def test_no_formatter_opt_outs_and_no_sys_path_edits():
    files = [
        p
        for d in ("villa", "experiments", "benchmarks", "fidelity", "preprocess", "docmnist", "tests")
        for p in (ROOT / d).rglob("*.py")
    ]
    me = Path(__file__).resolve()
    skips = [str(p.relative_to(ROOT)) for p in files if p != me and "fmt: skip" in p.read_text()]
    # the fidelity scripts import the other project's checkout (GRAIN's, ARO's) by path: that is not villa
    edits = [
        f"{p.relative_to(ROOT)}: {line.strip()}"
        for p in files
        if p != me
        for line in p.read_text().splitlines()
        if "sys.path." in line and line.strip() != "sys.path.insert(0, str(repo))"
    ]
    assert len(files) > 100 and not skips and not edits, (skips, edits)


def test_no_import_cycle_between_library_modules():
    """Every import, lazy ones inside functions included (they are still a dependency); imports for type checkers
    only (``if TYPE_CHECKING:``) are not."""
    names = {_module(p): p for p in LIBRARY}
    graph: dict[str, set[str]] = {}
    for name, path in names.items():
        deps = set()
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in _runtime_nodes(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    deps.add(full if full in names else base)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        graph[name] = {d for d in deps if d in names and d != name and not name.startswith(d + ".")}
    state: dict[str, int] = {}
    cycles = []

    def visit(n: str, stack: list[str]) -> None:
        state[n] = 1
        for d in sorted(graph[n]):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d) :] + [d] if d in stack else [n, d])
            elif d not in state:
                visit(d, stack + [d])
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])
    assert len(graph) > 50 and not cycles, cycles


def test_every_import_of_a_villa_name_resolves():
    """Every ``from villa... import name`` in the library, the scripts and the tests, lazy ones inside functions
    included, names something that module has: a name left behind by a move fails here, not in a user's run."""
    import importlib

    files = [
        p
        for d in ("villa", "experiments", "benchmarks", "fidelity", "preprocess", "docmnist", "tests")
        for p in (ROOT / d).rglob("*.py")
    ]
    missing, checked = [], 0
    for path in files:
        for node in _runtime_nodes(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom) or node.level or not (node.module or "").startswith("villa"):
                continue
            module = importlib.import_module(node.module)
            for alias in node.names:
                checked += 1
                if alias.name != "*" and not hasattr(module, alias.name):
                    try:  # a submodule imported by name
                        importlib.import_module(f"{node.module}.{alias.name}")
                    except ModuleNotFoundError:
                        missing.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.module}.{alias.name}")
    assert checked > 300 and not missing, missing
