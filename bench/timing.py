"""keytrace calls -T against the untraced cost, side by side in one run: whether the times it
reports, less the probes' own share measured at start (tracer.bpf.calibrate), are the
functions' own.

    sudo .venv/bin/python bench/timing.py [--calls 20000] [--rounds 5]

tests/fixtures/timed.c has two functions that spin a given number of times: spin_push (its entry site
is emulated by the kernel) and spin_mov (single-stepped). Per function and work size, rounds
interleave the untraced run (the program times its own loop) with `keytrace calls -c -T`,
whose mean is its total time over its calls. The uncorrected mean (the share added back, as the
run's note gives it) is shown beside. Medians over rounds. Writes bench/results/TIMING.md.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tracer.workloads import compile_c  # noqa: E402
from results_file import save, table  # noqa: E402

KINDS = {"spin_push": "emulated", "spin_mov": "single-stepped"}
WORK = (1, 100, 1000, 10000)  # spins per call: about 1 ns, 0.03, 0.26 and 2.5 us here


def untraced(exe: str, fn: str, calls: int, work: int) -> float:
    out = subprocess.run([exe, fn, str(calls), str(work)], capture_output=True, text=True,
                         check=True).stdout
    return float(re.search(r"ns_per_call=([\d.]+)", out).group(1))


def keytrace(exe: str, fn: str, calls: int, work: int) -> tuple:
    """(corrected mean ns, the share taken off)."""
    r = subprocess.run([sys.executable, "-m", "tracer.cli", "calls", "-c", "-T", "--json",
                        "-e", f"exe:{fn}", "--", exe, fn, str(calls), str(work)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    if r.returncode != 0:
        raise SystemExit(f"keytrace failed: {r.stderr}")
    (row,) = [json.loads(line) for line in r.stdout.splitlines()
              if line.strip().startswith("{") and json.loads(line).get("function") == fn]
    assert row["calls"] == calls, row
    kind = KINDS[fn]
    m = re.search(r"([\d.]+) us at an? " + kind, r.stderr)
    return row["total_ns"] / row["calls"], float(m.group(1)) * 1000 if m else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        exe = compile_c(ROOT / "tests" / "fixtures" / "timed.c", Path(tmp))
        rows = []
        for fn in KINDS:
            for work in WORK:
                base, ours, share = [], [], []
                for _ in range(a.rounds):
                    base.append(untraced(str(exe), fn, a.calls, work))
                    mean, cost = keytrace(str(exe), fn, a.calls, work)
                    ours.append(mean)
                    share.append(cost)
                b, o, s = (statistics.median(x) for x in (base, ours, share))
                rows.append([fn, KINDS[fn], work, f"{b:.0f}", f"{o:.0f}", f"{o + s:.0f}",
                             f"{o - b:+.0f}", f"{s:.0f} ({min(share):.0f}-{max(share):.0f})"])
                print(rows[-1], file=sys.stderr)
    body = table(["function", "entry site", "spins", "untraced ns/call", "keytrace -T ns/call",
                  "uncorrected ns/call", "difference ns", "share taken off ns (min-max)"], rows)
    body += (f"\n{a.calls} calls a run, medians of {a.rounds} interleaved rounds. The untraced "
             "time is the program's own clock around its loop; keytrace's is the kernel's total "
             "over its calls, less the probes' share measured at its start on a null call of "
             "the same entry kind.\n")
    save("TIMING", "keytrace calls -T against the untraced cost", body)


if __name__ == "__main__":
    main()
