"""Scan speed: time per process of a full-host `keytrace scan`, with a few hundred processes,
and of `keytrace scan --resource all` (every table) in the same run, rounds alternating.

    sudo .venv/bin/python bench/scan.py [--processes 300] [--rounds 5]

Starts N glibc processes (sleep: no keys, the common case), so the cost measured is listing a
process, finding its key table, and reading it through /proc/PID/mem (and, for every table, its
fds, tasks, maps, timers, limits and status).
Reports the first (cold: every ELF file parsed) and the median of the warm rounds, per process.
The processes are killed on every exit path.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tracer.host import elf, keytable  # noqa: E402
from tracer import resource, resources  # noqa: E402,F401  (registers the resources)
from tracer.analysis.census import survey  # noqa: E402
from tracer.analysis.scan import scan  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--processes", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    procs = []
    try:
        for _ in range(args.processes):
            procs.append(subprocess.Popen(["sleep", "600"]))
        time.sleep(0.5)
        timings, every = [], []
        each: dict = {r.name: [] for r in resource.known()}
        for i in range(args.rounds + 1):
            if i == 0:  # cold: nothing parsed yet
                elf._INFOS.clear()
                keytable._LAYOUTS.clear()
            t = time.perf_counter()
            df = scan()
            timings.append((time.perf_counter() - t) / len(df) * 1000)
            if i:
                t = time.perf_counter()
                all_df = survey(resource.known())
                every.append((time.perf_counter() - t) / all_df["pid"].nunique() * 1000)
                for r in resource.known():
                    t = time.perf_counter()
                    one = survey([r])
                    each[r.name].append((time.perf_counter() - t) / len(one) * 1000)
        ok = int((df["status"] == "ok").sum())
        warm = timings[1:]
        ratios = [b / a for a, b in zip(warm, every)]
        print(f"| processes scanned | ok | cold ms/process | warm ms/process (median of {args.rounds}, min-max) |")
        print("|---|---|---|---|")
        print(f"| {len(df)} | {ok} | {timings[0]:.2f} | {statistics.median(warm):.2f} "
              f"({min(warm):.2f}-{max(warm):.2f}) |")
        names = ", ".join(r.name for r in resource.known())
        print()
        print(f"Every table ({names}), warm, the same rounds: "
              f"{statistics.median(every):.2f} ms/process ({min(every):.2f}-{max(every):.2f}), "
              f"{statistics.median(ratios):.2f}x the keys scan "
              f"({min(ratios):.2f}-{max(ratios):.2f}).")
        print()
        print("| table | warm ms/process, read alone (median) |")
        print("|---|---|")
        for name, ms in each.items():
            print(f"| {name} | {statistics.median(ms):.3f} |")
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


if __name__ == "__main__":
    main()
