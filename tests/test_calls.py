"""keytrace calls: real probes on real programs, counts checked against what the programs do."""
from __future__ import annotations

import json
import re
import shutil
import subprocess

import pandas as pd
import pytest

from tracer.calls import CallTracer
from tracer.workloads import compile_c

from conftest import REQUIRE_BPF, FIXTURES, json_rows, keytrace

N = 150
# What tests/fixtures/caller.c does with N and "threads fork": rand in main, 2 threads, a child.
EXPECTED = {"rand": 4 * N, "getpid": N, "strlen": N, "open": N, "work": N, "work_more": N}
HARDENED = ("-fno-plt", "-fcf-protection", "-Wl,-z,now")


@pytest.fixture(scope="module")
def callers(tmp_path_factory):
    """caller linked -z now -fno-plt -fcf-protection against libcallee.so, as a PIE and not."""
    d = tmp_path_factory.mktemp("calls")
    lib = compile_c(FIXTURES / "libcallee.c", d, shared=True)
    link = ("-DWITH_CALLEE", str(lib), f"-Wl,-rpath,{lib.parent}") + HARDENED
    return {"pie": str(compile_c(FIXTURES / "caller.c", d, extra=("-pie", "-fPIE") + link,
                                 name="caller")),
            "nopie": str(compile_c(FIXTURES / "caller.c", d, extra=("-no-pie", "-fno-PIE") + link,
                                   name="caller-nopie"))}


def counted(rows) -> dict:
    return {r["function"]: r["calls"] for r in rows}


def test_counts_exact_where_ltrace_sees_nothing(bpf, callers):
    r = keytrace("calls", "-c", "--json", "-e", "rand", "-e", "getpid", "-e", "strlen", "-e", "open",
                 "--", callers["pie"], str(N), "threads", "fork")
    assert r.returncode == 0, r.stderr
    assert counted(json_rows(r.stdout)) == {f: EXPECTED[f] for f in ("rand", "getpid", "strlen", "open")}
    assert "on planned sites" in r.stderr
    if not shutil.which("ltrace"):
        if REQUIRE_BPF:
            pytest.fail("ltrace is not installed (setup.sh installs it)")
        pytest.skip("ltrace is not installed: the comparison cannot be made")
    lt = subprocess.run(["ltrace", "-c", "-f", "-e", "rand+getpid+strlen+open", callers["pie"],
                         str(N)], capture_output=True, text=True, timeout=120)
    # -z now -fno-plt: no PLT to break on, so ltrace counts nothing of what ran
    assert lt.returncode == 0 and "calls" in lt.stderr, lt.stderr
    assert "rand" not in lt.stderr and "getpid" not in lt.stderr, lt.stderr


@pytest.mark.parametrize("kind", ["pie", "nopie"])
def test_pie_and_non_pie_count_exactly_across_libraries(bpf, callers, kind):
    with CallTracer(["rand", "libc:getpi?", "libcallee:work*"], command=[callers[kind], str(N),
                    "threads", "fork"], count=True) as t:
        assert t.wait(60) == "exited"
    df = t.counts()
    assert dict(zip(df["function"], df["calls"])) == {f: EXPECTED[f] for f in
                                                       ("rand", "getpid", "work", "work_more")}
    assert set(df["library"]) == {"libc.so.6", "libcallee.so"}
    assert df["errors"].isna().all()  # no return probes without timing


def test_planned_sites_and_entry_probes_count_the_same(bpf, callers):
    results = {}
    for sites in ("planned", "entry"):
        with CallTracer(["rand", "getpid", "open", "strlen"], sites=sites, count=True,
                        command=[callers["pie"], str(N), "threads", "fork"]) as t:
            t.wait(60)
        results[sites] = dict(zip(t.counts()["function"], t.counts()["calls"]))
        placement = {t.functions[i].name: how for i, how in t.placement.items()}
        if sites == "planned":
            assert placement["rand"].startswith("planned"), placement
            assert placement["getpid"].startswith("entry"), placement  # mov; syscall: no plan
        else:
            assert all(how.startswith("entry") for how in placement.values())
    assert results["planned"] == results["entry"] == {f: EXPECTED[f] for f in
                                                      ("rand", "getpid", "open", "strlen")}


def test_trace_shows_threads_fork_strings_and_errno(bpf, callers):
    r = keytrace("calls", "-e", "rand", "-e", "open", "-e", "strlen", "-s", "10", "-T",
                 "--", callers["pie"], "3", "threads", "fork")
    assert r.returncode == 0, r.stderr
    # as ltrace: the trace goes to standard error; standard output is the program's own
    assert r.stdout.startswith("done ") and "libc.so.6!" not in r.stdout, r.stdout
    lines = [ln for ln in r.stderr.splitlines() if ln[:1].isdigit()]  # then -T's histograms
    # a call another thread's call interrupted is two lines: unfinished, then resumed
    assert sum("libc.so.6!rand() = " in ln or "<... libc.so.6!rand resumed> ) = " in ln
               for ln in lines) == 12
    assert (sum("libc.so.6!rand( <unfinished ...>" in ln for ln in lines)
            == sum("<... libc.so.6!rand resumed>" in ln for ln in lines))
    assert "libc.so.6!rand: latency" in r.stderr
    pids = {ln.split()[0] for ln in lines}
    assert any("/" in p for p in pids), "thread calls are shown as PID/TID"
    assert len({p.split("/")[0] for p in pids}) == 2, "the forked child is followed"
    opened = [ln for ln in lines if "!open(" in ln]
    assert len(opened) == 3
    assert all('open("/nonexiste"..., 0) = -1 ENOENT (No such file or directory) <0.' in ln
               for ln in opened), opened
    assert any('strlen("' in ln and ") = " in ln for ln in lines)


def test_json_lines_and_files(bpf, callers, tmp_path):
    out = tmp_path / "calls.parquet"
    r = keytrace("calls", "--json", "-T", "-e", "open", "-o", str(out), "--", callers["nopie"], "2")
    assert r.returncode == 0, r.stderr
    rows = json_rows(r.stdout)
    assert len(rows) == 2
    assert rows[0]["function"] == "open" and rows[0]["args"][0].startswith("/nonexistent/")
    assert rows[0]["ret"] == -1 and rows[0]["errno"] == "ENOENT" and rows[0]["duration_ns"] > 0
    saved = pd.read_parquet(out)
    assert len(saved) == 2 and list(saved["function"]) == ["open", "open"]
    assert json.loads(saved["args"][0])[0].startswith('"/nonexistent/')
    table = tmp_path / "counts.csv"
    r = keytrace("calls", "-c", "-e", "rand", "-o", str(table), "--", callers["pie"], "5")
    assert r.returncode == 0, r.stderr
    assert pd.read_csv(table).set_index("function")["calls"].to_dict() == {"rand": 5}
    (line,) = [x for x in r.stderr.splitlines() if "libc.so.6!rand" in x]
    cells = [c.strip() for c in re.split(r"[│┃|]", line) if c.strip()]
    assert cells[0] == "5" and cells[-1] == "libc.so.6!rand", line


def test_latency_histograms_errors_and_stacks_in_the_kernel(bpf, callers):
    with CallTracer(["rand", "open"], command=[callers["pie"], str(N)], count=True, timing=True,
                    stacks=True) as t:
        t.wait(60)
    df = t.counts().set_index("function")
    assert df.loc["rand", "calls"] == N and df.loc["open", "calls"] == N
    assert df.loc["open", "errors"] == N and df.loc["rand", "errors"] == 0
    # times less the probes' share (rand's may come to 0: the share is most of a call of it)
    assert df.loc["open", "total_ns"] > 0 and (df["max_ns"] >= df["mean_ns"]).all()
    hist = t.histograms().groupby("function")["calls"].sum()
    assert hist["rand"] == N and hist["open"] == N
    stacks = t.stack_counts()
    assert stacks.groupby("function")["calls"].sum().to_dict() == {"open": N, "rand": N}
    assert stacks["stack"].str.len().gt(0).all()  # (named, or kept as addresses: test_calls_ltrace)


@pytest.mark.parametrize("pattern, message, code", [
    ("libsssl:SSL_read", "no library matches 'libsssl': did you mean", 1),
    ("mallocc", "no function in libc.so.6 matches 'mallocc': did you mean malloc", 1),
    ("libc:", "pattern 'libc:' has an empty function after ':'", 2),  # malformed: usage
])
def test_bad_patterns_are_one_line(pattern, message, code):
    r = keytrace("calls", "-c", "-e", pattern, "--", "true")
    assert r.returncode == code, r.stderr
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_no_pattern_on_the_whole_host_is_a_usage_error():
    r = keytrace("calls", "-c")
    assert r.returncode == 2 and "-e is needed to trace the whole host" in r.stderr, r.stderr


def test_a_process_with_a_copied_libc_in_its_own_mount_namespace(bpf, keymaker, bins, tmp_path):
    hidden = tmp_path / "nslib"
    hidden.mkdir()
    script = (f'mount -t tmpfs none {hidden} && cp /lib/x86_64-linux-gnu/libc.so.6 {hidden}/ '
              f'&& LD_LIBRARY_PATH={hidden} exec {bins["keymaker"]}')
    k = keymaker(["unshare", "--mount", "--propagation", "private", "sh", "-c", script])
    with CallTracer(["pthread_key_create", "pthread_key_delete"], pids=[k.pid], count=True) as t:
        # its libc is not at any path of ours: it is reached through the process's map_files
        assert {tg.path.startswith(f"/proc/{k.pid}/map_files/") for tg in t.targets} == {True}
        k.do("c 3")
        k.do("d 2")
    assert dict(zip(t.counts()["function"], t.counts()["calls"])) == {
        "pthread_key_create": 3, "pthread_key_delete": 2}


def test_main_of_a_process_whose_program_is_only_in_its_own_mount_namespace(bpf, keymaker, bins,
                                                                           tmp_path):
    """FUNC@MAIN with -p: the program is opened through the process's map_files, not by the
    path /proc/PID/exe shows (here a tmpfs mounted in its namespace only)."""
    hidden = tmp_path / "nsbin"
    hidden.mkdir()
    script = (f'mount -t tmpfs none {hidden} && cp {bins["keymaker"]} {hidden}/ '
              f'&& exec {hidden}/keymaker')
    k = keymaker(["unshare", "--mount", "--propagation", "private", "sh", "-c", script])
    assert not (hidden / "keymaker").exists()  # (not at that path for us)
    with CallTracer(["pthread_key_create@MAIN"], pids=[k.pid], count=True) as t:
        k.do("c 3")
    assert t.counts()["calls"].tolist() == [3]


def test_tracing_keeps_the_kernel_counters_too(bpf, callers):
    """Lines and the kernel's counts agree; -T's histograms hold every returned call."""
    with CallTracer(["rand", "open"], command=[callers["pie"], "20", "threads"], timing=True) as t:
        t.wait(60)
    lines = pd.Series([c["function"] for c in t.calls]).value_counts().to_dict()
    assert lines == {"rand": 60, "open": 20}
    df = t.counts().set_index("function")
    assert df["calls"].to_dict() == lines and df.loc["open", "errors"] == 20
    assert t.histograms().groupby("function")["calls"].sum().to_dict() == lines
    # every returned call timed, less the probes' share (clamped at 0: none is negative)
    assert all(c["duration_ns"] is not None and c["duration_ns"] >= 0 for c in t.calls)
    assert all(c["duration_ns"] > 0 for c in t.calls if c["function"] == "open")
