"""What tracing file descriptors would cost, the two ways it could be done, side by side in one
run: why keytrace reads the fd table (/proc/PID/fd) instead of tracing it.

    sudo .venv/bin/python bench/fdcost.py [--calls 200000] [--rounds 5]

bench/fdloop.c opens /dev/null and closes it N times, and times itself (ns per open+close pair):
untraced; under bpftrace with the two syscall tracepoints filtered to the loop's pid in the
kernel (sys_exit_openat for the fd made, sys_enter_close); under bpftrace with uprobes on
libc's open64 (entry and return: the fd is its return value) and close. Rounds interleave the
three. Each traced run's counts are checked against N. Writes bench/results/FDCOST.md. Every process is ended on every exit
path (bpftrace detaches as it exits).
"""
from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tracer.workloads import compile_c  # noqa: E402
from results_file import save, table  # noqa: E402

TRACEPOINTS = ("tracepoint:syscalls:sys_exit_openat /pid == cpid/ { @made = count(); } "
               "tracepoint:syscalls:sys_enter_close /pid == cpid/ { @closed = count(); }")
UPROBES = ("uprobe:libc:open64 /pid == cpid/ { @open = count(); } "
           "uretprobe:libc:open64 /pid == cpid/ { @made = count(); } "
           "uprobe:libc:close /pid == cpid/ { @closed = count(); }")


def run(loop: str, calls: int, program: str = "") -> tuple:
    """(ns per pair, the counts bpftrace printed)."""
    if not program:
        out = subprocess.run([loop, str(calls)], capture_output=True, text=True, check=True)
        return float(out.stdout.split()[-1]), {}
    out = subprocess.run(["bpftrace", "-e", program, "-c", f"{loop} {calls}"],
                         capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise SystemExit(f"bpftrace failed: {out.stderr.strip()}")
    counts = {m.group(1): int(m.group(2)) for m in re.finditer(r"@(\w+): (\d+)", out.stdout)}
    ns = float(re.findall(r"^(\d+\.\d+)$", out.stdout, re.MULTILINE)[-1])
    return ns, counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=200000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    if not shutil.which("bpftrace"):
        raise SystemExit("bpftrace is needed (apt-get install bpftrace)")
    with tempfile.TemporaryDirectory() as d:
        loop = str(compile_c(ROOT / "bench" / "fdloop.c", Path(d)))
        modes = {"untraced": "", "syscall tracepoints (filtered by pid)": TRACEPOINTS,
                 "uprobes on libc open64 (+return) and close": UPROBES}
        times: dict = {m: [] for m in modes}
        for _ in range(args.rounds):
            for mode, program in modes.items():
                ns, counts = run(loop, args.calls, program)
                if program and (counts.get("made"), counts.get("closed")) != (args.calls,) * 2:
                    # (the loader's own opens and closes come before the loop: at least N)
                    if min(counts.get("made", 0), counts.get("closed", 0)) < args.calls:
                        raise SystemExit(f"{mode}: counted {counts}, expected {args.calls}")
                times[mode].append(ns)
    base = statistics.median(times["untraced"])
    rows = []
    for mode, ts in times.items():
        med = statistics.median(ts)
        added = (med - base) / 2 if mode != "untraced" else 0.0
        rows.append((mode, f"{med:.0f} ({min(ts):.0f}-{max(ts):.0f})", f"{added:.0f}",
                     f"{med / base:.2f}"))
    save("FDCOST", "What tracing file descriptors would cost",
         f"bench/fdloop.c, {args.calls} open+close pairs, median of {args.rounds} interleaved "
         "rounds.\n\n" + table(["fd tracing", "ns per pair (range)", "added ns per traced call",
                                 "x untraced"], rows))

if __name__ == "__main__":
    main()
