"""Compiled probes: bcc compiles in a child, the object is kept and used again while nothing it
was made from changes, and the tracer loads it with system calls alone (it never maps the
compiler). Real compiles, real maps and programs in the kernel."""
from __future__ import annotations

import ctypes as ct
import os
import signal
import subprocess
import sys

import pytest

from conftest import told
from tracer.bpf import compiled, kernel, maps
from tracer.bpf.loaded import Loaded, ProgramError
from tracer.bpf.loader import ensure_tracefs
from tracer.errors import KeytraceError

TEXT = """
#include <uapi/linux/ptrace.h>
struct pair { u32 a; u64 b; };
BPF_HASH(seen, u32, struct pair, 16);
BPF_PERCPU_ARRAY(per_cpu, u64, 2);
BPF_ARRAY(kt_self, u32, 1);
BPF_TABLE("lru_hash", u32, u64, many, 4096);
int count(struct pt_regs *ctx) {
    u32 k = SLOT;
    struct pair p = {.a = 1, .b = 2};
    seen.update(&k, &p);
    per_cpu.increment(k);
    return 0;
}
int bad(struct pt_regs *ctx) {
    char buf[16] = {};
    return buf[bpf_get_prandom_u32()];  /* an unbounded stack read: the verifier refuses it */
}
"""


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setattr(compiled, "CACHE_DIR", tmp_path)
    return tmp_path / "bpf"


def test_an_unchanged_program_is_compiled_once(bpf, cache):
    first = compiled.compile(TEXT, ["-DSLOT=1"])
    assert not first.cached
    (kept,) = cache.glob("*.json")
    assert kept.stat().st_mode & 0o777 == 0o600 and cache.stat().st_mode & 0o777 == 0o700
    again = compiled.compile(TEXT, ["-DSLOT=1"])
    assert again.cached and again.programs == first.programs and again.maps == first.maps
    # another flag, another text: compiled anew, kept beside
    assert not compiled.compile(TEXT, ["-DSLOT=0"]).cached
    assert not compiled.compile(TEXT + "\n", ["-DSLOT=1"]).cached
    assert len(list(cache.glob("*.json"))) == 3
    # the map references are named, their immediates zeroed: the object holds no descriptor
    code, refs = again.programs["count"]
    assert {m for _, m in refs} == {"seen", "per_cpu"}
    assert all(code[8 * i + 4:8 * i + 8] == bytes(4) for i, _ in refs)


def test_a_torn_or_foreign_object_is_compiled_again(bpf, cache):
    compiled.compile(TEXT, ["-DSLOT=1"])
    (kept,) = cache.glob("*.json")
    good = kept.read_bytes()
    kept.write_bytes(good[: len(good) // 2])  # torn
    assert not compiled.compile(TEXT, ["-DSLOT=1"]).cached
    assert kept.read_bytes() == good  # replaced whole
    assert compiled.compile(TEXT, ["-DSLOT=1"]).cached
    kept.chmod(0o666)  # anyone could have put programs in it: never loaded
    assert not compiled.compile(TEXT, ["-DSLOT=1"]).cached
    assert kept.stat().st_mode & 0o777 == 0o600


def test_a_compile_error_says_what_the_compiler_said(bpf, cache):
    with pytest.raises(KeytraceError, match=r"compiling the probes failed: .*error: .*undeclared"):
        compiled.compile(TEXT.replace("u32 k = SLOT;", "u32 k = nowhere;"), ["-DSLOT=1"])
    assert not list(cache.glob("*.json"))


def test_a_malformed_object_is_refused():
    good = {"license": "GPL", "kern_version": 0, "maps": {"m": {}},
            "programs": {"p": {"insns": "AAAAAAAAAAA=", "maps": [[0, "m"]]}}}
    assert compiled.Compiled.from_json(good).programs["p"][1] == [(0, "m")]
    for broken in ([[1, "m"]], [[0, "elsewhere"]], [[-1, "m"]]):
        with pytest.raises(ValueError):
            compiled.Compiled.from_json({**good, "programs": {"p": {"insns": "AAAAAAAAAAA=",
                                                                     "maps": broken}}})


def test_the_loaded_object_has_its_maps_and_programs(bpf, cache):
    obj = compiled.compile(TEXT, ["-DSLOT=1"])
    loaded = Loaded(obj, str(ensure_tracefs()), self_pid=4321)
    try:
        assert loaded["kt_self"][0].value == 4321
        seen = loaded[b"seen"]
        key = seen.Key(7)
        seen[key] = seen.Leaf(a=3, b=4)  # (bcc names its padding: keywords)
        assert [(k.value, v.a, v.b) for k, v in seen.items()] == [(7, 3, 4)]
        del seen[key]
        with pytest.raises(KeyError):
            del seen[key]
        assert list(seen.keys()) == []
        assert loaded["per_cpu"][1] == [0] * maps.possible_cpus()
        many = loaded["many"]  # items() by batches of 1024, and one entry at a time
        for i in range(3000):
            many[ct.c_uint32(i)] = ct.c_uint64(i * i)
        batched = sorted((k.value, v.value) for k, v in many.items())
        assert batched == [(i, i * i) for i in range(3000)]
        many._batch = False
        assert sorted((k.value, v.value) for k, v in many.items()) == batched
        with pytest.raises(KeyError):
            loaded["nowhere"]
        fd = loaded.program("count", kernel.BPF_PROG_TYPE_KPROBE)
        assert loaded.program(b"count", kernel.BPF_PROG_TYPE_KPROBE) == fd  # loaded once
        with pytest.raises(ProgramError, match=r"refused program bad: Permission denied\n(.*\n)*.*stack"):
            loaded.program("bad", kernel.BPF_PROG_TYPE_KPROBE)
    finally:
        loaded.close()
    loaded.close()  # twice is fine


def test_c_types_from_bcc_descriptions():
    packed = maps.c_type(["k", [["pid", "unsigned int"], ["base", "unsigned long long"]],
                          "struct_packed"])
    assert ct.sizeof(packed) == 12
    plain = maps.c_type(["k", [["pid", "unsigned int"], ["base", "unsigned long long"]],
                         "struct"])
    assert ct.sizeof(plain) == 16
    nested = maps.c_type(["e", [["comm", "char", [16]], ["bits", "unsigned int", 3],
                                ["", [["x", "int"], ["y", "long long"]], "union"]], "struct"])
    e = nested()
    e.comm, e.bits, e.y = b"sh", 5, -1
    assert (e.comm, e.bits, e.x) == (b"sh", 5, -1)
    with pytest.raises(ValueError, match="no ctypes type"):
        maps.c_type("float128")


def test_the_tracer_never_maps_the_compiler(bpf):
    """The compiler runs in a child: the tracing process maps no LLVM, clang or libbcc."""
    proc = subprocess.Popen([sys.executable, "-m", "tracer.cli", "watch", "-d", "30", "--json"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        line = told(proc.stderr)
        assert "probes attached" in line, line + proc.stderr.read()
        with open(f"/proc/{proc.pid}/maps") as fh:
            mapped = {ln.split()[-1] for ln in fh if "/" in ln}
        assert not [m for m in mapped if any(x in m for x in ("LLVM", "clang", "libbcc"))]
    finally:
        # SIGTERM: it only sets the stop the CLI waits on, whenever it comes (a SIGINT within
        # the start's last milliseconds, after the attach line, aborts the start: exit 130)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    assert proc.returncode == 0


def test_the_cache_keeps_the_most_recently_used(cache, monkeypatch):
    monkeypatch.setattr(compiled, "KEEP", 2)
    for n in range(3):
        compiled._save(cache / f"{n}.json", b"{}")
        os.utime(cache / f"{n}.json", (1000 + n, 1000 + n))
    assert sorted(p.name for p in cache.glob("*.json")) == ["1.json", "2.json"]
    os.utime(cache / "1.json")  # used just now (a hit does this)
    monkeypatch.setattr(compiled, "KEEP_BYTES", 4)  # room for two objects of 2 bytes
    compiled._save(cache / "3.json", b"{}")
    assert sorted(p.name for p in cache.glob("*.json")) == ["1.json", "3.json"]
