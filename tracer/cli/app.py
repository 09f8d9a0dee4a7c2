"""The keytrace command. Thin: it parses, starts a KeyTracer or loads a Ledger, and prints what
tracer.analysis decided. Errors the user can act on are one line on stderr and exit 1; a
--fail-on-leak gate that trips exits 3.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional

import typer
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from .. import resource as resources
from ..analysis import forecast, verdicts
from ..analysis.ledger import Ledger
from ..bpf import doctor as doctor_mod
from ..errors import KeytraceError, UsageError
from ..host import libc
from ..session import KeyTracer
from ..store.files import check_writable, json_lines, save_table

from . import agent as agent_command
from . import calls as calls_command
from .console import (EXIT_ERROR, EXIT_LEAK, EXIT_USAGE, RELOADS_PER_DAY, command_status, err,
                      fail, failure, note, out)

# pandas is imported where a frame is shown, not here: it must not be resident while bcc
# compiles the probes (clang/LLVM), or both peaks add up (tests/test_layers.py checks).
if TYPE_CHECKING:
    import pandas as pd

VIEWS = ("process", "library", "reload")

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Trace pthread key creation and deletion with eBPF uprobes, and flag the "
                       "processes that leak keys before they run out (glibc allows 1024); "
                       "trace or count any library call (keytrace calls).")
app.command(context_settings={"allow_interspersed_args": False})(calls_command.calls)
app.command()(agent_command.agent)


# -- presentation ----------------------------------------------------------------------------
def summary_table(summary: pd.DataFrame, title: str = "pthread keys per process",
                  limit: Optional[int] = None, resource=None) -> Table:
    """A summary as a table, in the resource's words (pthread keys: CREATES, DELETES, LIVE)."""
    import pandas as pd
    r = resource or resources.default()
    acq, rel, live = (r.word(w) for w in ("acquires", "releases", "in_use"))
    t = Table(title=title, title_justify="left")
    heads = [("PID", "right"), ("COMM", "left"), (acq.upper(), "right"), (rel.upper(), "right"),
             ("FAILED", "right"), ("LIVE" if live != "in_use" else "IN USE", "right"), ("ORPHANED", "right"),
             ("LIBRARY", "left"), ("RUNS OUT IN", "left"), ("VERDICT", "left")]
    for name, just in heads:
        t.add_column(name, justify=just, no_wrap=name not in ("VERDICT", "LIBRARY"))
    rows = summary if limit is None else summary.head(limit)
    for row in rows.to_dict(orient="records"):
        style = "bold red" if row["critical"] else "yellow" if row["leaking"] else None
        verdict = ("CRITICAL: " + row["reason"] if row["critical"] else
                   "LEAKING: " + row["reason"] if row["leaking"] else
                   "ok" + (f" ({row['reason']})" if row["reason"] else ""))
        headroom = row[r.word("headroom")]
        known = ">=" if pd.isna(headroom) else ""  # handles before tracing unknown
        of = f"/{row['limit']}" if row["limit"] is not None and row["limit"] == row["limit"] else ""
        t.add_row(str(row["pid"]), row["comm"] + ("" if row["alive"] else " (exited)"),
                  str(row[acq]), str(row[rel]), str(row[r.word("failed_acquires")]),
                  f"{known}{row[live]}{of}", str(row[r.word("orphaned")]),
                  os.path.basename(row["library"]) or "-", runs_out(row), verdict, style=style)
    if limit is not None and len(summary) > limit:
        t.caption = f"{len(summary) - limit} more processes"
    return t


def sampled_table(summary: pd.DataFrame, title: str, r) -> Table:
    """The summary of a resource whose table is read at each reload cycle (fds, threads...)."""
    import pandas as pd
    t = Table(title=title, title_justify="left")
    for name, just in [("PID", "right"), ("COMM", "left"), ("IN USE", "right"),
                       ("LEFT", "right"), ("CYCLES", "right"), ("PER CYCLE", "right"),
                       ("GROWS", "left"), ("RELOADED", "left"), ("RUNS OUT IN", "left"),
                       ("VERDICT", "left")]:
        t.add_column(name, justify=just, no_wrap=name not in ("VERDICT", "GROWS"))
    for row in summary.to_dict(orient="records"):
        style = "bold red" if row["critical"] else "yellow" if row["leaking"] else None
        verdict = ("CRITICAL: " if row["critical"] else "LEAKING: " if row["leaking"] else
                   "ok" + (" " if row["reason"] else "")) + row["reason"]
        read = not pd.isna(row["in_use"])
        of = f"/{row['limit']}" if read and not pd.isna(row["limit"]) else ""
        t.add_row(str(row["pid"]), row["comm"] + ("" if row["alive"] else " (exited)"),
                  ("≥" if row.get("estimate") else "") + f"{row['in_use']}{of}" if read else "-",
                  "-" if pd.isna(row["headroom"]) else str(row["headroom"]),
                  str(row["reload_cycles"]), f"{row['per_cycle']:g}", escape(row["owner"] or "-"),
                  os.path.basename(row["library"]) or "-", runs_out(row), escape(verdict),
                  style=style)
    return t


def runs_out(r: dict) -> str:
    if not r["leaking"]:
        return "-"
    if r["days_left"] is not None and r["days_left"] == r["days_left"]:
        return forecast.describe(r["days_left"])
    if r["limit"] is None or r["limit"] != r["limit"]:
        return "no limit given"
    return "too little data" if "too little" in r["rate_basis"] else "no rate known"


def frame_table(df: pd.DataFrame, title: str) -> Table:
    """Any analysis frame (per library, per reload) as a plain table."""
    t = Table(title=title, title_justify="left")
    for c in df.columns:
        t.add_column(c.upper().replace("_", " "), overflow="fold")
    for rec in df.itertuples(index=False):
        t.add_row(*[f"{v:g}" if isinstance(v, float) else str(v) for v in rec])
    return t


def emit(ledger: Ledger, as_json: bool, fail_on_leak: bool, title: str,
         reloads_per_day: Optional[float] = None, view: str = "process",
         names: Optional[list] = None) -> None:
    """What a ledger shows, each resource in its own words; JSON lines of all of them. names:
    the resources to show, even those the ledger met no call of (what a watch was asked for);
    None: pthread keys, then every other resource the ledger holds (report)."""
    flagged = False
    if names is None:
        names = [resources.default().name] + [n for n in ledger.resources()
                                              if n != resources.default().name]
    for name in names:
        r = ledger.declaration(name)
        keys = name == resources.default().name
        summary = ledger.summary(reloads_per_day=reloads_per_day, resource=r)
        flagged |= not verdicts.flagged(summary).empty
        shown = {"process": lambda: summary, "library": lambda: ledger.by_library(resource=r),
                 "reload": lambda: ledger.reloads(resource=r)}[view]()
        what = title if keys else f"{name} per process"
        if as_json:
            sys.stdout.write(json_lines(shown))
            sys.stdout.flush()
        elif shown.empty:
            out.print(("No process created or deleted a pthread key." if keys else
                       f"No process called {' or '.join(r.acquire + r.release)}." if r.traced
                       else f"No process's {name} table was read at a reload cycle.")
                      if view == "process" else f"Nothing to show per {view} ({name}).")
        elif view == "process" and not r.traced:
            out.print(sampled_table(summary, f"{name} per process, read at each reload cycle",
                                    r))
        elif view == "process":
            out.print(summary_table(summary, title=what, resource=r))
        else:
            out.print(frame_table(shown, title=f"{what}, per {view}"))
    if ledger.lost:
        err.print(f"keytrace: warning: {ledger.lost} events were lost (the kernel could not "
                  "queue them: ring buffer full, or on kernels 6.15+ its lock gave up): the counts "
                  "are lower bounds; raise --ring-pages if it was full", markup=False)
    if fail_on_leak and flagged:
        raise typer.Exit(EXIT_LEAK)


def run_session(tracer: KeyTracer, duration: Optional[float], output: Optional[Path],
                as_json: bool, fail_on_leak: bool, title: str,
                reloads_per_day: Optional[float] = None, view: str = "process") -> Ledger:
    """Start, show a live table while tracing, stop on any end condition, report."""
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    live = Live(console=err, refresh_per_second=4, transient=True) if err.is_terminal else None
    why = "stopped"
    try:
        tracer.start()
        if live:
            live.start()
        first = tracer.ledger.declaration(getattr(tracer, "shown", [None])[0])
        tick = (lambda: live.update(summary_table(tracer.ledger.summary(resource=first),
                                                  title=title if first == resources.default()
                                                  else f"{first.name} per process",
                                                  limit=15, resource=first))) \
            if live else None
        try:
            why = tracer.wait(duration=duration, stop=stop, tick=tick)
        except KeyboardInterrupt:
            pass
    finally:
        if live:
            live.stop()
        signal.signal(signal.SIGTERM, previous)
        try:
            # the probes detach (the kernel's grace periods) while the report is made
            tracer.stop(wait=False)
        except BaseException:  # a drain that failed: the detach is waited for, the failure told
            try:
                tracer.stop()
            except Exception:
                pass  # (the failure being raised is the one to tell)
            raise
    try:
        return _report(tracer, output, as_json, fail_on_leak, title, reloads_per_day, view, why)
    finally:
        tracer.stop()  # the detach has ended: no probe outlives the command


def _report(tracer: KeyTracer, output: Optional[Path], as_json: bool, fail_on_leak: bool,
            title: str, reloads_per_day: Optional[float], view: str, why: str) -> Ledger:
    tracer.check()  # a failure of the drain thread after the wait ended
    unsaved = None
    if output is not None:
        try:
            tracer.ledger.save(output)
            err.print(f"keytrace: wrote {tracer.ledger.event_count} events to {output}",
                      markup=False)
        except KeytraceError as e:  # (a full disk): the summary is still worth printing
            unsaved = e
    status = command_status(tracer.returncode, why)
    if status:
        err.print(f"keytrace: the command exited with status {status}", markup=False)
    try:
        emit(tracer.ledger, as_json, fail_on_leak, title, reloads_per_day, view,
             names=getattr(tracer, "shown", None))
    except typer.Exit:
        if not status and unsaved is None:
            raise  # a leak fails the gate when the command itself succeeded
    if unsaved is not None:
        raise failure(unsaved)
    if status:
        raise typer.Exit(status)
    return tracer.ledger


def announce(t: KeyTracer) -> None:
    scope = ("the whole host" if t.pids is None and t.command is None
             else f"pid {t.process.pid} ({t.command[0]}) and its children" if t.command
             else "pids " + ", ".join(map(str, t.pids)) + " and their children")
    sites = f"; {'; '.join(t.plan_notes)}" if t.plan_notes else ""
    err.print(f"keytrace: {t.attached} probes attached in {len(t.files)} file(s) "
              f"({', '.join(t.files)}); tracing {scope}{sites}", markup=False, soft_wrap=True)


def check_view(by: str) -> None:
    if by not in VIEWS:
        raise fail(f"--by takes one of {', '.join(VIEWS)}, not {by!r}", EXIT_USAGE)


# Options shared by watch and report (typer reads these as declarations, so one serves both).
BY = typer.Option("process", "--by", help="Report per process, library (which library made the "
                  "keys) or reload (what each load/unload cycle leaves).")


# -- commands ---------------------------------------------------------------------------------
@app.command(context_settings={"allow_interspersed_args": False})
def watch(
    command: Optional[List[str]] = typer.Argument(
        None, help="Launch this command (after --) and trace it with its children."),
    pid: Optional[List[int]] = typer.Option(None, "--pid", "-p", help="Trace this process and its "
                                            "children (repeatable). Default: the whole host."),
    duration: Optional[float] = typer.Option(None, "--duration", "-d", min=0,
                                             help="Stop after this many seconds."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Save the event ledger: "
                                          ".parquet, .csv or .jsonl, by extension."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON lines, one "
                                 "object per process."),
    fail_on_leak: bool = typer.Option(False, "--fail-on-leak", help="Exit 3 when any process is "
                                      "flagged leaking or critical."),
    ring_pages: int = typer.Option(2048, "--ring-pages", help="Ring buffer size in 4 KiB pages "
                                   "(a power of two)."),
    reloads_per_day: Optional[float] = RELOADS_PER_DAY,
    by: str = BY,
    sites: str = typer.Option("planned", "--sites", help="planned: probe instructions inside "
                              "pthread_key_create/delete that the kernel emulates, where a plan "
                              "is proved and passes its self-test (else entry probes); entry: "
                              "entry and return probes everywhere."),
    pair: Optional[List[str]] = typer.Option(None, "--pair", help="Also trace an acquire/"
                                             "release pair of your own (repeatable): "
                                             "LIB:ACQUIRE=WHERE/RELEASE=WHERE, WHERE one of ret, "
                                             "argN, *argN, e.g. 'libc:fopen=ret/fclose=arg0'."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="The --pair handles' limit per "
                                        "process, for a forecast (for file descriptors: the "
                                        "RLIMIT_NOFILE)."),
    resource: List[str] = typer.Option(["keys"], "--resource", "-r", help="The resources to "
                                       "judge: a comma list of " + ", ".join(
                                           r.name for r in resources.known())
                                       + ", or all. " + ", ".join(
                                           r.name for r in resources.known() if not r.traced)
                                       + " are read at each reload cycle, not traced."),
):
    """Trace pthread_key_create/delete (and dlopen/dlclose, fork, exec, exit) and report, per
    process, the keys created, deleted and still live, flagging leaks.

    Ends on Ctrl-C, SIGTERM, --duration, when the launched command exits (one still running
    then is terminated), or when every --pid process has exited.

    \b
    Examples:
      keytrace watch -- apache2ctl -X            trace a command and its children
      keytrace watch -p 1234 -d 60 --json        one process for a minute, JSON lines
      keytrace watch -d 3600 -o keys.parquet     the whole host for an hour, saved
      keytrace watch --fail-on-leak -- ./tests   a CI gate: exit 3 on a leak
      keytrace watch --reloads-per-day 1 --by library -- ./host libA.so 10
      keytrace watch --pair 'libc:fopen=ret/fclose=arg0' -p 1234 -d 60
      keytrace watch --pair 'libc:timer_create=*arg2/timer_delete=arg0' --limit 60000 -- ./server
    """
    check_view(by)
    try:
        if output is not None:
            check_writable(output)
        # Events are kept only to be saved: the report needs the state alone (flat memory).
        tracer = KeyTracer(pids=pid or None, command=command or None, ring_pages=ring_pages,
                           keep_events=output is not None, on_ready=announce, on_note=note,
                           sites=sites, pairs=pair or (), limit=limit, resources=resource)
        run_session(tracer, duration, output, as_json, fail_on_leak, "pthread keys per process",
                    reloads_per_day, by)
    except KeytraceError as e:
        raise failure(e)


@app.command()
def report(
    file: Path = typer.Argument(..., help="A ledger saved by keytrace watch --output."),
    as_json: bool = typer.Option(False, "--json", help="JSON lines, one object per process."),
    fail_on_leak: bool = typer.Option(False, "--fail-on-leak", help="Exit 3 when any process is "
                                      "flagged."),
    reloads_per_day: Optional[float] = RELOADS_PER_DAY,
    by: str = BY,
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="The limit per process of "
                                        "the ledger's --pair handles, for the forecast (default: "
                                        "the --limit it was traced with)."),
):
    """Analyse a saved event ledger exactly as watch analyses a live one.

    \b
    Examples:
      keytrace report keys.parquet
      keytrace report keys.jsonl --json | jq 'select(.leaking)'
      keytrace report keys.parquet --by library
      keytrace report keys.parquet --by reload --reloads-per-day 1
      keytrace report files.parquet --limit 1024   a --pair ledger, dated against 1024
    """
    check_view(by)
    try:
        ledger = Ledger.from_file(file, limit=limit)
    except KeytraceError as e:
        raise failure(e)
    emit(ledger, as_json, fail_on_leak, f"pthread keys ({file})", reloads_per_day, by)


@app.command()
def demo(
    interval_ms: float = typer.Option(2.0, "--interval-ms", min=0, help="Pause between reloads."),
    as_json: bool = typer.Option(False, "--json", help="JSON lines, one object per process."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Save the event ledger."),
    reloads_per_day: Optional[float] = typer.Option(
        1.0, "--reloads-per-day", min=0, help="Reload cycles per day for the forecast (the "
        "incident: one graceful restart a day)."),
):
    """The incident, reproduced: a host that reloads a leaky library (as Apache reloaded PHP's
    Imagick and its libgomp) beside one that reloads a tidy library, traced live until glibc
    refuses the leaky one a key (EAGAIN).

    \b
    Example:
      keytrace demo
    """
    from ..bpf.headers import CACHE
    from ..workloads import build_demo
    try:
        if output is not None:
            check_writable(output)
        w = build_demo(CACHE / "workloads")
        us = str(int(interval_ms * 1000))
        # One shell launches both hosts; keytrace follows its children.
        script = ('"$0" "$1" 1200 "$3" & "$0" "$2" 0 "$3"; wait')
        cmd = ["sh", "-c", script, str(w["reload_host"]), str(w["libtidy"]), str(w["libimagick"]), us]
        err.print("keytrace demo: a reload_host reloads libimagick_demo.so, whose dependency "
                  "libgomp_demo.so creates a pthread key per load and never deletes it, until glibc "
                  "refuses one; beside it a reload_host reloads the tidy libtidy.so",
                  markup=False, soft_wrap=True)
        tracer = KeyTracer(command=cmd, keep_events=output is not None, on_ready=announce, on_note=note)
        ledger = run_session(tracer, None, output, as_json, False,
                             "keytrace demo: pthread keys per process", reloads_per_day)
        if not as_json:
            explain_reloads(ledger, reloads_per_day)
    except KeytraceError as e:
        raise failure(e)


def same_processes(rows: pd.DataFrame) -> dict:
    """{pid: keys a second} of the ledger's processes that still run as the same process (same
    start), to be dated by what the ledger measured of them."""
    from ..host import proc
    out = {}
    for r in rows.itertuples():
        try:
            start = proc.stat(int(r.pid)).start_ns
        except (OSError, IndexError, ValueError):
            continue
        if abs(start - r.start.value) < 10**9:  # one second: the start as two reads give it
            out[int(r.pid)] = float(r.keys_per_second)
    return out


def scan_table(df: pd.DataFrame, show_all: bool) -> Table:
    t = Table(title="pthread key tables (keytrace scan)", title_justify="left")
    for name, just in [("PID", "right"), ("COMM", "left"), ("KEYS", "right"), ("LIMIT", "right"),
                       ("ORPHANED", "right"), ("LIBRARY", "left"), ("RUNS OUT IN", "left"),
                       ("STATUS", "left"), ("VERDICT", "left")]:
        t.add_column(name, justify=just, overflow="fold")
    shown = df if show_all else df[df["status"] != "kernel thread"]
    for r in shown.itertuples():
        ok = r.status == "ok"
        full = ok and verdicts.near_limit(r.keys_in_use, r.limit)
        style = "bold red" if full else "yellow" if r.leaking else None
        dated = r.days_left is not None and r.days_left == r.days_left
        t.add_row(str(r.pid), r.comm, str(r.keys_in_use) if ok else "-",
                  str(r.limit) if ok else "-", str(r.orphaned_keys) if ok else "-",
                  os.path.basename(r.library) if r.library else "-",
                  forecast.describe(r.days_left) if dated else "-",
                  r.status, ("LEAKING: " + r.reason) if r.leaking else "-", style=style)
    counts = df["status"].value_counts()
    t.caption = ", ".join(f"{n} {status}" for status, n in counts.items())
    return t


def census_table(df: pd.DataFrame, show_all: bool) -> Table:
    import pandas as pd
    t = Table(title="per-process tables (keytrace scan --resource)", title_justify="left")
    for name, just in [("PID", "right"), ("COMM", "left"), ("RESOURCE", "left"),
                       ("IN USE", "right"), ("LIMIT", "right"), ("LEFT", "right"),
                       ("LIMIT THAT BINDS", "left"), ("TOP OWNER", "left"), ("STATUS", "left"),
                       ("VERDICT", "left")]:
        t.add_column(name, justify=just, overflow="fold")
    shown = df if show_all else df[df["status"] != "kernel thread"]
    for r in shown.itertuples():
        ok = r.status == "ok"
        style = "bold red" if r.critical else "yellow" if r.leaking else None
        top = f"{r.owner} ({r.owners[r.owner]})" if ok and r.owner else "-"
        verdict = ("CRITICAL: " if r.critical else "LEAKING: " if r.leaking else "") + r.reason
        t.add_row(str(r.pid), r.comm, r.resource,
                  ("≥" if r.estimate else "") + str(r.in_use) if ok else "-",
                  "none" if ok and pd.isna(r.limit) else str(r.limit) if ok else "-",
                  str(r.headroom) if ok and not pd.isna(r.headroom) else "-",
                  (r.limit_source or "-") if ok else "-", escape(top), r.status,
                  escape(verdict or "-"), style=style)
    counts = df.drop_duplicates("pid")["status"].value_counts()
    t.caption = f"{df['pid'].nunique()} processes: " + ", ".join(
        f"{n} {status}" for status, n in counts.items()) + " (by the first table)"
    return t


def scan_resources(names: List[str], pid, ledger, reloads_per_day, leak_per_reload, as_json,
                   output, show_all) -> None:
    """keytrace scan --resource: every table named, read now (tracer.analysis.census)."""
    from ..analysis.census import read_tables
    from ..host import proc
    if ledger is not None:
        raise UsageError("--ledger dates pthread key scans; leave out --resource")
    if err.is_terminal and not pid:
        from rich.progress import Progress
        with Progress(console=err, transient=True) as bar:
            task = bar.add_task("scanning", total=len(proc.pids()))
            df = read_tables(names, None, reloads_per_day, leak_per_reload,
                             progress=lambda: bar.advance(task))
    else:
        df = read_tables(names, pid or None, reloads_per_day, leak_per_reload)
    if output is not None:
        save_table(df, output)
    if as_json:
        sys.stdout.write(json_lines(df))
    else:
        out.print(census_table(df, show_all))


def explain_reloads(ledger: Ledger, reloads_per_day: float) -> None:
    """What each reload leaves behind, and the incident's arithmetic for a fresh process."""
    import pandas as pd
    reloads = ledger.reloads()
    leaking = reloads[reloads["keys_per_cycle"] > 0]
    if leaking.empty:
        return
    out.print(frame_table(reloads, "what each load/unload cycle leaves behind"))
    for r in leaking.itertuples():
        f = forecast.forecast(0, libc.GLIBC_KEYS_MAX, pd.Timestamp.now(tz="UTC"),
                              r.keys_per_cycle, reloads_per_day)
        out.print(f"{r.finding}: at {reloads_per_day:g} reload(s) a day a fresh process runs out "
                  f"of its {f.limit} keys in {forecast.describe(f.days_left)}"
                  + (f", on {f.exhaustion_eta:%Y-%m-%d}." if f.exhaustion_eta is not None else "."),
                  markup=False)


@app.command()
def scan(
    pid: Optional[List[int]] = typer.Option(None, "--pid", "-p", help="Scan this process "
                                            "(repeatable). Default: every process."),
    as_json: bool = typer.Option(False, "--json", help="JSON lines, one object per process."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Save the scan: .parquet, "
                                          ".csv or .jsonl, by extension."),
    reloads_per_day: Optional[float] = typer.Option(
        None, "--reloads-per-day", min=0, help="Forecast exhaustion for processes that leak: "
        "those with orphaned keys (taken as 1 key per reload, see --leak-per-reload) or "
        "whose executable leaks in --ledger."),
    leak_per_reload: float = typer.Option(1.0, "--leak-per-reload", min=0, help="Keys a reload "
                                          "leaves, for processes with orphaned keys."),
    ledger: Optional[Path] = typer.Option(None, "--ledger", help="A saved watch ledger: what "
                                          "it measured (keys per reload, per executable; keys a "
                                          "second of a leak not tied to reloads, per process "
                                          "still running) dates the processes scanned now."),
    show_all: bool = typer.Option(False, "--all", help="List kernel threads in the table too."),
    resource: Optional[List[str]] = typer.Option(
        None, "--resource", "-r", help="Read these tables instead, a row per process and "
        "resource: a comma list of " + ", ".join(r.name for r in resources.known() if r.census)
        + ", or all. In use, the limit that binds, headroom and the top owners."),
):
    """Read the live pthread key table of every process (or the given ones) through
    /proc/PID/mem: keys in use against the limit, orphaned keys (destructor in no mapping),
    and who the destructors belong to. No tracing history needed. With --resource, the other
    tables a process can run out of, from /proc: fds, threads, mappings, timers.

    \b
    Examples:
      keytrace scan                              every process on the host
      keytrace scan -p 1234 --json               one process, JSON
      keytrace scan --reloads-per-day 1          with a forecast for the leaking ones
      keytrace scan --ledger keys.parquet --reloads-per-day 1
      keytrace scan -r all                       every table of every process
      keytrace scan -r fds,threads -p 1234       two tables of one process
    """
    from ..analysis.scan import scan as scan_processes
    from ..host import proc
    try:
        if output is not None:
            check_writable(output)
        for p in pid or ():
            if not proc.exists(p):
                raise KeytraceError(f"no process with pid {p}")
        if resource:
            return scan_resources(resource, pid, ledger, reloads_per_day, leak_per_reload,
                                  as_json, output, show_all)
        rates = steady = None
        if ledger is not None:  # what the history measured, per executable
            s = Ledger.from_file(ledger).summary()
            rates = s[s["leak_per_reload"] > 0].groupby("exe")["leak_per_reload"].max().to_dict()
            steady = same_processes(s[s["leaking"] & s["keys_per_second"].notna()])
        if err.is_terminal and not pid:
            from rich.progress import Progress
            n = len(proc.pids())
            with Progress(console=err, transient=True) as bar:
                task = bar.add_task("scanning", total=n)
                df = scan_processes(None, reloads_per_day, rates, leak_per_reload,
                                    progress=lambda: bar.advance(task), keys_per_second=steady)
        else:
            df = scan_processes(pid or None, reloads_per_day, rates, leak_per_reload,
                                keys_per_second=steady)
        if output is not None:
            save_table(df, output)
    except KeytraceError as e:
        raise failure(e)
    if as_json:
        sys.stdout.write(json_lines(df))
    else:
        out.print(scan_table(df, show_all))


# Prometheus' default port allocations have used up 9100-9999 and go on past 10000 (10019 is
# taken): this one is past what we could read of the list. Register it before relying on it.
@app.command()
def doctor():
    """Check every prerequisite of tracing and print the fix for each failure.

    \b
    Example:
      sudo keytrace doctor
    """
    t = Table(title="keytrace doctor", title_justify="left")
    for c in ("CHECK", "RESULT", "DETAIL", "FIX"):
        t.add_column(c)
    checks = doctor_mod.run_all()
    for c in checks:
        t.add_row(c.name, "[green]pass[/]" if c.ok else "[red]FAIL[/]", c.detail, c.fix)
    out.print(t)
    if not all(c.ok for c in checks):
        raise typer.Exit(EXIT_ERROR)


def main() -> None:
    # A closed stdout (keytrace ... | head) is not an error worth a traceback.
    try:
        app()
    except BrokenPipeError:
        os._exit(EXIT_ERROR)


if __name__ == "__main__":
    main()
