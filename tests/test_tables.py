"""The tables a process can run out of beyond pthread keys, read from /proc: by keytrace scan
--resource with no tracing, and by watch at each completed reload cycle. Counts are checked
against /proc itself, exactly; a library that leaks one of each per load shows N of each after N
loads, and 1 a cycle; healthy programs are not flagged; a process at its fd limit is critical; a
table not read says why, never 0."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pandas as pd
import pytest

from tracer import resources  # noqa: F401  (registers the resources)
from tracer import resource
from tracer.analysis.census import survey
from conftest import json_rows, keytrace, terminate

LOADS = 40


def wait_for(check, timeout=20.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


def soft(pid: int, title: str) -> int:
    for line in open(f"/proc/{pid}/limits"):
        if line.startswith(title):
            return int(line[len(title):].split()[0])
    raise AssertionError(title)


def start_leaker(reload_host: str, lib: str, data: str, loads: int = LOADS):
    """reload_host after `loads` loads of libeach, held alive for two minutes."""
    p = subprocess.Popen([reload_host, lib, str(loads), "0", "120"])
    wait_for(lambda: len(os.listdir(f"/proc/{p.pid}/task")) == loads + 1)
    wait_for(lambda: sum(os.readlink(f"/proc/{p.pid}/fd/{f}") == data
                         for f in os.listdir(f"/proc/{p.pid}/fd")) == loads)
    return p


@pytest.fixture(scope="module")
def leaker(bins, libeach):
    p = start_leaker(bins["reload_host"], *libeach)
    yield p, libeach[1]
    terminate(p)


def rows_of(pid: int, names="all") -> dict:
    r = keytrace("scan", "--json", "-r", names, "-p", str(pid))
    assert r.returncode == 0, r.stderr
    return {row["resource"]: row for row in json_rows(r.stdout)}


def test_a_library_leaking_one_of_each_per_load_shows_n_of_each(leaker):
    p, data = leaker
    rows = rows_of(p.pid)
    assert set(rows) == {"keys", "timers", "fds", "threads", "maps", "handlers", "tls"}
    assert all(r["status"] == "ok" for r in rows.values()), rows
    fds, threads, maps, timers = rows["fds"], rows["threads"], rows["maps"], rows["timers"]

    assert fds["in_use"] == len(os.listdir(f"/proc/{p.pid}/fd"))
    assert fds["owner"] == data and fds["owners"][data] == LOADS and fds["same_owner"] == LOADS
    assert fds["limit"] == soft(p.pid, "Max open files") and fds["limit_source"] == "RLIMIT_NOFILE"
    assert fds["headroom"] == fds["limit"] - fds["in_use"]
    assert fds["leaking"] and not fds["critical"] and f"{LOADS} fds held by one file" in fds["reason"]

    assert threads["in_use"] == len(os.listdir(f"/proc/{p.pid}/task")) == LOADS + 1
    assert threads["owner"] == "leaked" and threads["owners"]["leaked"] == LOADS
    assert not threads["leaking"]  # a count of threads alone is no leak: pools are healthy

    lines = open(f"/proc/{p.pid}/maps").read().splitlines()
    assert maps["in_use"] == len(lines)
    assert maps["owners"][data] == LOADS == sum(line.endswith(data) for line in lines)
    assert maps["limit"] == int(open("/proc/sys/vm/max_map_count").read())

    ids = [line for line in open(f"/proc/{p.pid}/timers") if line.startswith("ID:")]
    assert timers["in_use"] == len(ids) == LOADS and timers["owners"] == {"none": LOADS}
    used, limit = (int(x) for x in [line.split()[1] for line in open(f"/proc/{p.pid}/status")
                                    if line.startswith("SigQ:")][0].split("/"))
    assert timers["limit"] == limit and timers["headroom"] == limit - used

    assert rows["keys"]["in_use"] == 0 and not rows["keys"]["leaking"]

    # one fork handler a load, with no DSO handle: glibc keeps each after its unload, and the
    # next fork would run code that is gone (the exit handler is ld.so's _dl_fini)
    handlers = rows["handlers"]
    (gone,) = [o for o in handlers["owners"] if o.startswith("unmapped ")]
    assert gone.endswith(" (fork)") and handlers["owners"][gone] == LOADS
    assert handlers["in_use"] == LOADS + 1 and handlers["orphaned"] == LOADS
    assert handlers["critical"] and handlers["leaking"] and handlers["limit"] is None
    assert handlers["owner"] == gone and f"{LOADS} handlers orphaned" in handlers["reason"]


def test_a_forecast_dates_a_leaking_table_at_the_reload_rate_given(leaker):
    p, data = leaker
    r = keytrace("scan", "--json", "-r", "fds", "-p", str(p.pid), "--reloads-per-day", "10")
    row = json_rows(r.stdout)[0]
    assert row["per_day"] == 10.0 and row["days_left"] == pytest.approx(row["headroom"] / 10)
    assert row["exhaustion_eta"]


def test_the_table_shows_every_resource_and_the_verdict(leaker):
    p, data = leaker
    r = keytrace("scan", "-r", "fds,threads", "-p", str(p.pid))
    assert r.returncode == 0, r.stderr
    assert "LEAKING" in r.stdout and "RLIMIT_NOFILE" in r.stdout and "leaked (40)" in r.stdout


def test_a_process_at_its_fd_limit_is_critical(tmp_path):
    code = ("import resource, sys, time\n"
            "resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))\n"
            "held = []\n"
            "try:\n"
            "    while True: held.append(open('/dev/null'))\n"
            "except OSError as e: print(e.errno, flush=True)\n"
            "time.sleep(60)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "24"  # EMFILE
        row = rows_of(p.pid, "fds")["fds"]
        assert row["limit"] == 64 and row["in_use"] == 64 and row["headroom"] == 0
        assert row["critical"] and "0 of 64 fds left (RLIMIT_NOFILE)" in row["reason"]
        nulls = sum(os.readlink(f"/proc/{p.pid}/fd/{f}") == "/dev/null"
                    for f in os.listdir(f"/proc/{p.pid}/fd"))
        assert row["owner"] == "/dev/null" and row["owners"]["/dev/null"] == nulls > 30
    finally:
        terminate(p)


@pytest.mark.skipif(os.geteuid() != 0, reason="running as another user needs root (setpriv)")
def test_threads_of_a_user_bound_by_rlimit_nproc_count_every_thread_of_the_uid():
    p = subprocess.Popen(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
                          "prlimit", "--nproc=50:50", "sleep", "60"])
    try:
        wait_for(lambda: os.path.basename(os.readlink(f"/proc/{p.pid}/exe")) == "sleep")
        row = rows_of(p.pid, "threads")["threads"]
        mine = sum(int(s.split()[1]) for pid in os.listdir("/proc") if pid.isdigit()
                   for s in _status(pid) if s.startswith("Threads:")
                   if _uid(pid) == 65534)
        assert row["limit"] == 50 and row["limit_source"] == "RLIMIT_NPROC of uid 65534"
        assert row["headroom"] == 50 - mine and row["in_use"] == 1
    finally:
        terminate(p)


def _status(pid):
    try:
        return open(f"/proc/{pid}/status").read().splitlines()
    except OSError:
        return []


def _uid(pid):
    return next((int(s.split()[1]) for s in _status(pid) if s.startswith("Uid:")), None)


def test_healthy_programs_are_not_flagged():
    progs = [subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
             for argv in (["python3", "-c", "import threading, time; [threading.Thread("
                                            "target=time.sleep, args=(60,)).start() "
                                            "for _ in range(16)]"],
                          ["perl", "-e", "sleep 60"], ["sleep", "60"], ["cat"])]
    try:
        time.sleep(0.5)
        for p in progs:
            for row in rows_of(p.pid).values():
                assert row["status"] == "ok", row
                assert not row["leaking"] and not row["critical"], row
    finally:
        for p in progs:
            terminate(p)


@pytest.fixture(scope="module")
def handler_bins(tmp_path_factory):
    from tracer.workloads import compile_c
    from conftest import FIXTURES
    d = tmp_path_factory.mktemp("handlers")
    src = FIXTURES / "handlers.c"
    return str(compile_c(src, d)), str(compile_c(src, d, shared=True, extra=("-DLIB",)))


def _ready(argv):
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    return p


def test_every_fork_and_exit_handler_is_read_and_named(handler_bins):
    prog, lib = handler_bins
    p = _ready([prog])
    try:
        row = rows_of(p.pid, "handlers")["handlers"]
    finally:
        terminate(p)
    ld = os.path.realpath("/lib64/ld-linux-x86-64.so.2")
    assert row["status"] == "ok" and row["in_use"] == 7, row
    assert row["owners"] == {f"{prog} (exit)": 4, f"{prog} (fork)": 2, f"{ld} (exit)": 1}
    assert row["orphaned"] == 0 and not row["critical"] and not row["leaking"]


def test_an_exit_handler_left_by_an_unloaded_library_is_critical(handler_bins):
    prog, lib = handler_bins
    p = _ready([prog, lib])
    try:
        row = rows_of(p.pid, "handlers")["handlers"]
    finally:
        terminate(p)
    assert row["in_use"] == 8 and row["orphaned"] == 1 and row["critical"], row
    assert row["owner"].startswith("unmapped 0x") and row["owner"].endswith(" (exit)")
    assert "1 handler orphaned" in row["reason"]


@pytest.fixture(scope="module")
def statictls(tmp_path_factory):
    """(tlsreload, liba, libb): two modules with 256 and 64 bytes of initial-exec TLS, and a
    program that reloads them closing the first one first (glibc keeps its block each time)."""
    from tracer.workloads import compile_c
    from conftest import FIXTURES
    d = tmp_path_factory.mktemp("tls")
    lib = FIXTURES / "libstatictls.c"
    return (str(compile_c(FIXTURES / "tlsreload.c", d)),
            str(compile_c(lib, d, shared=True, name="liba_tls.so")),
            str(compile_c(lib, d, shared=True, extra=("-DBLOCK=64",), name="libb_tls.so")))


def _tls_after(statictls, loads: int):
    prog, a, b = statictls
    p = subprocess.Popen([prog, a, b, str(loads), "0", "60"], stdout=subprocess.PIPE, text=True)
    said = p.stdout.readline().strip()
    assert p.stdout.readline().strip() == "ready"
    try:
        return said, rows_of(p.pid, "tls")["tls"]
    finally:
        terminate(p)


def test_static_tls_kept_by_reloads_is_counted_and_the_last_load_that_fits_is_critical(
        statictls):
    from tracer.resources.tls import UNHELD
    prog, a, b = statictls
    # how many loads fit, told by glibc itself: the first that does not fails
    said = subprocess.run([prog, a, b, "1000"], capture_output=True, text=True).stdout
    failed = int(said.split()[1].rstrip(":"))
    assert said.startswith("failed") and "static TLS block" in said, said
    last = failed - 1
    said, row = _tls_after(statictls, last)
    assert said == f"loaded {last}" and row["status"] == "ok" and row["estimate"]
    # each load but the last left a's 256 bytes behind; the live blocks are a's and b's
    assert row["owners"][UNHELD] == 256 * (last - 1)
    assert row["owners"][a] == 256 and row["owners"][b] == 64
    assert row["headroom"] == row["limit"] - row["in_use"]
    assert 0 <= row["headroom"] < 256  # the next load fails, as glibc said
    assert row["critical"] and "at most" in row["reason"]
    said, row = _tls_after(statictls, 1)  # one load: the whole surplus but a's and b's
    assert row["headroom"] >= 256 * (last - 1) and not row["critical"]
    assert UNHELD not in row["owners"]


def test_a_table_not_read_says_why_and_counts_nothing():
    p = subprocess.Popen(["true"])
    p.wait()
    df = survey(resource.select(["fds", "threads", "maps", "timers", "keys"]), [p.pid])
    assert (df["status"] == "not read: exited").all(), df["status"].tolist()
    assert df["in_use"].isna().all() and df["headroom"].isna().all()
    if os.geteuid() != 0:
        return  # (what follows runs as another user: root's to do)
    # another user's process, read by one who may not
    r = subprocess.run(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
                        sys.executable, "-m", "tracer.cli", "scan", "--json", "-r", "fds,maps",
                        "-p", "1"], capture_output=True, text=True, cwd=os.getcwd())
    assert r.returncode == 0, r.stderr
    rows = json_rows(r.stdout)
    assert [row["status"] for row in rows] == ["not read: permission denied"] * 2
    assert all(row["in_use"] is None for row in rows)


def test_bad_resource_names_are_one_line_and_exit_2():
    r = keytrace("scan", "-r", "nonsense")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "keys, timers, fds, threads, maps, handlers, tls" in r.stderr
    r = keytrace("watch", "-r", "fds,nonsense", "-d", "1")
    assert r.returncode == 2 and "no resource 'nonsense'" in r.stderr


# --- watch --resource fds,threads,maps: the tables read at each completed reload cycle -------

def test_a_reloader_attached_mid_life_shows_what_each_cycle_leaves(bpf, bins, libeach):
    lib, data = libeach
    loads = 60
    # 100 ms between loads: still reloading when the watch attaches (6 s in all, of which a
    # first compile of the probes may take 2), then holding still
    p = subprocess.Popen([bins["reload_host"], lib, str(loads), "100000", "60"])
    try:
        wait_for(lambda: len(os.listdir(f"/proc/{p.pid}/task")) >= 6)
        r = keytrace("watch", "--json", "-r", "fds,threads,maps,timers,handlers", "-p", str(p.pid),
                     "-d", "9", "--reloads-per-day", "1")
        assert r.returncode == 0, r.stderr
        wait_for(lambda: len(os.listdir(f"/proc/{p.pid}/task")) == loads + 1)
        rows = {row["resource"]: row for row in json_rows(r.stdout) if row["pid"] == p.pid}
        fds, threads, maps = rows["fds"], rows["threads"], rows["maps"]
        # everything held, made before the attach too, exactly as /proc shows it now
        assert fds["in_use"] == len(os.listdir(f"/proc/{p.pid}/fd"))
        assert threads["in_use"] == loads + 1
        assert maps["in_use"] == len(open(f"/proc/{p.pid}/maps").read().splitlines())
        assert fds["held"] < fds["in_use"]  # the first read, at the attach, held some already
        # the cycles traced: those after the attach (one in flight then may count or not)
        assert fds["reload_cycles"] == threads["reload_cycles"]
        assert abs(fds["reload_cycles"] - (loads - (threads["held"] - 1))) <= 1
        # one fd, one thread, and three mappings (a thread's stack and its guard page, the
        # file) each cycle; the owner that grew, and the library reloaded
        assert (fds["per_cycle"], threads["per_cycle"], maps["per_cycle"]) == (1.0, 1.0, 3.0)
        assert (fds["owner"], threads["owner"], maps["owner"]) == (data, "leaked", "[anon]")
        assert fds["library"] == threads["library"] == lib
        assert fds["leaking"] and threads["leaking"] and maps["leaking"]
        assert fds["limit_source"] == "RLIMIT_NOFILE"
        # dated at one reload a day and one fd a cycle
        assert fds["days_left"] == pytest.approx(fds["headroom"], abs=1)
        assert "1 a cycle" in fds["reason"] and data in fds["reason"]
        # timers are traced: the ones made before the attach come from /proc/PID/timers
        assert rows["timers"]["in_use"] == loads
        # a fork handler each load, left behind: critical, named by the library traced there
        handlers = rows["handlers"]
        assert handlers["in_use"] == loads + 1 and handlers["orphaned"] == loads
        assert handlers["per_cycle"] == 1.0 and handlers["owner"] == f"{lib} (fork)"
        assert handlers["critical"] and "handlers orphaned" in handlers["reason"]
    finally:
        terminate(p)


def test_a_tidy_reloader_is_not_flagged_on_any_table(bpf, bins, libeach_tidy):
    r = keytrace("watch", "--json", "-r", "all", "--", bins["reload_host"], libeach_tidy, "20",
                 "20000")
    assert r.returncode == 0, r.stderr
    rows = [row for row in json_rows(r.stdout) if row["comm"].startswith("reload_host")]
    assert {row["resource"] for row in rows} >= {"keys", "timers", "fds", "threads", "maps",
                                                 "handlers", "tls"}
    for row in rows:
        assert not row["leaking"] and not row["critical"], row
    by = {row["resource"]: row for row in rows}
    assert by["fds"]["reload_cycles"] == 20 and by["fds"]["per_cycle"] == 0.0


def test_static_tls_kept_at_each_reload_is_what_each_cycle_leaves(bpf, statictls):
    from tracer.resources.tls import UNHELD
    prog, a, b = statictls
    r = keytrace("watch", "--json", "-r", "tls", "--", prog, a, b, "6", "100000", "1")
    assert r.returncode == 0, r.stderr
    (row,) = [x for x in json_rows(r.stdout.replace("ready\n", "").replace("loaded 6\n", ""))
              if x["comm"] == "tlsreload"]
    assert row["per_cycle"] == 256.0 and row["owner"] == UNHELD and row["estimate"]
    assert row["library"] in (a, b) and row["reload_cycles"] == 5
    assert row["leaking"] and row["critical"] and row["headroom"] < 256


def test_the_table_of_a_sampled_resource_names_what_grows(bpf, bins, libeach):
    lib, data = libeach
    r = keytrace("watch", "-r", "fds", "--", bins["reload_host"], lib, "10", "20000", "1")
    assert r.returncode == 0, r.stderr
    assert "fds per process, read at each reload cycle" in r.stdout
    assert "LEAKING" in r.stdout and "libeach.so" in r.stdout


def test_the_reads_are_saved_with_the_ledger_and_replayed(bpf, bins, libeach, tmp_path):
    lib, data = libeach
    saved = tmp_path / "each.parquet"
    r = keytrace("watch", "--json", "-r", "fds,threads", "-o", str(saved), "--",
                 bins["reload_host"], lib, "10", "20000", "1")
    assert r.returncode == 0, r.stderr
    live = {row["resource"]: row for row in json_rows(r.stdout)}
    r = keytrace("report", "--json", str(saved))
    assert r.returncode == 0, r.stderr
    replayed = {row["resource"]: row for row in json_rows(r.stdout)}
    for name in ("fds", "threads"):
        assert replayed[name] == live[name]
    assert live["fds"]["per_cycle"] == 1.0 and live["fds"]["owner"] == data


def test_a_name_cut_mid_character_is_read(tmp_path):
    # comm keeps 15 bytes: this name is cut inside a two-byte character
    odd = tmp_path / "xданные-сервер"
    odd.write_bytes(open("/bin/sleep", "rb").read())
    odd.chmod(0o755)
    p = subprocess.Popen([str(odd), "60"])
    try:
        wait_for(lambda: os.readlink(f"/proc/{p.pid}/exe") == str(odd))
        rows = rows_of(p.pid)
        assert all(r["status"] == "ok" for r in rows.values()), rows
        assert "\ufffd" in rows["threads"]["owner"] and rows["threads"]["in_use"] == 1
    finally:
        terminate(p)


def test_an_unlimited_signal_queue_binds_nothing(monkeypatch):
    # (raising RLIMIT_SIGPENDING's hard limit takes CAP_SYS_RESOURCE, which a test may lack)
    from tracer.host import tables
    real = tables.status
    monkeypatch.setattr(tables, "status", lambda pid, cache=None: dict(
        real(pid, cache), SigQ="3/18446744073709551615"))
    (row,) = survey(resource.select(["timers"]), [os.getpid()]).to_dict(orient="records")
    assert row["status"] == "ok" and pd.isna(row["limit"]) and pd.isna(row["headroom"])
    assert row["limit_source"].startswith("none") and not row["critical"]


def test_the_phase_of_reload_cycles_a_table_is_read_in():
    from tracer.state.modules import Modules
    m, ids = Modules(), iter(range(100, 200))

    def load(path, base, t, name=None):  # name: the dlopen's argument
        n = next(ids)
        m.begin(n, t)
        assert m.phase(t) is None  # a dlopen in flight
        m.dlopen(n, name or path, 1, t)
        m.map(path, base, n, t)

    m.map("/lib/libc.so.6", 0x1000, 0, 1)  # mapped at first sight, then dlopened for good:
    load("/lib/libc.so.6", 0x1000, 2, name="libc.so.6")  # not a library that cycles
    load("/a", 0xA000, 3)
    load("/b", 0xB000, 3)
    assert m.phase(4) == "loaded"
    m.unmap(0xA000, 5)
    assert m.phase(6) is None  # a restart half done: not a moment to read
    m.unmap(0xB000, 7)
    assert m.phase(8) == "unloaded" and m.cycles() == 1
    load("/a", 0xA000, 9)
    assert m.phase(10) is None
    load("/b", 0xB000, 11)
    assert m.phase(12) == "loaded"
    m.loading[999] = 13  # a dlopen whose return record was lost holds it for LOADING_NS only
    assert m.phase(14) is None and m.phase(13 + 11 * 10**9) == "loaded"
