"""The package's layers: every import inside tracer/ points down (or sideways within a layer),
and no module imports itself back through others. Function-level and TYPE_CHECKING imports count."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "tracer"
# Bottom to top. A module may import its own layer and those below it.
LAYERS = [
    ["tracer.errors", "tracer.wire", "tracer.resource"],
    ["tracer.host"],
    ["tracer.bpf"],
    ["tracer.store"],
    ["tracer.state"],
    ["tracer.analysis"],
    ["tracer.resources"],
    ["tracer.launch", "tracer.tracing", "tracer.session", "tracer.calls", "tracer.workloads"],
    ["tracer.agent"],
    ["tracer.cli", "tracer.jupyter"],
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(name: str, path: Path, known: dict) -> set:
    """Every tracer module this one imports, anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import mod` imports pkg.mod when that is a module, else a name of pkg
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                       for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in known and t != name}
    return out


def layer_of(name: str) -> int:
    for i, layer in enumerate(LAYERS):
        if any(name == m or name.startswith(m + ".") for m in layer):
            return i
    raise AssertionError(f"{name} is in no layer: add it to LAYERS")


def graph() -> dict:
    known = modules()
    # The package's own __init__ re-exports the front: it is the top, and no one imports it.
    return {n: imports(n, p, known) - {"tracer"} for n, p in known.items()}


def test_every_import_points_down():
    wrong = [f"{a} -> {b}" for a, deps in graph().items() if a != "tracer"
             for b in deps if layer_of(b) > layer_of(a)]
    assert not wrong, "imports pointing up:\n" + "\n".join(sorted(wrong))


def test_no_import_cycle():
    g = graph()
    state: dict = {}

    def visit(n, trail):
        state[n] = "open"
        for m in g[n]:
            if state.get(m) == "open":
                raise AssertionError("import cycle: " + " -> ".join(trail + [n, m]))
            if m not in state:
                visit(m, trail + [n])
        state[n] = "done"

    for n in g:
        if n not in state:
            visit(n, [])
