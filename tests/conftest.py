"""Shared fixtures. BPF tests compile and attach the real probes against real C programs.

A BPF test skips (with the reason) where tracing is impossible, except when
KEYTRACE_REQUIRE_BPF=1 (set by .ci/run): then that is a failure, so CI cannot pass by skipping.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tracer import wire
from tracer.bpf import doctor
from tracer.errors import KeytraceError
from tracer.workloads import SOURCES, build_demo, compile_c

FIXTURES = Path(__file__).parent / "fixtures"
REQUIRE_BPF = os.environ.get("KEYTRACE_REQUIRE_BPF") == "1"
# Skip every BPF test on purpose: for a run beside another one that is tracing (probes of two
# runs at once would mislead the leftover-probe checks and the timings). Never with REQUIRE_BPF.
SKIP_BPF = os.environ.get("KEYTRACE_SKIP_BPF") == "1" and not REQUIRE_BPF


@pytest.fixture(scope="session")
def bpf():
    if SKIP_BPF:
        pytest.skip("KEYTRACE_SKIP_BPF=1")
    try:
        doctor.require_tracing()
    except KeytraceError as e:
        if REQUIRE_BPF:
            pytest.fail(f"BPF is required (KEYTRACE_REQUIRE_BPF=1) but unavailable: {e}")
        pytest.skip(f"BPF unavailable: {e}")


def told(stream) -> str:
    """The next line a keytrace process wrote to stderr, past the note of a first compile of
    its probes (printed only while the compiled-object cache lacks them)."""
    while True:
        line = stream.readline()
        if not line.startswith("keytrace: compiling the probes"):
            return line


def require_tool(name: str, hint: str) -> str:
    """The path of a program a test needs: missing, the test skips saying so, or fails where
    every test must run (KEYTRACE_REQUIRE_BPF, as in CI)."""
    import shutil
    path = shutil.which(name)
    if path is None:
        if REQUIRE_BPF:
            pytest.fail(f"{name} is not installed ({hint})")
        pytest.skip(f"{name} is not installed ({hint})")
    return path


class Bins(dict):
    """The built fixtures by name; one that could not be built skips the test that asks for
    it, saying why (a failure where BPF tests are required: CI must run them all)."""

    def __init__(self, *a):
        super().__init__(*a)
        self.missing: dict = {}

    def __missing__(self, name):
        if name not in self.missing:
            raise KeyError(name)
        if REQUIRE_BPF:
            pytest.fail(f"{name} could not be built: {self.missing[name]}")
        pytest.skip(f"{name} could not be built: {self.missing[name]}")


@pytest.fixture(scope="session")
def bins(tmp_path_factory):
    """Every C workload and fixture, compiled once per session."""
    d = tmp_path_factory.mktemp("bin")
    b = Bins({k: str(v) for k, v in build_demo(d).items()})
    for name in ("threads", "forker", "keymaker", "onekey"):
        b[name] = str(compile_c(FIXTURES / f"{name}.c", d))
    # Static glibc and musl builds need libc6-dev's libc.a and musl-tools: where they are
    # missing, only the tests that use these builds skip (fail under KEYTRACE_REQUIRE_BPF).
    for name, src, kw in (("keymaker_static", "keymaker.c",
                           dict(extra=("-static",), name="keymaker-static")),
                          ("onekey_static", "onekey.c", dict(extra=("-static",), name="onekey-static")),
                          ("keymaker_musl", "keymaker.c", dict(compiler="musl-gcc", name="keymaker-musl"))):
        try:
            b[name] = str(compile_c(FIXTURES / src, d, **kw))
        except KeytraceError as e:
            b.missing[name] = str(e).splitlines()[0]
    b["libbalanced"] = str(compile_c(FIXTURES / "libbalanced.c", d, shared=True))
    # RTLD_NODELETE by link flag: dlclose never unloads it, a second dlopen makes no new key.
    b["libnodelete"] = str(compile_c(SOURCES / "libleaky.c", d, shared=True,
                                     extra=("-Wl,-z,nodelete",), name="libnodelete.so"))
    # The nested case of the incident: libA (as Imagick) needs libB (as libgomp), whose
    # constructor leaks a key. libfast leaks two per load; libtail is tidy through a tail call.
    libb = compile_c(SOURCES / "libb.c", d, shared=True)
    b["libb"] = str(libb)
    b["liba"] = str(compile_c(SOURCES / "liba.c", d, shared=True, extra=(str(libb),)))
    b["libfast"] = str(compile_c(SOURCES / "libb.c", d, shared=True, extra=("-DKEYS=2",),
                                 name="libfast.so"))
    b["libtail"] = str(compile_c(FIXTURES / "libtail.c", d, shared=True, extra=("-O2",)))
    # A constructor that dlopens: two dlopens in flight on one thread.
    b["libinner"] = str(compile_c(SOURCES / "libleaky.c", d, shared=True, name="libinner.so"))
    b["libouter"] = str(compile_c(FIXTURES / "libouter.c", d, shared=True,
                                  extra=(f'-DINNER="{b["libinner"]}"',)))
    stripped = d / "stripped"
    stripped.mkdir(exist_ok=True)
    b["libb_stripped"] = str(stripped / "libb_stripped.so")
    subprocess.run(["strip", "--strip-all", "-o", b["libb_stripped"], str(libb)], check=True)
    b["liba_on_stripped"] = str(compile_c(SOURCES / "liba.c", d, shared=True,
                                          extra=(b["libb_stripped"],), name="liba_on_stripped.so"))
    return b


@pytest.fixture(scope="session")
def libeach(tmp_path_factory):
    """(library, file): libeach.so, which leaks one fd open to file, one mapping of it, one
    thread named "leaked" and one POSIX timer per load."""
    d = tmp_path_factory.mktemp("each")
    data = d / "each.data"
    data.write_bytes(b"x" * 4096)
    lib = compile_c(FIXTURES / "libeach.c", d, shared=True, extra=(f'-DFILE_PATH="{data}"',))
    return str(lib), str(data)


@pytest.fixture(scope="session")
def libeach_tidy(tmp_path_factory):
    """libeach.so built -DTIDY: it gives back on unload all that it takes on load."""
    d = tmp_path_factory.mktemp("each-tidy")
    data = d / "each.data"
    data.write_bytes(b"x" * 4096)
    return str(compile_c(FIXTURES / "libeach.c", d, shared=True,
                         extra=(f'-DFILE_PATH="{data}"', "-DTIDY"), name="libeach_tidy.so"))


def keytrace(*args, timeout=120, **kw):
    """Run the keytrace command line; returns the CompletedProcess."""
    return subprocess.run([sys.executable, "-m", "tracer.cli", *args], capture_output=True,
                          text=True, timeout=timeout, **kw)


def json_rows(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def uprobes_attached_by(pid: int) -> list[str]:
    """The probes a pid holds: bpftool's perf-attached ones, and the BPF links among its file
    descriptors (uprobe_multi links; bpftool names no holder for them). A failing bpftool fails
    the caller: an unreadable answer must never read as "nothing attached"."""
    res = subprocess.run(["bpftool", "-j", "perf", "list"], capture_output=True, text=True)
    assert res.returncode == 0, f"bpftool perf list failed: {res.stderr.strip()}"
    out = [json.dumps(r) for r in json.loads(res.stdout or "[]") if r.get("pid") == pid]
    for info in Path(f"/proc/{pid}/fdinfo").glob("*"):
        try:
            text = info.read_text()
        except OSError:  # closed meanwhile
            continue
        if "link_id:" in text:
            out.append(" ".join(line for line in text.splitlines()[:12] if ":" in line))
    return out


def uprobe_events() -> set:
    tracefs = Path("/sys/kernel/tracing/uprobe_events")
    return set(tracefs.read_text().splitlines()) if tracefs.exists() else set()


def attached() -> set:
    """Every BPF attachment on the host: tracefs uprobe events, bpftool's perf-attached probes
    (any process's) and BPF links. A failing bpftool fails the caller: an unreadable answer
    must never read as "nothing attached"."""
    out = {("uprobe_events", line) for line in uprobe_events()}
    for what in ("perf", "link"):
        res = subprocess.run(["bpftool", "-j", what, "list"], capture_output=True, text=True)
        assert res.returncode == 0, f"bpftool {what} list failed: {res.stderr.strip()}"
        for r in json.loads(res.stdout or "[]"):
            out.add((what, json.dumps(r, sort_keys=True)))
    return out


@pytest.fixture(autouse=True)
def nothing_left_by_the_test(request):
    """After each test that traces (bpf-marked): nothing attached on the host that was not
    before it, whoever attached it (the test, or a keytrace it ran as a command)."""
    if request.node.get_closest_marker("bpf") is None or os.geteuid() != 0:
        yield  # (a pure test attaches nothing; one not root cannot read what is attached)
        return
    before = attached()
    yield
    added = attached() - before
    assert not added, f"left attached by {request.node.name}: {sorted(added)}"


@pytest.fixture(scope="session", autouse=True)
def nothing_left_attached():
    """After the whole suite: no probe of ours left, held by this process (perf-attached, or a
    link) or registered in tracefs (compared with what the host had before: other tools may
    have their own, and may be tracing meanwhile)."""
    if os.geteuid() != 0:  # tracefs and bpftool are root's to read; nothing was attached
        yield
        return
    before = uprobe_events()
    yield
    left = uprobes_attached_by(os.getpid())
    added = uprobe_events() - before
    assert not left and not added, f"probes left attached: {left} {sorted(added)}"


def events(*rows, start_ns=1_000_000_000, stacks=None):
    """An events frame from synthetic records, decoded the way live ones are.

    Each row: (op, pid, **fields) as a dict; ts increases by 1 us per row. stacks: stack id
    (a create's stack field) -> the BPF stack map's addresses, innermost first (the first, in
    pthread_key_create, gives way to the row's caller).
    """
    full = [{"ts": start_ns + i * 1000, "tid": r.get("pid", 0), "comm": "proc", **r}
            for i, r in enumerate(rows)]
    return wire.decode(wire.records(full), 0, stack_of=stacks.__getitem__ if stacks else None)


def pytest_collection_modifyitems(items):
    """Every test that needs the bpf fixture carries the bpf marker: `-m "not bpf"` runs the
    rest (pure logic, files, scan) where tracing is impossible."""
    for item in items:
        if "bpf" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.bpf)


class Keymaker:
    """A running keymaker fixture (tests/fixtures/keymaker.c), driven line by line."""

    def __init__(self, argv, **kw):
        self.p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, **kw)
        assert self.p.stdout.readline().strip() == "ready"

    @property
    def pid(self):
        return self.p.pid

    def do(self, cmd):
        self.p.stdin.write(cmd + "\n")
        self.p.stdin.flush()
        return self.p.stdout.readline().split()

    def close(self):
        self.p.kill()
        self.p.wait()


@pytest.fixture
def keymaker(bins):
    """Start keymakers (the default binary, or argv); every one is killed after the test."""
    made = []

    def start(argv=None, **kw):
        k = Keymaker(argv or [bins["keymaker"]], **kw)
        made.append(k)
        return k
    yield start
    for k in made:
        k.close()


def terminate(p: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM (what a unit or an operator sends), then SIGKILL if it will not go."""
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
