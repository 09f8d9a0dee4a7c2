"""Resources keytrace knows beyond pthread keys (tracer/resources/), chosen with --resource, on
real probes and real fixtures: POSIX timers leaked per load, counted, orphaned, named and dated
against the process's RLIMIT_SIGPENDING; a process met mid-life starts from its live table
(/proc/PID/timers); a name keytrace does not know is one line and exit 2."""
from __future__ import annotations

import subprocess
import time

import pytest

from tracer import KeyTracer
from tracer.workloads import compile_c

from conftest import FIXTURES, json_rows, keytrace


def sigpending() -> int:
    for line in open("/proc/self/limits"):
        if line.startswith("Max pending signals"):
            return int(line.split()[3])
    raise AssertionError("no RLIMIT_SIGPENDING in /proc/self/limits")


@pytest.fixture(scope="module")
def libtimer(tmp_path_factory):
    return str(compile_c(FIXTURES / "libtimer.c", tmp_path_factory.mktemp("timers"), shared=True))


def test_a_timer_leaked_per_load_is_counted_orphaned_named_and_dated(bpf, bins, libtimer):
    r = keytrace("watch", "--json", "--resource", "timers", "--reloads-per-day", "1", "--",
                 bins["reload_host"], libtimer, "20", "20000")
    assert r.returncode == 0, r.stderr
    rows = json_rows(r.stdout)
    assert {x["resource"] for x in rows} == {"timers"}  # only what was asked for
    (row,) = rows
    assert (row["acquires"], row["releases"], row["in_use"], row["orphaned"]) == (20, 0, 20, 20)
    assert row["per_cycle"] == 1.0 and row["library"] == libtimer and row["leaking"]
    assert row["limit"] == sigpending()  # the launched command inherits keytrace's
    assert row["days_left"] == pytest.approx(sigpending() - 20)
    assert "20 timers orphaned" in row["reason"]


def test_all_resources_judge_keys_and_timers_side_by_side(bpf, bins, libtimer):
    r = keytrace("watch", "--json", "-r", "all", "--", bins["reload_host"],
                 f"{bins['libleaky']}:{libtimer}", "5", "20000")
    assert r.returncode == 0, r.stderr
    by = {x["resource"]: x for x in json_rows(r.stdout)}
    assert (by["keys"]["creates"], by["keys"]["orphaned_keys"]) == (5, 5)
    assert (by["timers"]["acquires"], by["timers"]["orphaned"]) == (5, 5)
    assert by["keys"]["library"] == bins["libleaky"] and by["timers"]["library"] == libtimer


def test_timers_made_before_the_attach_are_read_from_the_live_table(bpf, bins, libtimer):
    p = subprocess.Popen([bins["reload_host"], libtimer, "3", "1000", "30"])
    try:
        time.sleep(0.5)  # its three loads done, it holds three timers, orphaned
        with KeyTracer(pids=[p.pid], resources=["timers"], keep_events=False) as t:
            time.sleep(0.2)
        s = t.ledger.summary(resource="timers")
        row = s[s.pid == p.pid].iloc[0]
    finally:
        p.kill()
        p.wait()
    assert row.table == "read" and (row.in_use, row.held, row.acquires) == (3, 3, 0)
    assert int(row.headroom) == row.limit - 3


def test_an_unknown_resource_is_one_line_and_exit_2():
    r = keytrace("watch", "--resource", "keys,sockets", "--", "true")
    assert r.returncode == 2, r.stderr
    assert "no resource 'sockets'" in r.stderr and "keys, timers" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "probes attached" not in r.stderr
