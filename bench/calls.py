"""keytrace calls against bpftrace and ltrace, side by side in one run:
`sudo .venv/bin/python bench/calls.py`.

Per-call cost of counting calls of rand() (bench/callloop.c) in a process attached to by pid:
untraced; bpftrace `uprobe:...:rand { @ = count(); }` (a probe on the entry); keytrace calls -c
on its planned site (an emulated instruction of rand's prologue) and on the entry
(--sites entry); ltrace -c. Interleaved rounds, rotated so that no tool always goes first, and
every tool's count checked against the loop's. The loop runs against a private copy of libc, so
other tracers on the host do not disturb it. Reports medians (and ranges) of ns per call and the
added cost per call as ratios; writes bench/results/CALLS.md. Every process it starts is ended.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.__main__ import LIBC, KEYTRACE, Loop, end_all, spawn, wait_for  # noqa: E402
from tracer.workloads import compile_c  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def untraced(exe, libdir, n):
    return Loop(exe, libdir, n).go(), True


def bpftrace(exe, libdir, n):
    loop = Loop(exe, libdir, n)
    t = spawn(["bpftrace", "-p", str(loop.p.pid), "-e",
               f"uprobe:{libdir / 'libc.so.6'}:rand {{ @c = count(); }}"],
              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(t.stdout, r"^Attaching \d+ probe")
    time.sleep(0.2)
    ns = loop.go()
    out = t.communicate(timeout=60)[0]
    return ns, re.search(r"@c: (\d+)", out) is not None and int(re.search(r"@c: (\d+)", out).group(1)) == n


def keytrace(exe, libdir, n, sites):
    loop = Loop(exe, libdir, n)
    t = spawn([*KEYTRACE, "calls", "-c", "--json", "--sites", sites, "-e", "rand", "-p",
               str(loop.p.pid)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    wait_for(t.stderr, r"probes")
    ns = loop.go()
    out, err = t.communicate(timeout=60)
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    ok = [r["calls"] for r in rows if r["function"] == "rand"] == [n]
    if not ok:
        print(f"    keytrace saw {rows}; {err.strip()[-200:]}", flush=True)
    return ns, ok


def ltrace(exe, libdir, n):
    loop = Loop(exe, libdir, n)
    t = spawn(["ltrace", "-c", "-p", str(loop.p.pid), "-e", "rand"],
              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(1.0)  # ltrace says nothing when attached
    ns = loop.go()
    out = t.communicate(timeout=300)[0]
    m = re.search(r"\s(\d+) rand", out)
    return ns, bool(m) and int(m.group(1)) == n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("-n", type=int, default=2_000_000, help="calls per traced run")
    ap.add_argument("--n-ltrace", type=int, default=20_000, help="calls per ltrace run")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="keytrace-calls-bench-"))
    libdir = work / "libc"
    libdir.mkdir()
    shutil.copy(LIBC, libdir / "libc.so.6")
    exe = compile_c(ROOT / "bench" / "callloop.c", work, extra=("-O2",))
    tools = {
        "untraced": lambda: untraced(exe, libdir, args.n),
        "bpftrace count() on the entry": lambda: bpftrace(exe, libdir, args.n),
        "keytrace calls -c (planned site)": lambda: keytrace(exe, libdir, args.n, "planned"),
        "keytrace calls -c --sites entry": lambda: keytrace(exe, libdir, args.n, "entry"),
        "ltrace -c": lambda: ltrace(exe, libdir, args.n_ltrace),
    }
    res = {name: {"ns": [], "verified": 0} for name in tools}
    names = list(tools)
    try:
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                ns, ok = tools[name]()
                res[name]["ns"].append(ns)
                res[name]["verified"] += ok
                print(f"  round {r + 1}: {name}: {ns:.1f} ns/call{'' if ok else ' (COUNT WRONG)'}",
                      flush=True)
    finally:
        end_all()
        shutil.rmtree(work, ignore_errors=True)
    base = statistics.median(res["untraced"]["ns"])
    added = {k: statistics.median(v["ns"]) - base for k, v in res.items()}
    bt = added["bpftrace count() on the entry"]
    lines = ["# keytrace calls -c: cost per call", "",
             f"Measured {time.strftime('%Y-%m-%d')} by `bench/calls.py` ({args.rounds} rounds, "
             f"{args.n:,} calls of rand() per run, {args.n_ltrace:,} under ltrace), "
             f"{subprocess.run(['uname', '-r'], capture_output=True, text=True).stdout.strip()}.",
             "", "| tool | ns per call, median (range) | added per call | vs bpftrace | counts exact |",
             "|---|---|---|---|---|"]
    for name, v in res.items():
        xs = v["ns"]
        ratio = "" if name == "untraced" else f"{added[name] / bt:.2f}x"
        lines.append(f"| {name} | {statistics.median(xs):.1f} ({min(xs):.1f}-{max(xs):.1f}) | "
                     f"{added[name]:.1f} ns | {ratio} | {v['verified']}/{len(xs)} |")
    kt = added["keytrace calls -c (planned site)"]
    lines += ["", f"keytrace calls -c on the planned site: {kt / bt:.2f}x bpftrace's added cost "
              f"(target <= 0.25x), {added['ltrace -c'] / kt:.0f}x cheaper than ltrace "
              "(target >= 100x)."]
    text = "\n".join(lines) + "\n"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "CALLS.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
