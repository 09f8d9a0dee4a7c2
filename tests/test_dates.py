"""Never cry wolf, never miss a dying process, on real programs: the incident's own stack
(Debian's stock Apache with mod_php and Imagick, gracefully restarted) flags nothing, a leaky
LoadFile flags the master alone with the right date, a per-request leak is dated within 10 % of
its real failure by watch, report and scan, and a short-lived OpenSSL client's keys are named.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from tracer.workloads import compile_c

from conftest import FIXTURES, json_rows, keytrace, told

PHP_LOAD = Path("/etc/apache2/mods-enabled/php8.2.load")
IMAGICK = Path("/etc/php/8.2/apache2/conf.d/20-imagick.ini")


@pytest.fixture(scope="module")
def apache():
    """Debian's stock Apache (prefork, mod_php, Imagick), as setup.sh installs it, not running."""
    missing = [str(p) for p in (PHP_LOAD, IMAGICK) if not p.exists()]
    if not shutil.which("apache2ctl") or missing:
        pytest.fail("Debian's apache2, libapache2-mod-php and php-imagick are needed (setup.sh "
                    f"installs them); missing: {missing or 'apache2ctl'}")
    if subprocess.run(["pgrep", "-x", "apache2"], capture_output=True).returncode == 0:
        pytest.fail("an apache2 is running already: these tests start their own")
    return "apache2ctl"


PID_FILE = Path("/var/run/apache2/apache2.pid")  # Debian's /etc/apache2/envvars


def serving(timeout: float = 30.0) -> bool:
    """Apache's master is running: its pid file names a live apache2."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{int(PID_FILE.read_text())}/comm") as fh:
                if fh.read().strip() == "apache2":
                    return True
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    return False


def watch_apache(ctl: str, extra: list, restarts: int = 5) -> list:
    """`keytrace watch -- apache2ctl -D FOREGROUND`, gracefully restarted `restarts` times."""
    p = subprocess.Popen([sys.executable, "-m", "tracer.cli", "watch", "--json", "-d",
                          str(6 + 2.5 * restarts), "--reloads-per-day", "1", "--", ctl,
                          "-D", "FOREGROUND", *extra], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        line = told(p.stderr)
        assert "probes attached" in line, line + p.stderr.read()
        # graceful restarts only once the master is up: `apache2 -k graceful` with no server
        # running starts one, daemonized, outside the traced tree (a slow first start in CI)
        assert serving(), "Apache's master never wrote its pid file"
        time.sleep(1)
        for _ in range(restarts):
            subprocess.run([ctl, "-k", "graceful"], capture_output=True, timeout=30)
            time.sleep(2.5)
        out, errs = p.communicate(timeout=120)
    finally:
        p.kill()
        p.wait()
    time.sleep(0.5)
    left = subprocess.run(["pgrep", "-x", "apache2"], capture_output=True, text=True).stdout
    if left:  # said, and ended: the next test needs port 80 free
        ps = subprocess.run(["ps", "-o", "pid,ppid,stat,etimes,args", "-p",
                             ",".join(left.split())], capture_output=True, text=True).stdout
        subprocess.run(["pkill", "-KILL", "-x", "apache2"])
        raise AssertionError(f"apache2 outlived keytrace:\n{ps}")  # the tree ends with it
    rows = [r for r in json_rows(out) if r["comm"].startswith("apache2")]
    assert rows, errs
    return rows


def test_stock_apache_with_php_and_imagick_is_not_flagged(bpf, apache):
    rows = watch_apache(apache, [])
    assert len(rows) >= 3  # the master and its workers
    bad = [(r["pid"], r["reason"]) for r in rows if r["leaking"] or r["days_left"] is not None]
    assert bad == [], bad
    master = [r for r in rows if r["creates"]]
    assert master and all(not r["leaking"] for r in master)


def test_a_leaky_loadfile_flags_the_master_alone_with_its_date(bpf, apache, bins):
    rows = watch_apache(apache, ["-C", f"LoadFile {bins['libleaky']}"])
    flagged = [r for r in rows if r["leaking"]]
    assert len(flagged) == 1, [(r["pid"], r["parent_pid"], r["reason"]) for r in flagged]
    (master,) = flagged
    assert master["library"] == bins["libleaky"]
    assert master["leak_per_reload"] == 1.0, master
    assert master["reload_cycles"] >= 5
    # one key a day at one reload a day: the date is the headroom in days
    assert master["days_left"] == pytest.approx(1024 - master["live_keys"], abs=1)


@pytest.fixture(scope="module")
def drip(tmp_path_factory):
    return str(compile_c(FIXTURES / "drip.c", tmp_path_factory.mktemp("drip")))


def when(text) -> float:
    return datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp()


def test_a_per_request_leak_is_dated_within_ten_percent(bpf, drip, tmp_path):
    """A key every 20 ms (no reloads at all): watch, report on its saved ledger, and scan with
    that ledger as history each date the failure; the drip says when it really failed."""
    p = subprocess.Popen([drip, "20"], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        time.sleep(1)
        ledger = tmp_path / "drip.parquet"
        r = keytrace("watch", "-p", str(p.pid), "-d", "4", "--json", "-o", str(ledger))
        assert r.returncode == 0, r.stderr
        (row,) = [x for x in json_rows(r.stdout) if x["pid"] == p.pid]
        predicted = {"watch": (time.time(), row)}
        r = keytrace("report", str(ledger), "--json")
        (rep,) = [x for x in json_rows(r.stdout) if x["pid"] == p.pid]
        predicted["report"] = (when(rep["traced_since"]) + 5, rep)
        r = keytrace("scan", "-p", str(p.pid), "--ledger", str(ledger), "--json")
        assert r.returncode == 0, r.stderr
        (scanned,) = json_rows(r.stdout)
        predicted["scan"] = (time.time(), scanned)
        failed = p.communicate(timeout=60)[0]
    finally:
        p.kill()
        p.wait()
    truth = float(failed.split()[-1])
    assert row["leaking"] and "measured per time" in row["rate_basis"], row
    assert row["keys_per_second"] == pytest.approx(50, rel=0.15), row
    for front, (at, r) in predicted.items():
        assert r["exhaustion_eta"], (front, r)
        eta = when(r["exhaustion_eta"])
        assert abs(eta - truth) <= 0.10 * (truth - at), (front, eta - truth, truth - at, r)


def test_a_short_lived_openssl_clients_keys_are_all_named(bpf):
    """curl makes its keys (OpenSSL's) and exits a millisecond later: too soon to read its
    maps, so the create probe walks the loader's link_map chain once per image."""
    r = keytrace("watch", "--json", "--by", "library", "--", "curl", "-s", "-o", "/dev/null",
                 "https://127.0.0.1:1/")
    assert r.returncode == 7, r.stderr  # curl's own status: could not connect
    rows = json_rows(r.stdout)
    assert rows and sum(x["created"] for x in rows) >= 2, rows
    assert all(x["library"].startswith("/") for x in rows), rows
    assert any(x["library"].endswith("libcrypto.so.3") for x in rows), rows
