"""A whole ad-hoc run, keytrace against bpftrace, side by side in one run: what a first contact
costs (issue #24), and many functions at once (issue #23).

    sudo .venv/bin/python bench/startup.py [--rounds 5] [--many-rounds 3]

Rows, interleaved rounds, GNU time for wall seconds and peak RSS of each whole run:
- keytrace watch --json -- /bin/true, against bpftrace counting the entries of
  pthread_key_create and pthread_key_delete, -c /bin/true;
- keytrace calls -c -e libc:malloc -- /bin/true, against bpftrace counting malloc's entries;
- both again as a first run: keytrace's compiled-object cache emptied before each of its runs,
  so the probes are compiled (bpftrace compiles every time);
- keytrace calls -c on about 1100 functions of libcrypto (X509*, BN_*, ASN1_*: every entry is
  an instruction this host single-steps right, so bpftrace may probe it too), against bpftrace
  on the same globs: attaching and detaching many probes;
- start to "probes attached" of a host-wide keytrace watch;
- peak RSS of a bare Python, and of one importing bcc, pandas: what each import costs.
The rows but the first-run ones start from a warm cache (an untimed run first).
Medians (min-max), and keytrace's ratio to bpftrace's median. Writes bench/results/STARTUP.md.
Every process is ended on every exit path; bpftrace and keytrace detach as they exit.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from results_file import save, table  # noqa: E402
from tracer.bpf.compiled import cache_dir  # noqa: E402

KEYTRACE = [sys.executable, "-m", "tracer.cli"]
LIBC = "/lib/x86_64-linux-gnu/libc.so.6"
CRYPTO = "/usr/lib/x86_64-linux-gnu/libcrypto.so.3"
MANY = ("X509*", "BN_*", "ASN1_*")


# bpftrace refuses more than 512 programs unless told. Python writes its bytecode caches as an
# installed keytrace has them (a developer's PYTHONDONTWRITEBYTECODE would make every run
# compile keytrace's modules from source: the untimed first run writes them).
ENV = {**os.environ, "BPFTRACE_MAX_BPF_PROGS": "4000", "BPFTRACE_MAX_PROBES": "4000"}
ENV.pop("PYTHONDONTWRITEBYTECODE", None)


def one_shot(argv) -> tuple:
    """Wall seconds and peak RSS (MB) of one whole run of argv, by GNU time (a fork of this
    process would report this process's RSS as the child's peak)."""
    p = subprocess.Popen(["/usr/bin/time", "-f", "KT_TIME %e %M", *argv], env=ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                         start_new_session=True)
    try:
        err = p.communicate(timeout=900)[1]
    finally:
        if p.poll() is None:  # the tool under GNU time too: its whole group
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    m = re.search(r"KT_TIME ([\d.]+) (\d+)", err)
    if p.returncode != 0 or not m:
        raise SystemExit(f"{argv[0]} failed: {err[-2000:]}")
    functions = re.search(r"keytrace: (\d+) function\(s\)", err)
    return float(m.group(1)), int(m.group(2)) / 1024, int(functions.group(1)) if functions else None


def pairs() -> dict:
    """row -> {tool: argv}: keytrace's and bpftrace's runs of the same job."""
    keys = (f"uprobe:{LIBC}:pthread_key_create {{ @c = count(); }} "
            f"uprobe:{LIBC}:pthread_key_delete {{ @d = count(); }}")
    many = " ".join(f"uprobe:{CRYPTO}:{g} {{ @[probe] = count(); }}" for g in MANY)
    watch = {"keytrace": [*KEYTRACE, "watch", "--json", "--", "/bin/true"],
             "bpftrace": ["bpftrace", "-e", keys, "-c", "/bin/true"]}
    malloc = {"keytrace": [*KEYTRACE, "calls", "-c", "-e", "libc:malloc", "--", "/bin/true"],
              "bpftrace": ["bpftrace", "-e", f"uprobe:{LIBC}:malloc {{ @ = count(); }}",
                           "-c", "/bin/true"]}
    return {
        "watch -- /bin/true": watch,
        "calls -c malloc -- /bin/true": malloc,
        f"watch -- /bin/true, {FIRST}": watch,
        f"calls -c malloc -- /bin/true, {FIRST}": malloc,
        f"calls -c {'+'.join(MANY)} (libcrypto) -- /bin/true": {
            "keytrace": [*KEYTRACE, "calls", "-c", "--max-functions", "2000",
                         *[x for g in MANY for x in ("-e", f"libcrypto:{g}")], "--", "/bin/true"],
            "bpftrace": ["bpftrace", "-e", many, "-c", "/bin/true"]},
    }


FIRST = "first run (probes compiled)"


def import_costs() -> list:
    """Peak RSS (MB) of a Python that imports nothing, bcc, or pandas (which imports pyarrow)."""
    rows = []
    for what in ("pass", "import bcc", "import pandas"):
        p = subprocess.run(["/usr/bin/time", "-f", "KT_TIME %e %M", sys.executable, "-c", what],
                           capture_output=True, text=True, check=True, env=ENV)
        mb = int(re.search(r"KT_TIME [\d.]+ (\d+)", p.stderr).group(1)) / 1024
        rows.append([f"`python -c '{what}'`", f"{mb:.0f}"])
    return rows


def host_watch_start(rounds: int) -> list:
    """Seconds from start to "probes attached" of a host-wide watch."""
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        p = subprocess.Popen([*KEYTRACE, "watch", "-d", "0.1", "--json"], cwd=ROOT, env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            for line in p.stderr:
                if "probes attached" in line:
                    times.append(time.perf_counter() - t0)
                    break
            p.communicate(timeout=60)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
    return times


def mr(xs) -> str:
    return f"{statistics.median(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--many-rounds", type=int, default=3, help="rounds of the 1100-function row")
    a = ap.parse_args()
    rows, counted = [], {}  # counted: row -> the functions keytrace calls traced
    for row, tools in pairs().items():
        if FIRST not in row:
            one_shot(tools["keytrace"])  # the cache warmed, untimed
        got = {tool: {"s": [], "mb": []} for tool in tools}
        for _ in range(a.many_rounds if "libcrypto" in row else a.rounds):
            for tool, argv in tools.items():  # interleaved
                if FIRST in row and tool == "keytrace":
                    shutil.rmtree(cache_dir(), ignore_errors=True)
                secs, mb, functions = one_shot(argv)
                if functions:
                    counted[row] = functions
                got[tool]["s"].append(secs)
                got[tool]["mb"].append(mb)
                print(f"{row} {tool}: {secs:.2f} s {mb:.0f} MB", file=sys.stderr, flush=True)
        ks, bs = (statistics.median(got[t]["s"]) for t in ("keytrace", "bpftrace"))
        km, bm = (statistics.median(got[t]["mb"]) for t in ("keytrace", "bpftrace"))
        label = f"{row}: {counted[row]} functions" if row in counted else row
        rows.append([label, mr(got["keytrace"]["s"]), mr(got["bpftrace"]["s"]), f"{ks / bs:.2f}x",
                     f"{km:.0f}", f"{bm:.0f}", f"{km / bm:.2f}x"])
    start = host_watch_start(a.rounds)
    body = table(["run", "keytrace wall s", "bpftrace wall s", "wall ratio",
                  "keytrace peak RSS MB", "bpftrace peak RSS MB", "RSS ratio"], rows)
    body += (f"\nMedians (min-max) of {a.rounds} interleaved rounds ({a.many_rounds} for "
             f"libcrypto's), keytrace's compiled probes cached but in the first-run rows. "
             f"Host-wide `keytrace watch` from start to \"probes attached\": {mr(start)} s.\n\n"
             "What an import alone costs (peak RSS, GNU time):\n\n")
    body += table(["process", "peak RSS MB"], import_costs())
    save("STARTUP", "A whole ad-hoc run: keytrace against bpftrace", body)


if __name__ == "__main__":
    main()
