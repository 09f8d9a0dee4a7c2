"""keytrace benchmarks, side by side in one run: `sudo .venv/bin/python -m bench`.

1. overhead: ns per pthread_key_create+delete pair in bench/keyloop.c, untraced, under
   bpftrace (a bare count() on the entry of both functions, and on the same four probe points
   keytrace uses), under keytrace watch, with the two functions declared as a --pair too
   (against bpftrace on the pair's 3 probe points), and under ltrace; with --baseline REF, under
   keytrace watch from a checkout of REF as well; interleaved rounds, every tool's count of
   calls verified. The loop runs against a private copy of libc, so other tracers on
   the host do not disturb it.
2. ingest: how fast the ring buffer is drained into the ledger, and records lost per ring size.
3. peak RSS of a watch session over 1 M events (start-up and whole runs: bench/startup.py).
4. scan: ms per process over a few hundred processes (bench/scan.py).

Writes bench/results/RESULTS.md and bench/results/overhead.png, and prints the table.
Every process it starts is ended, and every probe detached, on every exit path.
"""
from __future__ import annotations

import argparse
import json
import os
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

from tracer import Ledger  # noqa: E402
from tracer.bpf import units  # noqa: E402
from tracer.bpf.loader import Program  # noqa: E402
from tracer.host import libc  # noqa: E402
from tracer.wire import boot_to_wall_offset_ns, decode  # noqa: E402
from tracer.workloads import compile_c  # noqa: E402

RESULTS = ROOT / "bench" / "results"
KEYTRACE = [sys.executable, "-m", "tracer.cli"]
LIBC = "/lib/x86_64-linux-gnu/libc.so.6"
_children: list = []


def spawn(argv, **kw) -> subprocess.Popen:
    p = subprocess.Popen(argv, **kw)
    _children.append(p)
    return p


def end_all() -> None:
    for p in _children:
        if p.poll() is None:
            p.kill()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            pass


def median_range(xs) -> str:
    return f"{statistics.median(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})"


# -- 1. overhead ---------------------------------------------------------------------------
class Loop:
    """keyloop waiting for "go" on stdin, against the private libc."""

    def __init__(self, exe: Path, libdir: Path, n: int):
        self.n = n
        self.p = spawn([str(exe), str(n)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                       env={**os.environ, "LD_LIBRARY_PATH": str(libdir)})
        assert self.p.stdout.readline().strip() == "ready"

    def go(self) -> float:
        self.p.stdin.write("go\n")
        self.p.stdin.flush()
        line = self.p.stdout.readline()
        self.p.wait(600)
        m = re.search(r"ns_per_iter=([\d.]+)", line)
        if not m:
            raise RuntimeError(f"keyloop said {line!r}")
        return float(m.group(1))


def wait_for(stream, pattern: str, timeout: float = 30) -> None:
    """Read lines from a tracer's stream until one matches (its ready line)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = stream.readline()
        if not line:
            raise RuntimeError(f"tracer ended before saying {pattern!r}")
        if re.search(pattern, line):
            return
    raise RuntimeError(f"no {pattern!r} within {timeout}s")


def run_untraced(exe, libdir, n):
    return Loop(exe, libdir, n).go(), True


def run_bpftrace(exe, libdir, n, returns):
    """returns: False (entries), True (entries and returns), "pair" (the create's return too)."""
    loop = Loop(exe, libdir, n)
    lib = libdir / "libc.so.6"
    probes = [f"uprobe:{lib}:pthread_key_create {{ @c = count(); }}",
              f"uprobe:{lib}:pthread_key_delete {{ @d = count(); }}"]
    if returns:
        probes += [f"uretprobe:{lib}:pthread_key_create {{ @rc = count(); }}"]
    if returns is True:
        probes += [f"uretprobe:{lib}:pthread_key_delete {{ @rd = count(); }}"]
    t = spawn(["bpftrace", "-p", str(loop.p.pid), "-e", " ".join(probes)],
              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(t.stdout, r"^Attaching \d+ probe")
    time.sleep(0.2)
    ns = loop.go()
    out = t.communicate(timeout=60)[0]
    counts = {k: int(v) for k, v in re.findall(r"@(\w+): (\d+)", out)}
    want = {"c": n, "d": n, **({"rc": n} if returns else {}), **({"rd": n} if returns is True else {})}
    return ns, counts == want


KEYS_AS_PAIR = "libc:pthread_key_create=*arg0/pthread_key_delete=arg0"


def run_keytrace(exe, libdir, n, sites="planned", extra=(), tree=ROOT):
    """keytrace watch on the loop; counts checked for keys and for every --pair in extra.
    tree: the source tree to run (a worktree of an older commit, for a same-run baseline)."""
    loop = Loop(exe, libdir, n)
    t = spawn([*KEYTRACE, "watch", "--json", "--sites", sites, *extra, "-p", str(loop.p.pid)],
              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tree)
    wait_for(t.stderr, "probes attached")
    ns = loop.go()
    out, err = t.communicate(timeout=60)
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    seen = [(r.get("creates"), r.get("deletes")) if r.get("resource", "keys") == "keys"
            else (r.get("acquires"), r.get("releases")) for r in rows if r["pid"] == loop.p.pid]
    ok = seen == [(n, n)] * (1 + sum(1 for a in extra if a == "--pair"))
    if not ok:  # say what was seen, and what keytrace said about it
        print(f"    keytrace saw {seen or out[:200]!r}; {err.strip()[-160:]}", flush=True)
    return ns, ok


def run_ltrace(exe, libdir, n):
    loop = Loop(exe, libdir, n)
    t = spawn(["ltrace", "-c", "-p", str(loop.p.pid), "-e", "pthread_key_create+pthread_key_delete"],
              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(1.0)  # ltrace says nothing when attached
    ns = loop.go()
    out = t.communicate(timeout=120)[0]
    calls = {f: int(c) for c, f in re.findall(r"\s(\d+) (pthread_key_\w+)", out)}
    return ns, calls == {"pthread_key_create": n, "pthread_key_delete": n}


def baseline_tree(work: Path, ref: str) -> Path:
    """A checkout of ref beside this tree, run with this venv: the same run measures both."""
    tree = work / f"baseline-{ref}"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), ref],
                   check=True, capture_output=True)
    return tree


def overhead(work: Path, rounds: int, n_fast: int, n_traced: int, n_ltrace: int,
             baseline: str = "") -> dict:
    libdir = work / "libc"
    libdir.mkdir()
    shutil.copy(LIBC, libdir / "libc.so.6")
    exe = compile_c(ROOT / "bench" / "keyloop.c", work, extra=("-O2",))
    tools = {
        "untraced": lambda: run_untraced(exe, libdir, n_fast),
        "bpftrace count, 2 entry probes": lambda: run_bpftrace(exe, libdir, n_traced, False),
        "bpftrace count, keytrace's 4 probe points": lambda: run_bpftrace(exe, libdir, n_traced, True),
        "keytrace watch": lambda: run_keytrace(exe, libdir, n_traced),
        "keytrace watch --sites entry": lambda: run_keytrace(exe, libdir, n_traced, "entry"),
        # the same two functions declared as a --pair too: what a user's pair costs on top
        "keytrace watch --pair (the keys as a pair too)": lambda: run_keytrace(
            exe, libdir, n_traced, extra=("--pair", KEYS_AS_PAIR)),
        "bpftrace count, a pair's 3 probe points": lambda: run_bpftrace(exe, libdir, n_traced,
                                                                        "pair"),
        "ltrace -c": lambda: run_ltrace(exe, libdir, n_ltrace),
    }
    if baseline:
        tree = baseline_tree(work, baseline)
        tools[f"keytrace watch @{baseline}"] = lambda: run_keytrace(exe, libdir, n_traced,
                                                                     tree=tree)
    results = {name: {"ns": [], "verified": 0} for name in tools}
    names = list(tools)
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate: no tool always first
        for name in order:
            ns, ok = tools[name]()
            results[name]["ns"].append(ns)
            results[name]["verified"] += ok
            print(f"  round {r + 1}: {name}: {ns:.1f} ns/pair{'' if ok else ' (COUNT WRONG)'}",
                  flush=True)
    return results


# -- 2. ingest -----------------------------------------------------------------------------
def gen_threads(work: Path) -> Path:
    return compile_c(ROOT / "tests" / "fixtures" / "threads.c", work)


def ingest(work: Path, keyloop_pairs: int) -> dict:
    """Fill a big ring with real records while nothing drains, then time one full drain into
    the ledger; then records lost per ring size with the normal 10 ms drain."""
    exe = compile_c(ROOT / "bench" / "keyloop.c", work, extra=("-O2",))
    loop = Loop(exe, Path(LIBC).parent, keyloop_pairs)
    from tracer.resources.keys import UNIT
    tracer_units = units.tracer_units([UNIT])
    ps = Program(tracer_units, [loop.p.pid], ring_pages=32768).open()  # 128 MiB
    try:
        for t in libc.find_targets(units.functions(tracer_units), [loop.p.pid]):
            ps.attach(t.path, t.functions)
        loop.go()
        offset = boot_to_wall_offset_ns()
        led = Ledger(keep_events=False)
        t = time.perf_counter()
        batch = ps.drain()
        t_read = time.perf_counter() - t
        frame = decode(batch, offset)
        led.ingest(frame)
        t_all = time.perf_counter() - t
        lost = ps.lost()
    finally:
        ps.close()
    out = {"records": len(batch), "read_per_s": len(batch) / t_read, "drain_per_s": len(batch) / t_all,
           "lost_big_ring": lost, "sizes": []}
    # Sustained: two loops at full speed on the two cores, drained every 10 ms.
    from tracer.session import KeyTracer
    pairs = keyloop_pairs // 2
    for pages in (1, 16, 256, 2048):
        with KeyTracer(command=["sh", "-c", f'"$0" {pairs} now & "$0" {pairs} now; wait', str(exe)],
                       ring_pages=pages, keep_events=False) as kt:
            t0 = time.perf_counter()
            kt.wait()
            elapsed = time.perf_counter() - t0
        s = kt.ledger.summary(all_processes=True, attribute=False)
        seen = int(s["creates"].sum() + s["deletes"].sum())
        out["sizes"].append({"pages": pages, "made": 4 * pairs, "seen": seen, "lost": kt.ledger.lost,
                             "rate": 4 * pairs / elapsed})
    return out


# -- 3. start-up and RSS -------------------------------------------------------------------
def peak_rss(work: Path, events: int, save: bool) -> dict:
    threads = gen_threads(work)
    per_thread = 200  # 2 threads x (200 creates + 100 deletes) = 600 records a run
    runs = max(1, events // 600)
    script = f'i=0; while [ $i -lt {runs} ]; do {threads} 2 {per_thread}; i=$((i+1)); done'
    argv = [*KEYTRACE, "watch", "--json"] + (["-o", str(work / "rss.parquet")] if save else []) \
        + ["--", "sh", "-c", script]
    # Nothing reads the tracer's output while it runs: send it nowhere, not to a pipe that fills.
    t = spawn(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    peak = 0
    while t.poll() is None:
        try:
            status = Path(f"/proc/{t.pid}/status").read_text()
            peak = max(peak, int(re.search(r"VmHWM:\s+(\d+)", status).group(1)))
        except (OSError, AttributeError):
            pass
        time.sleep(0.2)
    return {"events": runs * 600, "peak_rss_mb": peak / 1024, "saved": save}


# -- report --------------------------------------------------------------------------------
def report(res: dict, machine: str) -> str:
    ov = res["overhead"]
    base = statistics.median(ov["untraced"]["ns"])
    lines = [f"# keytrace benchmarks\n\nMeasured {time.strftime('%Y-%m-%d')} on {machine}, "
             f"by `sudo .venv/bin/python -m bench`.\n",
             "## Cost per traced pthread_key_create + pthread_key_delete pair\n",
             "Counts verified: the rounds in which the tool saw exactly the calls made.\n",
             "| tool | ns per pair, median (min-max) | added over untraced | counts verified |",
             "|---|---|---|---|"]
    for name, r in ov.items():
        added = statistics.median(r["ns"]) - base
        lines.append(f"| {name} | {median_range(r['ns'])} | "
                     f"{'-' if name == 'untraced' else f'{added / 1000:.1f} us'} | "
                     f"{r['verified']}/{len(r['ns'])} rounds |")
    k = ov["keytrace watch"]["ns"]
    floor = ov["untraced"]["ns"]
    added = lambda name: [t - u for t, u in zip(ov[name]["ns"], floor)]  # noqa: E731
    ratios = {
        "keytrace / bpftrace count, 2 entry probes (added cost)": [
            a / b for a, b in zip(added("keytrace watch"), added("bpftrace count, 2 entry probes"))],
        "keytrace / bpftrace count, 2 entry probes": [a / b for a, b in zip(k, ov["bpftrace count, 2 entry probes"]["ns"])],
        "keytrace / bpftrace count, same 4 probe points": [a / b for a, b in zip(k, ov["bpftrace count, keytrace's 4 probe points"]["ns"])],
        "ltrace / keytrace": [a / b for a, b in zip(ov["ltrace -c"]["ns"], k)],
        # a pair's own cost: what --pair adds to the watch, against bpftrace on its 3 points
        "keytrace --pair's added cost / bpftrace count, the pair's 3 probe points (added)": [
            (p - w) / b for p, w, b in zip(ov["keytrace watch --pair (the keys as a pair too)"]["ns"],
                                            k, added("bpftrace count, a pair's 3 probe points"))],
    }
    for name in ov:
        if name.startswith("keytrace watch @"):
            ratios[f"keytrace watch / {name[len('keytrace '):]}"] = [
                a / b for a, b in zip(k, ov[name]["ns"])]
    lines += ["", "| ratio (computed per round) | median (min-max) |", "|---|---|"]
    lines += [f"| {name} | {median_range(v)} |" for name, v in ratios.items()]
    ing = res["ingest"]
    lines += ["", "## Ingest\n",
              f"One drain of {ing['records']} real records (filled while nothing drained): "
              f"ring read {ing['read_per_s'] / 1e6:.2f} M records/s; read + decode + ledger "
              f"{ing['drain_per_s'] / 1e6:.2f} M events/s; lost {ing['lost_big_ring']}.\n",
              "Sustained, two loops at full speed (one per core), drained every 10 ms:\n",
              "| ring pages | calls made | counted (records, and the kernel's counts for the lost) | records lost (all kinds) | counts exact | calls/s sustained |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {s['pages']} | {s['made']} | {s['seen']} | {s['lost']} | "
              f"{'yes' if s['seen'] == s['made'] else 'NO'} | {s['rate']:.0f} |"
              for s in ing["sizes"]]
    lines += ["", "## Memory\n",
              "Whole ad-hoc runs and start-up against bpftrace: bench/startup.py "
              "(bench/results/STARTUP.md).\n", "| events | events kept (-o) | peak RSS |", "|---|---|---|"]
    lines += [f"| {r['events']} | {'yes' if r['saved'] else 'no'} | {r['peak_rss_mb']:.0f} MB |" for r in res["rss"]]
    if res.get("scan"):
        lines += ["", "## Scan\n", res["scan"]]
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ov = res["overhead"]
    names = [n for n in ov if n != "untraced"]
    med = [statistics.median(ov[n]["ns"]) / 1000 for n in names]
    lo = [m - min(ov[n]["ns"]) / 1000 for m, n in zip(med, names)]
    hi = [max(ov[n]["ns"]) / 1000 - m for m, n in zip(med, names)]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(names) + 1.2))
    ax.barh(names, med, xerr=[lo, hi],
            color=["crimson" if n.startswith("keytrace") else "#888" for n in names])
    ax.set(xlabel="us per create+delete pair (median, min-max)", xscale="log",
           title="cost of tracing pthread_key_create + pthread_key_delete")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description="keytrace benchmarks (see the module docstring)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="smaller counts, for a smoke run")
    ap.add_argument("--overhead-only", action="store_true", help="only the side-by-side rounds")
    ap.add_argument("--baseline", default="", metavar="REF",
                    help="also run keytrace watch from a checkout of this commit, in the same "
                         "rounds (is this tree slower than REF?)")
    args = ap.parse_args()
    q = args.quick
    RESULTS.mkdir(parents=True, exist_ok=True)
    machine = f"{os.cpu_count()} cores, {os.uname().release}, {os.uname().machine}"
    res = {}
    work = Path(tempfile.mkdtemp(prefix="keytrace-bench-"))
    try:
        print("overhead (interleaved rounds):", flush=True)
        res["overhead"] = overhead(work, args.rounds, 2_000_000, 2000 if q else 20000,
                                   200 if q else 2000, args.baseline)
        if args.overhead_only:
            for name, r in res["overhead"].items():
                print(f"{name}: {median_range(r['ns'])} ns, verified {r['verified']}/{len(r['ns'])}")
            return
        print("ingest:", flush=True)
        res["ingest"] = ingest(work, 20000 if q else 100000)
        print("memory:", flush=True)
        res["rss"] = [peak_rss(work, 60_000 if q else 1_000_000, False),
                      peak_rss(work, 60_000 if q else 1_000_000, True)]
        print("scan:", flush=True)
        scan = subprocess.run([sys.executable, str(ROOT / "bench" / "scan.py"), "--processes",
                               "300", "--rounds", "3" if q else "5"], capture_output=True, text=True)
        res["scan"] = scan.stdout.strip()
    finally:
        end_all()
        if args.baseline:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                            str(work / f"baseline-{args.baseline}")], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    text = report(res, machine)
    (RESULTS / "RESULTS.md").write_text(text)
    plot(res, RESULTS / "overhead.png")
    print(text)


if __name__ == "__main__":
    main()
