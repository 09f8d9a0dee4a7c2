"""keytrace scan: the live key table read through /proc/PID/mem, checked against processes
that make exactly known numbers of keys."""
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import json_rows, keytrace
from tracer.analysis.scan import scan, scan_pid
from tracer.session import KeyTracer
from tracer.workloads import compile_c

FIXTURES = Path(__file__).parent / "fixtures"


def in_use(pid):
    (row,) = scan([pid]).to_dict(orient="records")
    assert row["status"] == "ok", row
    return row


def test_keys_in_use_move_by_exactly_what_the_process_made(keymaker):
    k = keymaker()
    before = in_use(k.pid)
    assert before["limit"] == 1024 and before["libc"].endswith("libc.so.6")
    total = before["keys_in_use"]
    for n in (0, 1, 500):
        assert k.do(f"c {n}")[0] == "ok"
        total += n
        assert in_use(k.pid)["keys_in_use"] == total
    assert k.do("d 200")[0] == "ok"
    assert in_use(k.pid)["keys_in_use"] == total - 200
    # Until glibc refuses: the whole table.
    assert k.do("c 2000") == ["err", "11"]
    row = in_use(k.pid)
    assert (row["keys_in_use"], row["headroom"], row["orphaned_keys"]) == (1024, 0, 0)


def test_cli_json_for_one_pid(keymaker):
    k = keymaker()
    k.do("c 7")
    res = keytrace("scan", "--pid", str(k.pid), "--json")
    assert res.returncode == 0, res.stderr
    (row,) = json_rows(res.stdout)
    assert (row["pid"], row["keys_in_use"], row["limit"], row["status"]) == (k.pid, 7, 1024, "ok")


def test_a_dlclosed_leaky_library_leaves_an_orphaned_key(keymaker, bins):
    k = keymaker()
    k.do("c 2")
    assert k.do(f"l {bins['libleaky']}")[0] == "ok"
    res = keytrace("scan", "--pid", str(k.pid), "--json", "--reloads-per-day", "1")
    (row,) = json_rows(res.stdout)
    assert (row["keys_in_use"], row["orphaned_keys"]) == (3, 1)
    (unmapped,) = [d for d in row["destructors"] if d.endswith("(unmapped)")]
    assert row["destructors"][unmapped] == 1
    # With a reload rate, a leaking process gets a date: 1021 keys left at 1 a day.
    assert row["days_left"] == pytest.approx(1021) and row["exhaustion_eta"]


def test_destructors_are_named_by_module_and_symbol(keymaker, bins):
    k = keymaker()
    assert k.do(f"L {bins['libb']}")[0] == "ok"  # loaded and kept: its key's destructor is mapped
    row = in_use(k.pid)
    assert row["destructors"] == {"libb.so!destroy+0x0": 1}
    assert row["library"] == bins["libb"] and row["orphaned_keys"] == 0


def test_watch_and_scan_agree(keymaker, bpf):
    k = keymaker()
    with KeyTracer(pids=[k.pid]) as t:
        k.do("c 9")
        k.do("d 4")
        k.do("c 2")
        time.sleep(0.05)
    (summary,) = t.ledger.summary().to_dict(orient="records")
    assert summary["live_keys"] == in_use(k.pid)["keys_in_use"] == 7


def test_static_executable(keymaker, tmp_path):
    static = compile_c(FIXTURES / "keymaker.c", tmp_path, extra=("-static",), name="keymaker-static")
    k = keymaker([str(static)])
    k.do("c 5")
    row = in_use(k.pid)
    assert row["libc"] == str(static) and row["keys_in_use"] == 5 and row["limit"] == 1024


@pytest.mark.skipif(os.geteuid() != 0, reason="chroot needs root")
def test_a_chrooted_process_with_its_own_libc(keymaker, bins, tmp_path):
    root = tmp_path / "root"
    (root / "chrootlib").mkdir(parents=True)
    (root / "lib64").mkdir()
    shutil.copy("/lib/x86_64-linux-gnu/libc.so.6", root / "chrootlib" / "libc.so.6")
    shutil.copy("/lib64/ld-linux-x86-64.so.2", root / "lib64" / "ld-linux-x86-64.so.2")
    shutil.copy(bins["keymaker"], root / "keymaker")
    k = keymaker([shutil.which("chroot") or "/usr/sbin/chroot", str(root), "/keymaker"],
                 env={**os.environ, "LD_LIBRARY_PATH": "/chrootlib"})
    k.do("c 11")
    row = in_use(k.pid)
    assert row["libc"].endswith("/chrootlib/libc.so.6") and row["keys_in_use"] == 11


@pytest.fixture
def namespaced_keymaker(keymaker, bins, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("a mount namespace of its own needs root (unshare --mount)")
    """A keymaker whose libc is a copy on a tmpfs mounted only inside its own mount namespace:
    from here that path leads to an empty directory, only /proc/PID/map_files reaches it."""
    hidden = tmp_path / "nslib"
    hidden.mkdir()
    script = (f'mount -t tmpfs none {hidden} && cp /lib/x86_64-linux-gnu/libc.so.6 {hidden}/ '
              f'&& LD_LIBRARY_PATH={hidden} exec {bins["keymaker"]}')
    k = keymaker(["unshare", "--mount", "--propagation", "private", "sh", "-c", script])
    assert not list(hidden.iterdir())
    return k, hidden


def test_a_private_mount_namespace_with_its_own_libc(namespaced_keymaker):
    k, hidden = namespaced_keymaker
    k.do("c 13")
    row = in_use(k.pid)
    assert row["libc"] == f"{hidden}/libc.so.6" and row["keys_in_use"] == 13


def test_a_process_exiting_mid_scan():
    p = subprocess.Popen(["true"])
    # exited, not yet reaped (a zombie): what a scan meets when a process ends under it
    deadline = time.monotonic() + 10
    while open(f"/proc/{p.pid}/stat").read().rpartition(")")[2].split()[0] != "Z":
        assert time.monotonic() < deadline, "true did not exit"
        time.sleep(0.01)
    assert scan_pid(p.pid)["status"] == "exited"
    p.wait()
    assert scan_pid(p.pid)["status"] == "exited"  # and once it is gone altogether


def test_kernel_threads_are_skipped_with_a_status():
    row = scan_pid(2)  # kthreadd
    assert row["status"] == "kernel thread" and row["keys_in_use"] is None


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to nobody needs root")
def test_an_unprivileged_scan_reports_permission_per_process(keymaker):
    k = keymaker()  # runs as root
    r, w = os.pipe()
    child = os.fork()
    if child == 0:  # drop to nobody in a forked copy: the code is already loaded
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            df = scan([k.pid, 2])
            os.write(w, json.dumps(df[["pid", "status"]].to_dict(orient="records")).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as fh:
        rows = {row["pid"]: row["status"] for row in json.loads(fh.read())}
    os.waitpid(child, 0)
    assert rows == {k.pid: "permission denied", 2: "kernel thread"}


KEYS = ("import ctypes, sys, time\n"
        "libc = ctypes.CDLL(None)\n"
        "for _ in range(3):\n"
        "    assert libc.pthread_key_create(ctypes.byref(ctypes.c_uint()), None) == 0\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n")


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to nobody needs root")
def test_an_ordinary_user_scans_its_own_processes(keymaker):
    """As nobody: its own process is read whole (map_files is root's, so the files are opened
    by their paths in the same mount namespace); another user's says permission denied."""
    import sys
    nobody = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]
    mine = subprocess.Popen(nobody + [sys.executable, "-c", KEYS], stdout=subprocess.PIPE,
                            text=True)
    other = keymaker()  # root's
    try:
        assert mine.stdout.readline().strip() == "ready"
        as_root = scan_pid(mine.pid)
        r = subprocess.run(nobody + [sys.executable, "-m", "tracer.cli", "scan", "--json",
                                     "-p", str(mine.pid), "-p", str(other.pid)],
                           capture_output=True, text=True, cwd=os.getcwd(), timeout=60)
        assert r.returncode == 0, r.stderr
        rows = {row["pid"]: row for row in json_rows(r.stdout)}
        assert rows[mine.pid]["status"] == "ok" and as_root["status"] == "ok"
        assert rows[mine.pid]["keys_in_use"] == as_root["keys_in_use"] >= 3
        assert rows[other.pid]["status"] == "permission denied"
        assert rows[other.pid]["keys_in_use"] is None
        r = subprocess.run(nobody + [sys.executable, "-m", "tracer.cli", "scan", "--json",
                                     "-r", "handlers,tls", "-p", str(mine.pid)],
                           capture_output=True, text=True, cwd=os.getcwd(), timeout=60)
        assert [row["status"] for row in json_rows(r.stdout)] == ["ok", "ok"], r.stdout
    finally:
        mine.kill()
        mine.wait()


def test_full_host_scan_gives_every_process_a_status():
    res = keytrace("scan", "--json")
    assert res.returncode == 0 and "Traceback" not in res.stderr
    rows = json_rows(res.stdout)
    assert len(rows) > 10
    assert all(r["status"] for r in rows)
    assert all((r["keys_in_use"] is None) == (r["status"] != "ok") for r in rows)
    assert all(r["leak_per_reload"] == 0 for r in rows if r["status"] != "ok")


def test_scan_output_file(tmp_path, keymaker):
    k = keymaker()
    k.do("c 3")
    for ext, read in ((".csv", pd.read_csv), (".parquet", pd.read_parquet),
                      (".jsonl", lambda p: pd.read_json(p, lines=True))):
        path = tmp_path / f"scan{ext}"
        res = keytrace("scan", "-p", str(k.pid), "-o", str(path), "--json")
        assert res.returncode == 0, res.stderr
        (row,) = read(path).to_dict(orient="records")
        assert (row["pid"], row["keys_in_use"], row["status"]) == (k.pid, 3, "ok")


def test_scan_bad_input():
    res = keytrace("scan", "--pid", "999999999")
    assert res.returncode == 1 and res.stderr.startswith("keytrace: error: no process with pid")


@pytest.mark.usefixtures("bpf")
def test_watch_reaches_a_libc_seen_only_in_another_mount_namespace(namespaced_keymaker):
    k, _ = namespaced_keymaker
    with KeyTracer(pids=[k.pid]) as t:
        assert any(f.startswith(f"/proc/{k.pid}/map_files/") for f in t.files)
        k.do("c 4")
        time.sleep(0.05)
    (row,) = t.ledger.summary().to_dict(orient="records")
    assert row["live_keys"] == 4 == in_use(k.pid)["keys_in_use"]


def test_a_library_reloaded_at_the_same_address_is_still_caught(keymaker, bins):
    # Each reload maps libleaky where the last copy was: every destructor points into the
    # mapping of today, none is orphaned, but they all share one destructor.
    k = keymaker()
    for _ in range(5):
        assert k.do(f"r {bins['libleaky']}")[0] == "ok"
    (row,) = scan([k.pid], reloads_per_day=1).to_dict(orient="records")
    assert (row["keys_in_use"], row["orphaned_keys"], row["same_destructor_keys"]) == (5, 0, 5)
    assert row["leaking"] and "5 keys share one destructor (libleaky.so!destroy+0x0)" in row["reason"]
    assert row["days_left"] == pytest.approx(1019)


def test_a_healthy_process_is_not_leaking(keymaker, bins):
    k = keymaker()
    k.do("c 3")                              # keys without destructor: nothing to group by
    assert k.do(f"L {bins['libb']}")[0] == "ok"  # one key, its destructor mapped
    (row,) = scan([k.pid], reloads_per_day=1).to_dict(orient="records")
    assert (row["keys_in_use"], row["leaking"], row["reason"]) == (4, False, "")
    assert pd.isna(row["days_left"])


def test_history_dates_a_leak_the_table_cannot_show():
    # A per-request leak makes keys without destructor: the table shows nothing to group by.
    # A saved ledger measured 20 keys a second for this very process: that dates it. Another
    # process of the same executable is judged on its own table.
    from tracer.analysis.scan import COLUMNS, judge
    base = {c: None for c in COLUMNS}
    rows = pd.DataFrame([
        {**base, "pid": 1, "exe": "/srv/app", "status": "ok", "keys_in_use": 273, "limit": 1024,
         "orphaned_keys": 0, "same_destructor_keys": 0, "destructors": {}},
        {**base, "pid": 2, "exe": "/srv/reloader", "status": "ok", "keys_in_use": 5,
         "limit": 1024, "orphaned_keys": 5, "same_destructor_keys": 5, "destructors": {"x": 5}},
        {**base, "pid": 3, "exe": "/srv/app", "status": "ok", "keys_in_use": 3, "limit": 1024,
         "orphaned_keys": 0, "same_destructor_keys": 0, "destructors": {}}],
        columns=COLUMNS)
    df = judge(rows, keys_per_second={1: 20.0}).set_index("pid")
    app, reloader, sibling = df.loc[1], df.loc[2], df.loc[3]
    assert not sibling.leaking and pd.isna(sibling.days_left)
    assert app.leaking and app.keys_per_day == 20 * 86_400
    assert app.days_left * 86_400 == pytest.approx((1024 - 273) / 20)
    assert "keeps making keys: 20 keys/s measured in the ledger" in app.reason
    # Leaking by its table, but no rate given or measured: null, never 0.
    assert reloader.leaking and pd.isna(reloader.keys_per_day) and pd.isna(reloader.days_left)
    assert pd.isna(reloader.reloads_per_day)
