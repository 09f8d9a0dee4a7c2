"""The package's layers: every import inside tracer/ points down (or sideways within a layer),
and no module imports itself back through others. Function-level and TYPE_CHECKING imports count."""
import ast
import subprocess
import sys
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
    ["tracer.launch", "tracer.tracing", "tracer.discovery", "tracer.session", "tracer.calls", "tracer.workloads"],
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


# The generic layers know resources by id and declaration only (tracer/resource.py): no import of
# a resource module, and no resource's own words in their code (docstrings and comments may
# give pthread keys as the example they are).
GENERIC = ["tracer.wire", "tracer.resource", "tracer.bpf.ringbuf", "tracer.bpf.loader",
           "tracer.bpf.units", "tracer.bpf.pairs", "tracer.state", "tracer.store",
           "tracer.analysis.attribution", "tracer.analysis.verdicts", "tracer.analysis.forecast",
           "tracer.analysis.ledger", "tracer.analysis.census"]
RESOURCE_WORDS = ("pthread", "destructor", "live_keys", "orphaned_keys", "creates", "deletes",
                  "keytable", "key_limit")


def _generic(name: str) -> bool:
    return any(name == g or name.startswith(g + ".") for g in GENERIC)


def _words_in_code(path: Path) -> set:
    """Names and string constants of a module, docstrings left out."""
    tree = ast.parse(path.read_text())
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
            and n.body and isinstance(n.body[0], ast.Expr)
            and isinstance(n.body[0].value, ast.Constant)}
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            out.add(node.id)
        elif isinstance(node, ast.Attribute):
            out.add(node.attr)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            out.add(node.name)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            out.add(node.value)
    return out


def test_generic_layers_import_no_resource_and_name_none():
    known = modules()
    g = graph()
    wrong = [f"{a} imports {b}" for a in g if _generic(a) for b in g[a]
             if b == "tracer.resources" or b.startswith("tracer.resources.")]
    wrong += [f"{name} says {word!r}" for name, path in known.items() if _generic(name)
              for text in _words_in_code(path) for word in RESOURCE_WORDS if word in text.lower()]
    assert not wrong, "the generic layers must not know a resource:\n" + "\n".join(sorted(wrong))


# The commands that trace load no pandas (nor pyarrow, which pandas imports) up to attaching the
# probes: a run that builds no frame (--help, the agent) never pays for them, and a short run's
# start is not slowed by them (issue #24). pandas comes when a frame is built (the report after
# tracing), pyarrow when Parquet is.
TRACING_FRONT = ["tracer.cli", "tracer.cli.app", "tracer.cli.calls", "tracer.cli.agent",
                 "tracer.session", "tracer.tracing", "tracer.calls", "tracer.bpf.loader",
                 "tracer.bpf.calls", "tracer.analysis.ledger", "tracer.analysis.calls",
                 "tracer.store.files"]
_HEAVY = "print(' '.join(m for m in ('pandas', 'pyarrow') if m in sys.modules))"


def _heavy_after(code: str) -> list:
    """What of pandas and pyarrow a fresh interpreter has loaded after running code; code prints
    more such lines (_HEAVY) at the points it checks."""
    res = subprocess.run([sys.executable, "-c", f"import sys\n{code}\n{_HEAVY}"],
                         capture_output=True, text=True, cwd=PACKAGE.parent)
    assert res.returncode == 0, res.stderr
    return [line.split() for line in res.stdout.splitlines()]


def test_tracing_loads_no_pandas_before_the_probes_compile():
    code = f"""
import contextlib, io
import {", ".join(TRACING_FRONT)}
from tracer.cli import main
from tracer.calls import CallTracer
from tracer.session import KeyTracer
for argv in (["--help"], ["watch", "--help"], ["calls", "--help"]):
    sys.argv = ["keytrace", *argv]
    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):
        main()
KeyTracer(command=["true"], keep_events=True)    # its Ledger
CallTracer(["libc:malloc"], command=["true"])._prepare("/usr/bin/true")  # patterns resolved
"""
    assert _heavy_after(code) == [[]]


def test_pyarrow_is_loaded_when_parquet_is_written(tmp_path):
    code = f"""
from tracer import wire
from tracer.store import files
{_HEAVY}
path = {str(tmp_path / "ledger.parquet")!r}
files.save_events(wire.empty_events(), path)
{_HEAVY}
assert files.load_events(path)[0].empty
"""
    before, after = _heavy_after(code)[:2]
    assert before == [] and "pyarrow" in after
