"""User-defined pairs (`watch --pair`) through the same ledger as pthread keys, on real probes and
real fixtures: exact counts, orphans, what each reload cycle leaves, the library named, a tidy
pair not flagged, a process met mid-life whose earlier handles are said to be unknown, and bad
specs refused before anything is attached."""
from __future__ import annotations

import subprocess
import time

import pytest

from tracer import KeyTracer
from tracer.workloads import compile_c

from conftest import FIXTURES, json_rows, keytrace

FOPEN = "libc:fopen=ret/fclose=arg0"
TIMER = "libc:timer_create=*arg2/timer_delete=arg0"
KEYS_BY_HAND = "libc:pthread_key_create=*arg0/pthread_key_delete=arg0"


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    d = tmp_path_factory.mktemp("pairs")
    return {"fopens": str(compile_c(FIXTURES / "fopens.c", d)),
            "libtimer": str(compile_c(FIXTURES / "libtimer.c", d, shared=True)),
            "libtimertidy": str(compile_c(FIXTURES / "libtimer.c", d, shared=True,
                                          extra=("-DTIDY",), name="libtimertidy.so"))}


def rows_of(stdout: str, resource: str) -> list:
    return [r for r in json_rows(stdout) if r.get("resource") == resource]


@pytest.mark.parametrize("spec", [FOPEN, "libc*:fopen*=ret/fclose=arg0"])
def test_a_program_that_fopens_30_and_fcloses_10_keeps_20(bpf, fx, spec):
    r = keytrace("watch", "--json", "--pair", spec, "--", "sh", "-c",
                 f"{fx['fopens']} 30 10 20 >/dev/null")
    assert r.returncode == 0, r.stderr
    (row,) = [x for x in json_rows(r.stdout) if x["resource"].endswith("/fclose")]
    assert (row["acquires"], row["releases"], row["in_use"]) == (30, 10, 20)
    assert row["leaking"] and row["library"] == fx["fopens"], row
    assert row["limit"] is None and row["days_left"] is None  # no --limit: no date, and said so
    assert "no limit" in row["reason"]
    # pthread keys' own rows are as they were: the program made none
    assert not [k for k in rows_of(r.stdout, "keys") if k["creates"]]


def test_a_timer_leaked_per_load_is_orphaned_named_and_dated(bpf, fx, bins):
    r = keytrace("watch", "--json", "--pair", TIMER, "--limit", "1000", "--reloads-per-day", "1",
                 "--", bins["reload_host"], fx["libtimer"], "20", "20000")
    assert r.returncode == 0, r.stderr
    (row,) = rows_of(r.stdout, "timer_create/timer_delete")
    assert (row["acquires"], row["releases"], row["in_use"], row["orphaned"]) == (20, 0, 20, 20)
    assert row["per_cycle"] == 1.0 and row["library"] == fx["libtimer"]
    assert row["leaking"] and row["days_left"] == pytest.approx(1000 - 20)


def test_a_saved_pair_ledger_reports_as_it_was_traced_and_takes_another_limit(bpf, fx, bins,
                                                                             tmp_path):
    saved = tmp_path / "timers.parquet"
    r = keytrace("watch", "--json", "--pair", TIMER, "--limit", "1000", "--reloads-per-day", "1",
                 "-o", str(saved), "--", bins["reload_host"], fx["libtimer"], "5", "20000")
    assert r.returncode == 0, r.stderr
    (live,) = rows_of(r.stdout, "timer_create/timer_delete")
    again = keytrace("report", str(saved), "--json", "--reloads-per-day", "1")
    assert again.returncode == 0, again.stderr
    (read,) = rows_of(again.stdout, "timer_create/timer_delete")
    same = ("acquires", "in_use", "orphaned", "per_cycle", "limit", "days_left", "reason")
    assert {k: read[k] for k in same} == {k: live[k] for k in same}
    assert read["limit"] == 1000 and read["days_left"] == pytest.approx(1000 - 5)
    what_if = keytrace("report", str(saved), "--json", "--reloads-per-day", "1", "--limit", "100")
    (row,) = rows_of(what_if.stdout, "timer_create/timer_delete")
    assert row["limit"] == 100 and row["days_left"] == pytest.approx(100 - 5)
    (keys,) = [k for k in rows_of(what_if.stdout, "keys") if k["pid"] == row["pid"]]
    assert keys["limit"] == 1024  # --limit is the pair's; keys keep their C library's


def test_limit_without_a_pair_is_a_usage_error():
    r = keytrace("watch", "--limit", "10", "--", "true")
    assert r.returncode == 2 and "--limit is the limit of --pair handles" in r.stderr, r.stderr


def test_a_tidy_pair_is_not_flagged(bpf, fx, bins):
    r = keytrace("watch", "--json", "--fail-on-leak", "--pair", TIMER, "--",
                 bins["reload_host"], fx["libtimertidy"], "10", "20000")
    assert r.returncode == 0, r.stderr
    (row,) = rows_of(r.stdout, "timer_create/timer_delete")
    assert (row["acquires"], row["releases"], row["in_use"], row["leaking"]) == (10, 10, 0, False)


def test_keys_written_as_a_pair_count_what_the_keys_resource_counts(bpf, bins):
    r = keytrace("watch", "--json", "--pair", KEYS_BY_HAND, "--", bins["reload_host"],
                 bins["libleaky"], "7")
    assert r.returncode == 0, r.stderr
    (keys,) = rows_of(r.stdout, "keys")
    (pair,) = rows_of(r.stdout, "pthread_key_create/pthread_key_delete")
    assert (pair["acquires"], pair["in_use"], pair["orphaned"]) == (keys["creates"],
                                                                     keys["live_keys"],
                                                                     keys["orphaned_keys"]) == (7, 7, 7)


def test_a_process_met_mid_life_says_its_earlier_handles_are_unknown(bpf, fx):
    p = subprocess.Popen([fx["fopens"]], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"

        def do(cmd):
            p.stdin.write(cmd + "\n")
            p.stdin.flush()
            return p.stdout.readline().split()
        assert do("o 5 0") == ["ok", "5"]  # before the attach: not traced, not invented
        with KeyTracer(pids=[p.pid], pairs=[FOPEN], keep_events=False) as t:
            assert do("o 6 20") == ["ok", "11"]
            assert do("c 2") == ["ok", "9"]  # two of the earlier five
            time.sleep(0.1)
        s = t.ledger.summary(resource="fopen/fclose")
        row = s[s.pid == p.pid].iloc[0]
    finally:
        p.kill()
        p.wait()
    assert (row.acquires, row.releases, row.in_use) == (6, 2, 6)
    import pandas as pd
    assert row.table.startswith("not read") and pd.isna(row.headroom)
    assert "made before tracing are not counted" in row.reason


@pytest.mark.parametrize("spec, message", [
    ("libc:fopen", "no release"),
    ("libc:/fclose=arg0", "no acquire"),
    ("libc:fopen=ret/fclose=arg7", "out of range"),
    ("libc:fopen=result/fclose=arg0", "none of ret, argN, *argN"),
    ("libc:fopen=ret/fclose=ret", "a release takes its handle as an argument"),
    ("libc:fopenn=ret/fclose=arg0", "did you mean fopen"),
])
def test_a_bad_pair_is_one_line_and_exit_2_before_anything_is_attached(spec, message):
    r = keytrace("watch", "--pair", spec, "--", "true")
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "probes attached" not in r.stderr
