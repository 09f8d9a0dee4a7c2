"""keytrace calls against bpftrace and ltrace, side by side in one run:
`sudo .venv/bin/python bench/calls.py`.

Part 3, whole runs of sort and git log -p: keytrace calls -c on FUNC@MAIN against ltrace -c's
FUNC@MAIN, and keytrace calls -S -c against strace -c -f and ltrace -S -c, with the counts each
saw (bench/results/CALLS-CALLERS.md).

Part 2, counts on real programs: sort, git log -p, sqlite3 and curl, each run against a private
copy of libc, counted by keytrace calls -c on its planned sites, by keytrace on the (safe) entry
sites (--sites entry), and by bpftrace on the implementation symbols the IFUNCs chose, where the
entry is safe to probe (bpftrace has no such check: on memset's AVX-512 entry it would corrupt
the workload). The three counts must agree.

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


# -- part 2: counts on real programs ----------------------------------------------------------
FUNCTIONS = ["malloc", "free", "memcpy", "memset", "strlen", "strchr", "memchr", "strcmp"]


def workloads(work: Path) -> dict:
    """name -> argv of the tester's programs, on inputs made here (deterministic)."""
    data = work / "lines.txt"
    data.write_text("".join(f"line {(i * 7919) % 90001} of the sort input\n" for i in range(90_000)))
    repo = work / "repo"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    for i in range(30):
        (repo / f"f{i % 5}.txt").write_text("".join(f"{i} {j}\n" for j in range(200 + i)))
        subprocess.run(["git", "-C", str(repo), "add", "-A"], check=True)
        subprocess.run(["git", "-C", str(repo), "-c", "user.name=k", "-c", "user.email=k@k",
                        "commit", "-q", "-m", f"commit {i}"], check=True,
                       env={**os.environ, "GIT_AUTHOR_DATE": "2026-01-01T00:00:00",
                            "GIT_COMMITTER_DATE": "2026-01-01T00:00:00"})
    sql = work / "q.sql"
    sql.write_text("create table t(a integer, b text);\n"
                   "with recursive c(x) as (select 1 union all select x + 1 from c where x < 20000)"
                   " insert into t select x, printf('row %d', x) from c;\n"
                   "select count(*), sum(length(b)) from t where b like '%7%';\n")
    return {"sort": ["sort", str(data)],
            "git log -p": ["git", "-C", str(repo), "--no-pager", "log", "-p"],
            "sqlite3": ["sqlite3", "-batch", "-init", str(sql), ":memory:", ".quit"],
            "curl": ["curl", "-s", "-o", "/dev/null", f"file://{data}"]}


def keytrace_counts(libc_copy: Path, argv: list, sites: str) -> tuple:
    env_argv = ["env", f"LD_LIBRARY_PATH={libc_copy.parent}", *argv]
    t0 = time.monotonic()
    r = subprocess.run([*KEYTRACE, "calls", "-c", "--json", "--sites", sites,
                        *[a for f in FUNCTIONS for a in ("-e", f"{libc_copy}:{f}")], "--",
                        *env_argv], capture_output=True, text=True, cwd=ROOT, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"keytrace calls failed: {r.stderr.strip()[-300:]}")
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    return {row["function"]: row["calls"] for row in rows}, time.monotonic() - t0


def bpftrace_counts(libc_copy: Path, argv: list, sites: dict) -> tuple:
    """Counts on the implementation addresses (function name -> address) given."""
    probes = " ".join(f"uprobe:{libc_copy}:{addr:#x} {{ @[\"{name}\"] = count(); }}"
                      for name, addr in sites.items())
    env_argv = ["env", f"LD_LIBRARY_PATH={libc_copy.parent}", *argv]
    t0 = time.monotonic()
    env_argv[0] = shutil.which("env")  # bpftrace -c wants a unique path
    r = subprocess.run(["bpftrace", "-e", probes, "-c", " ".join(env_argv)], capture_output=True,
                       text=True, timeout=600)
    counts = {m.group(1): int(m.group(2)) for m in re.finditer(r'@\["?([^"\]]+)"?\]: (\d+)', r.stdout)}
    return counts, time.monotonic() - t0


def safe_entries(libc_copy: Path) -> dict:
    """function (as keytrace names it) -> implementation address, for the functions whose entry
    instruction the policy allows: bpftrace probes the entry, with no check of its own."""
    from tracer.bpf import stepcheck
    from tracer.host import patterns, planner
    policy = stepcheck.policy()
    out = {}
    for t in patterns.resolve([f"{libc_copy}:{f}" for f in FUNCTIONS]):
        try:
            if planner.entry_site(t.path, t.address, t.function, policy).address == t.address:
                out[t.function] = t.address
        except planner.Refused:
            pass
    return out


def compare_workloads(work: Path, libdir: Path) -> list:
    libc_copy = libdir / "libc.so.6"
    entries = safe_entries(libc_copy)
    lines = ["",
             f"Each program runs against a private copy of libc; functions: {', '.join(FUNCTIONS)} "
             "(memcpy and memmove share glibc's implementation: one row). bpftrace probes only the "
             f"implementations whose entry is safe here ({', '.join(sorted(entries))}); keytrace's "
             "entry sites move past an unsafe first instruction.", "",
             "| program | function | planned sites | entry sites | bpftrace | agree |",
             "|---|---|---|---|---|---|"]
    for name, argv in workloads(work).items():
        planned, t_planned = keytrace_counts(libc_copy, argv, "planned")
        entry, t_entry = keytrace_counts(libc_copy, argv, "entry")
        bt, t_bt = bpftrace_counts(libc_copy, argv, {k: v for k, v in entries.items() if k in planned})
        print(f"  {name}: planned {t_planned:.1f} s, entry {t_entry:.1f} s, bpftrace {t_bt:.1f} s",
              flush=True)
        for fn in sorted(planned):
            b = bt.get(fn, 0) if fn in entries else None
            agree = planned[fn] == entry.get(fn) and (b is None or b == planned[fn])
            lines.append(f"| {name} | {fn} | {planned[fn]:,} | {entry.get(fn, 0):,} | "
                         f"{'-' if b is None else f'{b:,}'} | {'yes' if agree else 'NO'} |")
        lines.append(f"| {name} | (wall time, whole run) | {t_planned:.1f} s | {t_entry:.1f} s | "
                     f"{t_bt:.1f} s | |")
    return lines


# -- part 3: calls from the program (FUNC@MAIN) and system calls (-S), against ltrace and strace --
MAIN_FUNCTIONS = ["malloc", "free", "strlen", "getenv", "fopen", "open", "read"]


def _timed(argv: list, **kw) -> tuple:
    t0 = time.monotonic()
    r = subprocess.run(argv, capture_output=True, text=True, timeout=900, **kw)
    return time.monotonic() - t0, r


def _ltrace_total(text: str) -> int:
    m = re.search(r"^100\.00\s+[\d.]+\s+(\d+) total$", text, re.M)
    return int(m.group(1)) if m else -1


def _strace_total(text: str) -> int:
    m = re.search(r"^\S+\s+[\d.]+\s+\d+\s+(\d+)\s+(\d+\s+)?total$", text, re.M)
    return int(m.group(1)) if m else -1


def _keytrace_total(r, prefix: str = "") -> int:
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    return sum(row["calls"] for row in rows if row["function"].startswith(prefix))


def compare_callers(work: Path, rounds: int) -> list:
    """Wall time of a whole run and what it counted, interleaved rounds: FUNC@MAIN -c against
    ltrace -c's FUNC@MAIN; -S -c against strace -c -f and ltrace -S -c."""
    progs = workloads(work)
    progs = {"sort": progs["sort"], "git log -p": progs["git log -p"]}
    main_e = [x for f in MAIN_FUNCTIONS for x in ("-e", f"{f}@MAIN")]
    runs = {
        "untraced": lambda a: (_timed(a), None),
        "keytrace calls -c FUNC@MAIN": lambda a: (
            (t := _timed([*KEYTRACE, "calls", "-c", "--json", *main_e, "--", *a], cwd=ROOT)),
            _keytrace_total(t[1])),
        "ltrace -c FUNC@MAIN": lambda a: (
            (t := _timed(["ltrace", "-c", "-e", "+".join(f"{f}@MAIN" for f in MAIN_FUNCTIONS),
                          *a])), _ltrace_total(t[1].stderr)),
        "keytrace calls -S -c": lambda a: (
            (t := _timed([*KEYTRACE, "calls", "-S", "-c", "--json", "-e", "getpid", "--", *a],
                         cwd=ROOT)), _keytrace_total(t[1], "SYS_")),
        "strace -c -f": lambda a: ((t := _timed(["strace", "-f", "-c", *a])),
                                   _strace_total(t[1].stderr)),
        "ltrace -S -c": lambda a: ((t := _timed(["ltrace", "-S", "-c", "-e", "getpid", *a])),
                                   _ltrace_total(t[1].stderr)),
    }
    times = {(p, n): [] for p in progs for n in runs}
    counted = {}
    names = list(runs)
    for r in range(rounds):
        for prog, argv in progs.items():
            for name in names[r % len(names):] + names[:r % len(names)]:
                (secs, _), n = runs[name](argv)
                times[(prog, name)].append(secs)
                counted[(prog, name)] = n
                print(f"  round {r + 1}: {prog}: {name}: {secs:.2f} s, counted {n}", flush=True)
    lines = ["", "## Calls from the program (FUNC@MAIN) and system calls (-S)", "",
             f"Whole runs, {rounds} interleaved rounds, medians (range). FUNC@MAIN: "
             f"{', '.join(MAIN_FUNCTIONS)}; ltrace sees only the calls through the program's PLT "
             "(none through its GOT: a function whose address it takes). -S -c counts every "
             "system call (strace -c -f the same, but the program's first execve and exit_group).",
             "", "| program | tool | seconds | x untraced | calls counted |", "|---|---|---|---|---|"]
    for prog in progs:
        base = statistics.median(times[(prog, "untraced")])
        for name in names:
            xs = times[(prog, name)]
            n = counted[(prog, name)]
            lines.append(f"| {prog} | {name} | {statistics.median(xs):.2f} ({min(xs):.2f}-"
                         f"{max(xs):.2f}) | {statistics.median(xs) / base:.1f}x | "
                         f"{'' if n is None else f'{n:,}'} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("-n", type=int, default=2_000_000, help="calls per traced run")
    ap.add_argument("--n-ltrace", type=int, default=20_000, help="calls per ltrace run")
    ap.add_argument("--only-workloads", action="store_true", help="parts 2 and 3 only")
    ap.add_argument("--only-callers", action="store_true",
                    help="part 3 only, written to bench/results/CALLS-CALLERS.md")
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
        if args.only_workloads:
            write_workloads(work, libdir)
            return
        if args.only_callers:
            write_callers(work, 3)
            return
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
    work = Path(tempfile.mkdtemp(prefix="keytrace-calls-bench-"))
    libdir = work / "libc"
    libdir.mkdir()
    shutil.copy(LIBC, libdir / "libc.so.6")
    try:
        write_workloads(work, libdir)
        write_callers(work)
    finally:
        end_all()
        shutil.rmtree(work, ignore_errors=True)


def write_callers(work: Path, rounds: int = 3) -> None:
    """Part 3, written to bench/results/CALLS-CALLERS.md."""
    text = "\n".join(["# keytrace calls: calls from the program and system calls", "",
                      f"Measured {time.strftime('%Y-%m-%d')} by `bench/calls.py` (part 3)."]
                     + compare_callers(work, rounds)[2:]) + "\n"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "CALLS-CALLERS.md").write_text(text)
    print(text)


def write_workloads(work: Path, libdir: Path) -> None:
    """Part 2, written to bench/results/CALLS-WORKLOADS.md (part 3 to CALLS-CALLERS.md)."""
    text = "\n".join(["# keytrace calls -c: counts on real programs",
                      "", f"Measured {time.strftime('%Y-%m-%d')} by `bench/calls.py` (part 2)."]
                     + compare_workloads(work, libdir)[1:]) + "\n"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "CALLS-WORKLOADS.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
