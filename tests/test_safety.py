"""A tracer must never harm its host: probe sites proved safe on this kernel and CPU, exact
planned sites, skipped functions told, and the launched command's whole tree ended.

The canaries run outside the traced command while keytrace is attached: a uprobe patches a file
in every process that maps it, so a bad site would corrupt them too.
"""
from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tracer import CallTracer, KeyTracer
from tracer.bpf import stepcheck
from tracer.errors import KeytraceError
from tracer.workloads import compile_c

from conftest import FIXTURES, json_rows, keytrace, told, uprobes_attached_by

STRING_FUNCTIONS = ["memset", "memcpy", "strchr", "strlen", "rawmemchr", "strchrnul"]


# ---- which instruction classes single-step correctly here ------------------------------------

def test_the_single_step_check_finds_what_this_kernel_gets_wrong(bpf):
    """What the check shows on this kernel (6.18, x86-64): it reads the opcode byte after a VEX
    or EVEX prefix as if it were a legacy one, and "emulates" those instructions as branches by
    skipping them; pushf under a single step pushes the trap flag; a rep string instruction
    traps once per iteration. Everything else comes out right."""
    perf_fds = perf_events()
    report = stepcheck.run()
    bad = report.unsafe()
    for klass in ("vex/emulated-jcc", "vex/emulated-call", "vex/emulated-jmp",
                  "legacy/stepped+pushf", "legacy/stepped+rep"):
        assert klass in bad, (klass, report.classes.get(klass))
    assert "results differ" in bad["vex/emulated-jcc"].detail
    assert "fired 24 times for 3 executions" in bad["legacy/stepped+rep"].detail
    for klass in ("legacy/stepped", "legacy/stepped-rip", "legacy/stepped+vector",
                  "legacy/stepped+seg", "legacy/stepped-ret", "legacy/stepped-call-rip",
                  "legacy/emulated-jcc", "legacy/emulated-push", "legacy/emulated-nop",
                  "vex/stepped", "vex/stepped-rip"):
        assert report.classes[klass].ok, (klass, report.classes[klass].detail)
    if "avx512bw" in open("/proc/cpuinfo").read():
        assert "evex/emulated-jcc" in bad and report.classes["evex/stepped"].ok
    # nothing of the check is left behind: its probes are perf events, closed
    assert perf_events() == perf_fds


def perf_events() -> int:
    return sum(os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[perf_event]"
               for fd in os.listdir("/proc/self/fd") if os.path.exists(f"/proc/self/fd/{fd}"))


def test_the_policy_refuses_glibcs_avx512_memset_entry(bpf):
    policy = stepcheck.policy()
    assert "probed wrongly" in policy(bytes.fromhex("62e27d487ac6"))    # vpbroadcastb zmm16, esi
    assert "refuses" in policy(bytes.fromhex("f0480fb111"))               # lock cmpxchg
    assert "refuses" in policy(bytes.fromhex("66e900000000"))             # a 16-bit jmp
    assert policy(bytes.fromhex("4889f8")) is None                        # mov rax, rdi
    assert policy(bytes.fromhex("4c8d0529ad1400")) is None                # lea r8, [rip+...]


# ---- the canary: a compress/decompress round trip while keytrace is attached ------------------

@pytest.fixture(scope="module")
def canary(tmp_path_factory):
    """A few MB of text, and the round trip's command: it prints OK only when gzip -c | gzip -dc
    gives the file back and sort's output has the right checksum."""
    d = tmp_path_factory.mktemp("canary")
    rnd = random.Random(7)
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]
    lines = [" ".join(rnd.choice(words) + str(rnd.randrange(10**6)) for _ in range(8))
             for _ in range(60_000)]
    data = d / "data.txt"
    data.write_text("\n".join(lines) + "\n")
    want = hashlib.sha256(("\n".join(sorted(lines, key=lambda s: s.encode())) + "\n").encode()).hexdigest()
    script = (f"gzip -c {data} | gzip -dc | cmp - {data} && "
              f"[ \"$(LC_ALL=C sort {data} | sha256sum | cut -d' ' -f1)\" = {want} ] && echo OK")
    return script


def run_canary(script: str) -> str:
    r = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=300)
    return r.stdout.strip() + r.stderr.strip()


@pytest.mark.parametrize("count", [False, True], ids=["trace", "count"])
def test_untraced_programs_stay_right_while_the_cli_probes_string_functions(bpf, canary, count):
    assert run_canary(canary) == "OK"  # the canary itself, unprobed
    args = ["calls", "-d", "60"] + (["-c"] if count else []) + \
        [a for f in STRING_FUNCTIONS for a in ("-e", f)] + ["--", "sleep", "3"]
    p = subprocess.Popen([sys.executable, "-m", "tracer.cli", *args], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in iter(lambda: told(p.stderr), ""):
            lines.append(line)
            if "probes" in line:
                break
        assert "function(s)" in lines[-1], lines
        got = [run_canary(canary) for _ in range(2)]
        errs = p.stderr.read()
        assert p.wait(timeout=120) == 0, "".join(lines) + errs
    finally:
        p.kill()
        p.wait()
    assert got == ["OK", "OK"], got
    # every function was probed (moved past an unsafe entry where needed), none refused
    assert "skipping" not in "".join(lines) + errs


@pytest.mark.parametrize("count", [False, True], ids=["trace", "count"])
def test_untraced_programs_stay_right_while_the_api_probes_string_functions(bpf, canary, count):
    with CallTracer(STRING_FUNCTIONS, command=["sleep", "2"], count=count, keep=False) as t:
        got = run_canary(canary)
        t.wait(60)
    assert got == "OK"
    assert not t.skipped
    assert uprobes_attached_by(os.getpid()) == []
    if count:
        calls = t.counts().set_index("function")["calls"]
        assert calls.sum() > 0  # sleep itself calls some of them


# ---- exact counts on the default (planned) sites ---------------------------------------------

@pytest.fixture(scope="module")
def strcalls(tmp_path_factory):
    d = tmp_path_factory.mktemp("strcalls")
    return {"strcalls": str(compile_c(FIXTURES / "strcalls.c", d, extra=("-fno-builtin",))),
            "entries": str(compile_c(FIXTURES / "entries.c", d))}


def counts_of(exe_args: list, patterns: list, sites: str = "planned") -> dict:
    r = keytrace("calls", "-c", "--json", "--sites", sites,
                 *[a for p in patterns for a in ("-e", p)], "--", *exe_args)
    assert r.returncode == 0, r.stderr
    return {row["function"]: row["calls"] for row in json_rows(r.stdout)}


def test_planned_counts_are_exact_against_the_whole_file(bpf, strcalls):
    """strcalls N M K calls memcpy N times, mempcpy M, memmove K, strlen N, strchr N: glibc's
    mempcpy jumps into memmove's body past its entry, so the memcpy|memmove row must count
    N + K whether or not mempcpy runs (a site past that landing point would add M)."""
    patterns = ["memcpy", "memmove", "mempcpy", "strlen", "strchr"]
    base = counts_of([strcalls["strcalls"], "0", "0", "0"], patterns)

    def added(n, m, k, sites="planned"):
        got = counts_of([strcalls["strcalls"], str(n), str(m), str(k)], patterns, sites)
        return {f: got[f] - base.get(f, 0) for f in got}
    want = {"memcpy|memmove": 3000 + 500, "mempcpy": 1000, "strlen": 3000, "strchr": 3000}
    assert added(3000, 1000, 500) == want
    assert added(3000, 0, 500) == {**want, "mempcpy": 0}
    assert added(3000, 1000, 500, "entry") == want


def test_a_glob_over_str_functions_counts_exactly(bpf, strcalls):
    base = counts_of([strcalls["strcalls"], "0", "0", "0"], ["libc:str*"])
    got = counts_of([strcalls["strcalls"], "2000", "0", "0"], ["libc:str*"])
    added = {f: got[f] - base.get(f, 0) for f in got if got[f] != base.get(f, 0)}
    assert added == {"strlen": 2000, "strchr": 2000}, added


def test_entries_that_cannot_be_probed_as_they_are(bpf, strcalls):
    exe = strcalls["entries"]
    truth = subprocess.run([exe, "300", "200"], capture_output=True, text=True).stdout
    # refused (ds:) and wrongly emulated (VEX) entries: the probe moves to the next instruction,
    # sees every call once, and the program computes what it computes unprobed
    for mode in ([], ["-c"]):
        r = keytrace("calls", *mode, "--json", "-e", "exe:ds_entry", "-e", "exe:vex_entry",
                     "-e", "exe:inner", "--", exe, "300", "200")
        assert r.returncode == 0, r.stderr
        assert truth in r.stderr, r.stderr  # the program's own output (--json sends it there)
        rows = json_rows(r.stdout)
        if mode:
            assert {x["function"]: x["calls"] for x in rows} == {"ds_entry": 300, "vex_entry": 300,
                                                                 "inner": 300}
        else:
            vex = [x for x in rows if x["function"] == "vex_entry"]
            assert len(vex) == 300 and len([x for x in rows if x["function"] == "ds_entry"]) == 300
            # the arguments, read past the unsafe first instruction, are the ones passed
            assert sorted(int(x["args"][0] or "0", 0) for x in vex) == list(range(300)), vex[:3]
    # a locked store at the entry: nothing can go there or past it; named, it is a usage error
    r = keytrace("calls", "-c", "-e", "exe:lock_entry", "--", exe, "3", "0")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "lock_entry" in r.stderr and "lock" in r.stderr


def test_vdso_functions_are_skipped_not_fatal(bpf):
    r = keytrace("calls", "-c", "-e", "time", "--", "true")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "vDSO" in r.stderr
    r = keytrace("calls", "-c", "-e", "libc:gettimeofda*", "-e", "getpid", "--", "true")
    assert r.returncode == 0, r.stderr
    assert "skipping libc.so.6!gettimeofday" in r.stderr and "vDSO" in r.stderr
    assert "keytrace: 1 function(s) in 1 file(s)" in r.stderr, r.stderr


DRAIN_FAILED = "tracing stopped: reading the probes' records failed"


def failing_drain() -> CallTracer:
    """A started tracer (of a sleep it launched) whose every drain fails."""
    t = CallTracer(["getpid"], command=["sleep", "30"], count=True)

    def broken():
        raise RuntimeError("boom")
    t.poll = broken
    return t.start()


def test_a_failing_drain_stops_tracing_with_one_line_and_detaches(bpf):
    t = failing_drain()
    with pytest.raises(KeytraceError, match=DRAIN_FAILED):
        t.wait(20)
    t.stop()  # the failure was told once: stopping does not raise it again
    assert uprobes_attached_by(os.getpid()) == []
    assert t.process.poll() is not None


def test_a_drain_failure_nobody_waited_for_is_raised_by_stop(bpf):
    """The API's caller who never waits nor checks still gets the error, at stop()."""
    t = failing_drain()
    t._thread.join(10)  # the drain thread ends at its first failed poll
    assert not t._thread.is_alive()
    with pytest.raises(KeytraceError, match=DRAIN_FAILED):
        t.stop()
    assert uprobes_attached_by(os.getpid()) == []
    assert t.process.poll() is not None
    t.stop()  # told once


# ---- the launched command's whole tree ends with keytrace ------------------------------------

def marked(tag: str, sleeps: bool = True) -> list:
    """pids of the sleeps (or, sleeps=False, of any process) whose command line holds the tag."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                argv = Path(f"/proc/{d}/cmdline").read_bytes().decode(errors="replace").split("\0")
            except OSError:
                continue
            if any(tag in a for a in argv) and (not sleeps or argv[0] == "sleep"):
                out.append(int(d))
    return out


def tree_script(tag: str) -> str:
    """Two background sleeps, and a daemon that double-forks into a session of its own. tag:
    digits, so that each sleep's argument is a number no other process has."""
    return (f"sleep 300.{tag}1 & sleep 300.{tag}2 & "
            f"(setsid sh -c 'sleep 300.{tag}3 & exit 0' &) ; wait")


@pytest.mark.parametrize("how", ["duration", "SIGINT", "SIGTERM"])
def test_the_whole_launched_tree_ends_with_keytrace(bpf, how):
    tag = f"{os.getpid()}{['duration', 'SIGINT', 'SIGTERM'].index(how)}"
    args = ["watch", "--json"] + (["-d", "3"] if how == "duration" else []) + \
        ["--", "sh", "-c", tree_script(tag)]
    p = subprocess.Popen([sys.executable, "-m", "tracer.cli", *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while len(marked(f"300.{tag}")) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(marked(f"300.{tag}")) == 3, "the tree did not start"
        if how != "duration":
            p.send_signal(getattr(signal, how))
        p.communicate(timeout=60)
    finally:
        p.kill()
        p.wait()
    time.sleep(0.2)
    assert marked(f"300.{tag}", sleeps=False) == [], "processes of the launched tree outlived keytrace"


def test_the_api_ends_the_whole_tree_too(bpf):
    tag = f"{os.getpid()}7"
    with KeyTracer(command=["sh", "-c", tree_script(tag)]):
        deadline = time.monotonic() + 30
        while len(marked(f"300.{tag}")) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(marked(f"300.{tag}")) == 3
    time.sleep(0.2)
    assert marked(f"300.{tag}", sleeps=False) == []
    assert uprobes_attached_by(os.getpid()) == []
    with CallTracer(["getpid"], command=["sh", "-c", tree_script(tag + "8")], count=True):
        while len(marked(f"300.{tag}8")) < 3 and time.monotonic() < deadline + 30:
            time.sleep(0.1)
        assert len(marked(f"300.{tag}8")) == 3
    time.sleep(0.2)
    assert marked(f"300.{tag}8", sleeps=False) == []


# ---- exit status a CI gate can trust ---------------------------------------------------------

@pytest.mark.parametrize("command, status", [
    ("exit 7", 7), ("kill -SEGV $$", 128 + signal.SIGSEGV), ("exit 0", 0)])
def test_watch_and_calls_exit_with_a_failed_commands_status(bpf, command, status):
    r = keytrace("watch", "--json", "--fail-on-leak", "--", "sh", "-c", command)
    assert r.returncode == status, r.stderr
    r = keytrace("calls", "-c", "-e", "getpid", "--", "sh", "-c", command)
    assert r.returncode == status, r.stderr


def test_a_leak_in_a_command_that_succeeded_exits_3(bpf, bins):
    r = keytrace("watch", "--json", "--fail-on-leak", "--", bins["reload_host"], bins["libleaky"], "5")
    assert r.returncode == 3, r.stderr
    r = keytrace("watch", "--json", "--", bins["reload_host"], bins["libleaky"], "5")
    assert r.returncode == 0, r.stderr  # no gate asked for


def test_a_command_keytrace_ends_gives_keytraces_own_status(bpf):
    r = keytrace("calls", "-c", "-d", "1", "-e", "getpid", "--", "sleep", "30")
    assert r.returncode == 0, r.stderr  # sleep died of keytrace's SIGTERM: not a failure
    r = keytrace("watch", "-d", "1", "--", "sleep", "30")
    assert r.returncode == 0, r.stderr


# ---- the CLI ends cleanly, whichever way it ends --------------------------------------

# The CLI with every drain failing (the poll of both tracers patched), for the drain exit path.
FAILING_CLI = ("import sys\n"
               "from tracer.calls import CallTracer\n"
               "from tracer.session import KeyTracer\n"
               "def boom(self, final=False):\n"
               "    raise RuntimeError('injected')\n"
               "CallTracer.poll = KeyTracer.poll = boom\n"
               "from tracer.cli import main\n"
               "sys.argv[0] = 'keytrace'\n"
               "main()\n")


@pytest.mark.parametrize("how", ["end", "SIGINT", "SIGTERM", "drain"])
@pytest.mark.parametrize("command", [["watch", "--json"], ["calls", "-c", "--json", "-e", "malloc"]],
                         ids=["watch", "calls"])
def test_the_cli_ends_cleanly_and_reports_whichever_way_it_ends(bpf, command, how):
    """The CLI reports while its probes detach (the kernel's grace periods, in a thread), and
    ends with its status and report at the command's end, on SIGINT, on SIGTERM, and when the
    drain fails: the detach never hangs or breaks an exit (a dead process's probes go with its
    descriptors; the per-test check then finds nothing left on the host)."""
    runner = ["-c", FAILING_CLI] if how == "drain" else ["-m", "tracer.cli"]
    p = subprocess.Popen([sys.executable, *runner, *command, "--", "sleep",
                          "3" if how == "end" else "30"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = told(p.stderr)
        assert "probes" in line, line  # attached: "N probes attached ..." / "... N probes"
        if how != "drain":
            assert any("uprobe_multi" in h for h in uprobes_attached_by(p.pid))
        if how.startswith("SIG"):
            p.send_signal(getattr(signal, how))
        out, err = p.communicate(timeout=60)
    finally:
        p.kill()
        p.wait()
    if how == "drain":
        assert p.returncode == 1 and DRAIN_FAILED in err, err
    else:
        assert p.returncode == 0, err
        assert json_rows(out) or command[0] == "watch", out  # the report was made
