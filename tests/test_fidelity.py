"""One model of each key table, on real probes: the live table read when a process is met is the
state traced events are deltas on; verdicts flag what will run out, not what made a key."""
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from conftest import json_rows, keytrace, told
from tracer.analysis.scan import scan
from tracer.session import KeyTracer

pytestmark = pytest.mark.usefixtures("bpf")


def row_of(ledger, pid, **kw):
    s = ledger.summary(**kw)
    (row,) = s[s.pid == pid].to_dict(orient="records")
    return row


def test_a_daemon_attached_mid_life_is_judged_on_all_its_keys(keymaker, bins):
    k = keymaker()
    startup, before, during = 2, 15, 5
    k.do(f"c {startup}")  # its own start-up keys
    for _ in range(before):  # reloads before the attach: the same address every time
        assert k.do(f"r {bins['libleaky']}")[0] == "ok"
    with KeyTracer(pids=[k.pid]) as t:
        for _ in range(during):
            k.do(f"r {bins['libleaky']}")
        time.sleep(0.05)
    row = row_of(t.ledger, k.pid, reloads_per_day=1)
    in_use = startup + before + during
    assert (row["live_keys"], row["headroom"], row["held_keys"]) == (in_use, 1024 - in_use,
                                                                      startup + before)
    assert row["table"] == "read" and row["exe"] == bins["keymaker"] and row["leaking"]
    # Each completed traced reload left its key (the instance loaded now holds one, not left).
    assert (row["leak_per_reload"], row["reload_cycles"]) == (1.0, during - 1)
    assert row["days_left"] == pytest.approx(1024 - in_use)  # one reload a day: reloads left
    # The pre-attach instance was unmapped by the first traced reload: its keys are orphaned.
    assert row["orphaned_keys"] == before + during - 1

    (live,) = scan([k.pid], reloads_per_day=1).to_dict(orient="records")
    assert (live["keys_in_use"], live["headroom"], live["leaking"]) == (in_use, 1024 - in_use, True)
    assert live["same_destructor_keys"] == before + during
    assert live["days_left"] == pytest.approx(row["days_left"])
    assert abs(live["exhaustion_eta"] - row["exhaustion_eta"]) < pd.Timedelta(minutes=1)


def test_a_balanced_reloader_is_not_leaking(keymaker, bins):
    k = keymaker()
    with KeyTracer(pids=[k.pid]) as t:
        for _ in range(6):
            assert k.do(f"r {bins['libbalanced']}")[0] == "ok"
        time.sleep(0.05)
    row = row_of(t.ledger, k.pid, reloads_per_day=1)
    assert (row["creates"], row["deletes"], row["live_keys"]) == (18, 15, 3)
    assert (row["leak_per_reload"], row["leaking"], row["days_left"]) == (0.0, False, None)
    assert pd.isna(row["exhaustion_eta"]) and row["reason"] == ""
    (reload,) = t.ledger.reloads().to_dict(orient="records")
    assert reload["finding"] == "loads of libbalanced.so leave no key"


def test_a_per_request_leak_is_flagged(keymaker):
    k = keymaker()
    with KeyTracer(pids=[k.pid]) as t:
        for _ in range(4):
            k.do("c 1")  # one key per "request", never deleted
            time.sleep(0.15)  # requests apart: each key its own occasion (OCCASION_NS)
    row = row_of(t.ledger, k.pid)
    assert (row["live_keys"], row["same_path_keys"], row["leaking"]) == (4, 4, True)
    assert "keymaker!main+0x" in row["busiest_path"]


def healthy_workload(bins, leaky: bool) -> str:
    script = [f"{sys.executable} -c 'import ssl, json, sqlite3'", "/usr/bin/python3 -c 'import threading'",
              "perl -e 1", "php -r 'echo 1;'", bins["onekey"], f"{bins['reload_host']} {bins['libnodelete']} 5"]
    if leaky:
        script.append(f"{bins['reload_host']} {bins['libleaky']} 12")
    return "; ".join(script * 2)


@pytest.mark.parametrize("leaky", [True, False])
def test_a_healthy_host_flags_only_the_leaky_reloader(bins, leaky):
    proc = subprocess.Popen([sys.executable, "-m", "tracer.cli", "watch", "--json", "--fail-on-leak"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "tracing the whole host" in told(proc.stderr)
        subprocess.run(["sh", "-c", healthy_workload(bins, leaky)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # the workload has ended, whatever it took: the watch stops now (no fixed window)
        proc.send_signal(signal.SIGTERM)
        out, errs = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    rows = json_rows(out)
    flagged = [(r["comm"], r["reason"]) for r in rows if r["leaking"]]
    ran = {r["comm"] for r in rows}
    assert {"python3", "perl", "php", "onekey", "reload_host"} <= ran, (ran, errs)
    if leaky:
        assert proc.returncode == 3, errs
        assert {r["exe"] for r in rows if r["leaking"]} == {bins["reload_host"]}, flagged
        bad = [r for r in rows if r["leaking"]]
        assert len(bad) == 2  # the workload runs twice
        assert all(r["live_keys"] == 12 and r["library"] == bins["libleaky"] for r in bad)
    else:
        assert proc.returncode == 0 and flagged == [], flagged
    nodelete = [r for r in rows if r["library"] == bins["libnodelete"]]
    assert nodelete and all(not r["leaking"] and r["live_keys"] == 1 for r in nodelete)
    onekey = [r for r in rows if r["comm"] == "onekey"]  # run twice, a key each, kept
    assert len(onekey) == 2 and all(r["never_deleted"] and r["live_keys"] == 1 for r in onekey)


def test_a_copied_libc_in_a_private_namespace_started_after_the_watch(keymaker, bins, tmp_path):
    hidden = tmp_path / "nslib"
    hidden.mkdir()
    script = (f'mount -t tmpfs none {hidden} && cp /lib/x86_64-linux-gnu/libc.so.6 {hidden}/ '
              f'&& LD_LIBRARY_PATH={hidden} exec {bins["keymaker"]}')
    with KeyTracer() as t:
        k = keymaker(["unshare", "--mount", "--propagation", "private", "sh", "-c", script])
        k.do("c 2")  # perhaps before its libc is probed: the table read at the probing counts it
        deadline = time.monotonic() + 5
        while not any(f"pid {k.pid}" in n for n in t.notes) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert any(f"pid {k.pid}" in n and "map_files" in n for n in t.notes), t.notes
        k.do("c 3")  # surely traced
        time.sleep(0.05)
        row = row_of(t.ledger, k.pid)
    assert row["live_keys"] == 5 and row["creates"] >= 3 and row["exe"] == bins["keymaker"]
    assert row["traced_since"] > row["start"]


def test_musl_gets_its_own_limit(bins):
    with KeyTracer(command=["sh", "-c", f'printf "c 3\\nq\\n" | {bins["keymaker_musl"]}']) as t:
        t.wait()
    s = t.ledger.summary()
    (row,) = s[s.exe == bins["keymaker_musl"]].to_dict(orient="records")
    assert (row["limit"], row["live_keys"], row["headroom"]) == (128, 3, 125)


def test_a_static_glibc_program_is_traced(keymaker, bins):
    # Launched: probed in the executable itself before it runs.
    with KeyTracer(command=[bins["onekey_static"]]) as t:
        t.wait()
    (row,) = t.ledger.summary().to_dict(orient="records")
    assert (row["creates"], row["live_keys"], row["leaking"]) == (1, 1, False)
    # Started after a host-wide watch: found at its exec.
    with KeyTracer() as t:
        k = keymaker([bins["keymaker_static"]])
        deadline = time.monotonic() + 5
        while not any(f"pid {k.pid}" in n for n in t.notes) and time.monotonic() < deadline:
            time.sleep(0.05)
        k.do("c 4")
        time.sleep(0.05)
        row = row_of(t.ledger, k.pid)
    assert (row["creates"], row["live_keys"], row["limit"]) == (4, 4, 1024)


def test_a_stripped_static_program_is_named_not_silently_missed(bins, tmp_path):
    stripped = tmp_path / "keymaker-stripped"
    subprocess.run(["strip", "-o", str(stripped), bins["keymaker_static"]], check=True)
    res = keytrace("watch", "--json", "--", "sh", "-c", f'echo q | {stripped}')
    assert res.returncode == 0, res.stderr
    assert f"({stripped}): statically linked without symbols" in res.stderr


def test_a_process_that_dies_of_eagain_keeps_what_it_had(bins):
    proc = subprocess.Popen([sys.executable, "-m", "tracer.cli", "watch", "--json", "-d", "6"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "tracing the whole host" in told(proc.stderr)
        died = subprocess.run([bins["reload_host"], bins["libleaky"], "0"], capture_output=True)
        assert died.returncode == 2  # until glibc refused a key
        out, errs = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    (row,) = [r for r in json_rows(out) if r["exe"] == bins["reload_host"]]
    assert (row["alive"], row["critical"], row["live_keys"], row["headroom"]) == (False, True, 1024, 0)
    assert row["library"] == bins["libleaky"] and row["days_left"] == 0


def test_bad_input_is_caught_before_tracing(tmp_path):
    started = time.monotonic()
    res = keytrace("watch", "-o", "/nonexistent/dir/x.parquet", "--", "true")
    assert res.returncode == 1 and "no such directory" in res.stderr
    assert "probes attached" not in res.stderr and time.monotonic() - started < 20
    res = keytrace("report", "--by", "nonsense", str(tmp_path / "x.parquet"))
    assert res.returncode == 2 and "--by takes one of" in res.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to nobody needs root")
def test_doctor_as_nobody_lists_every_check_with_its_fix():
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"]
    probe = subprocess.run([*nobody, sys.executable, "-c", "import tracer.cli"], capture_output=True, cwd="/")
    # Where nobody cannot read this checkout, stay uid 0 without a capability: the same checks fail.
    drop = nobody if probe.returncode == 0 else ["setpriv", "--bounding-set=-all", "--inh-caps=-all"]
    res = subprocess.run([*drop, sys.executable, "-m", "tracer.cli", "doctor"], capture_output=True,
                         text=True, cwd="/", env={**os.environ, "HOME": "/", "COLUMNS": "200"})
    assert "Traceback" not in res.stderr + res.stdout, res.stderr
    assert res.returncode == 1 and "privileges" in res.stdout and "FAIL" in res.stdout
    assert "run as root" in res.stdout
