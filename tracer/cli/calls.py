"""`keytrace calls`: ltrace's interface on keytrace's engine. Thin: tracer.calls probes,
tracer.analysis.calls decides what a line, a table and a histogram say; here they are printed."""
from __future__ import annotations

import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from ..analysis import calls as report
from ..calls import CallTracer
from ..errors import KeytraceError, UsageError
from ..store.files import check_writable, json_lines, save_table
from .console import command_status, err, failure


def calls(
    command: Optional[List[str]] = typer.Argument(
        None, help="Launch this command (after --) and trace it with its children."),
    pattern: Optional[List[str]] = typer.Option(
        None, "-e", "--pattern", help="[LIB:]FUNC[@OBJECT] to probe, globs allowed (repeatable); "
        "LIB defaults to libc and is a short name (libssl), a soname or a path; @MAIN (@LIB) "
        "keeps only the calls the main program (LIB) makes; '!FUNC' excludes. None: every "
        "function the program imports (calls it makes), as ltrace does."),
    max_functions: int = typer.Option(1000, "--max-functions", min=1, help="Refuse patterns "
                                      "that select more functions than this (each costs its "
                                      "probes' attach time)."),
    pid: Optional[List[int]] = typer.Option(None, "--pid", "-p", help="Trace this process and "
                                            "its children, those it has and those it makes "
                                            "(repeatable). Default: the whole host."),
    count: bool = typer.Option(False, "-c", "--count", help="Count calls in the kernel (no "
                               "record per call) and print ltrace -c's table at the end."),
    timing: bool = typer.Option(False, "-T", "--time", help="Time each call (<seconds> on each "
                                "line) and keep a log2 latency histogram per function in the "
                                "kernel; with -c: total, mean and max time, and errors too."),
    stamps: int = typer.Option(0, "-t", count=True, help="Prefix each line with the time of "
                               "day; -tt with microseconds; -ttt as Unix time with "
                               "microseconds."),
    relative: bool = typer.Option(False, "-r", help="Prefix each line with the seconds since "
                                  "the previous line."),
    ip: bool = typer.Option(False, "-i", help="Show the address each call returns to (in its "
                            "caller) as [0x...]."),
    indent: int = typer.Option(0, "-n", "--indent", min=0, help="Indent nested calls by this "
                               "many spaces per level (per thread)."),
    syscalls: bool = typer.Option(False, "-S", "--syscalls", help="System calls too, as "
                                  "SYS_name lines nested under the library call that made them "
                                  "(with -c: a row each), from tracepoints filtered in the kernel."),
    demangle: bool = typer.Option(False, "-C", "--demangle", help="C++ (and Rust) names as "
                                  "written: in the output, and patterns match them "
                                  "('operator new*', 'std::*')."),
    stack: bool = typer.Option(False, "--stack", help="The user stack of each call, as "
                               "lib!symbol+offset frames; with -c, calls per stack."),
    where: Optional[int] = typer.Option(None, "-w", "--where", min=1, help="Show this many "
                                        "frames of each call's user stack (implies --stack)."),
    duration: Optional[float] = typer.Option(None, "--duration", "-d", min=0,
                                             help="Stop after this many seconds."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write the trace (with "
                                          "-c: the table) to this file instead of standard "
                                          "error: as text, or by extension as .parquet, .csv "
                                          "or .jsonl data."),
    as_json: bool = typer.Option(False, "--json", help="JSON lines on standard output: one "
                                 "object per call (with -c: per function). A launched command's "
                                 "own output then goes to standard error."),
    strsize: int = typer.Option(32, "-s", "--string-size", min=0, help="Show strings up to this "
                                "many bytes."),
    sites: str = typer.Option("planned", "--sites", help="planned: a -c probe sits on an "
                              "instruction of the prologue the kernel emulates, where one is "
                              "proved to run once per call (else the entry); entry: on the entry."),
):
    """Trace library calls like ltrace, or count them in the kernel like ltrace -c, with uprobes
    instead of ptrace: no stop per call, and calls that ltrace cannot see (binaries linked with
    -z now -fno-plt) are counted too. Every call of the function counts, whoever calls it (the
    program, or the library itself).

    As ltrace, the trace and the -c table go to standard error (or -o FILE), so they never mix
    with the program's output. A call that returns before anything else happens is one line;
    else `f(args <unfinished ...>` and later `<... f resumed> ) = ret`.

    Ends on Ctrl-C, SIGTERM, --duration, when the launched command exits, or when every --pid
    process has exited.

    \b
    Examples (beside their ltrace equivalents):
      keytrace calls -e malloc -e free -- ls              ltrace -e malloc+free ls
      keytrace calls -c -e 'libc:str*' -- ./server        ltrace -c -e 'str*' ./server
      keytrace calls -c -T -e 'libssl:SSL_*' -p 1234      ltrace -c -T -e 'SSL_*@libssl*' -p 1234
      keytrace calls -tt -n 2 -e 'f*' -e '!fflush' -- make    ltrace -tt -n 2 -e 'f*-fflush' make
      keytrace calls -C -e 'libstdc++:operator new*' -- ./app ltrace -C -e '_Znw*' ./app
      keytrace calls -c -e 'malloc@MAIN' -- ./app         ltrace -c -e 'malloc@MAIN' ./app
      keytrace calls -S -n 2 -e fopen -- ./app            ltrace -S -n 2 -e fopen ./app
      keytrace calls -e getenv -s 64 --json -- ./app      (no ltrace equivalent)
    """
    try:
        fmt = check_writable(output, "text") if output is not None else None
        if stamps > 3:
            raise UsageError("-t is given at most 3 times (-t, -tt, -ttt)")
        if relative and stamps:
            raise UsageError("-r and -t exclude each other: relative or absolute times")
        style = report.Style(timing=timing, stamps="r" if relative else "t" * stamps, ip=ip,
                             indent=indent)
        text = _open_text(output) if fmt == "text" else None
        try:
            _trace(command, pattern or [], pid, count, timing, stack or where is not None,
                   duration, output, fmt, as_json, strsize, sites, demangle, style, text, where,
                   syscalls, max_functions)
        finally:
            if text is not None and text is not sys.stderr:
                text.close()
    except KeytraceError as e:
        raise failure(e)


def _open_text(path: Path):
    try:
        return open(path, "w", encoding="utf-8", errors="replace", buffering=1)
    except OSError as e:
        raise KeytraceError(f"cannot write {path}: {e.strerror or e}") from None


def _trace(command, pattern, pid, count, timing, stack, duration, output, fmt, as_json, strsize,
           sites, demangle, style, text, where, syscalls, max_functions) -> None:
    stdout = sys.stdout
    # the text trace: to -o FILE when it is a text file, else standard error (ltrace's place)
    dest = text if text is not None else sys.stderr
    show = on_event = lines = None  # (on_event: the text lines, in call order)
    lock = threading.Lock()  # lines come from the drain thread and from the stale-entry tick
    if not count and as_json:
        show = (lambda c: _write(stdout, json.dumps(report.json_record(c, timing)) + "\n"))
    elif not count and (output is None or fmt == "text"):
        lines = report.Lines(style)

        def text_lines(kind, item):
            with lock:  # (written inside it: a stale entry flushed meanwhile stays in order)
                _write(dest, "".join(ln + "\n" for ln in lines.feed(kind, item)))
                if kind == "call" and stack:
                    _write(dest, "".join(f"    {a}\n" for a in item["stack"].split())
                           + (f"    ({item['stack_note']})\n" if item.get("stack_note") else ""))
        on_event = text_lines
    tracer = CallTracer(pattern, pids=pid or None, command=command or None, count=count,
                        timing=timing, stacks=stack, strsize=strsize, sites=sites,
                        keep=output is not None and fmt != "text", on_call=show,
                        on_event=on_event, quiet_stdout=as_json, demangle=demangle,
                        stack_depth=where, syscalls=syscalls, limit=max_functions,
                        on_note=lambda t: err.print(f"keytrace: {t}", markup=False,
                                                    soft_wrap=True),
                        on_progress=_progress())

    def stale():
        """An entry with nothing after it for a while (a blocking read) is shown unfinished."""
        if lines is None:
            return
        with lock:
            if lines.pending is not None and time.time_ns() - lines.pending["ts"] > 5e8:
                _write(dest, "".join(ln + "\n" for ln in lines.flush()))

    try:
        why = _run(tracer, duration, stale)
        _report(tracer, why, lines, lock, dest, count, timing, stack, as_json, output, fmt, text)
    finally:
        tracer.stop()  # the detach has ended: no probe outlives the command


def _report(tracer, why, lines, lock, dest, count, timing, stack, as_json, output, fmt, text):
    """The lines left, the tables, the command's status: made while the probes detach."""
    if lines is not None:
        with lock:
            _write(dest, "".join(ln + "\n" for ln in lines.flush()))
    if tracer.lost:
        err.print(f"keytrace: warning: {tracer.lost} call records were lost (ring buffer full): "
                  "lines are missing; -c counts in the kernel and loses none", markup=False)
    table_out = Console(file=text, highlight=False, width=160) if text is not None else err
    if count:
        _report_counts(tracer, timing, stack, as_json, output if fmt != "text" else None,
                       table_out)
    else:
        if output is not None and fmt != "text":
            save_table(tracer.frame(), output)
            err.print(f"keytrace: wrote {len(tracer.calls)} calls to {output}", markup=False)
        if timing and not as_json:  # -T: the kernel's latency histograms after the lines
            _print_histograms(tracer.histograms(), table_out)
    status = command_status(tracer.returncode, why)
    if status:
        err.print(f"keytrace: the command exited with status {status}", markup=False)
        raise typer.Exit(status)


def _progress():
    """A progress bar on a terminal while many probes attach (each waits on the kernel)."""
    if not err.is_terminal:
        return None
    state: dict = {}

    def tick(done: int, total: int) -> None:
        if total < 20:  # (a few attach at once)
            return
        if "bar" not in state:
            state["bar"] = Progress(TextColumn("keytrace: attaching"), BarColumn(),
                                    MofNCompleteColumn(), TimeElapsedColumn(), console=err,
                                    transient=True)
            state["bar"].start()
            state["task"] = state["bar"].add_task("attach", total=total)
        state["bar"].update(state["task"], completed=done)
        if done >= total:
            state["bar"].stop()
    return tick


def _write(stream, text: str) -> None:
    try:
        stream.write(text)
        stream.flush()
    except BrokenPipeError:  # keytrace calls ... | head
        pass


def _run(tracer: CallTracer, duration: Optional[float], tick=None) -> str:
    """Trace until an end condition: why it ended ("exited", "duration", "stopped")."""
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    why = "stopped"
    try:
        tracer.start()
        placed = sum(1 for how in tracer.placement.values() if how.startswith("planned"))
        files = len({t.path for t in tracer.targets})
        where = (f"; {placed} on planned sites" if tracer.mode == "count" else "")
        err.print(f"keytrace: {len(tracer.targets)} function(s) in {files} file(s), "
                  f"{tracer.attached} probes{where}", markup=False, soft_wrap=True)
        try:
            why = tracer.wait(duration=duration, stop=stop, tick=tick)
        except KeyboardInterrupt:
            pass
    finally:
        tracer.stop(wait=False)  # the probes detach (the kernel's grace periods) meanwhile
        signal.signal(signal.SIGTERM, previous)
    tracer.check()  # a failure of the drain thread after the wait ended
    return why


def _report_counts(tracer: CallTracer, timing: bool, stack: bool, as_json: bool,
                   output: Optional[Path], console: Console) -> None:
    table = tracer.counts()
    hist = tracer.histograms() if timing else None
    if output is not None:
        save_table(table, output)
        err.print(f"keytrace: wrote {len(table)} functions to {output}", markup=False)
    if as_json:
        rows = table.drop(columns=["time_pct"])
        if hist is not None:
            by = {k: g[["from_ns", "to_ns", "calls"]].to_dict(orient="records")
                  for k, g in hist.groupby(["library", "function"])}
            rows = rows.assign(histogram=[by.get((r.library, r.function), [])
                                          for r in rows.itertuples()])
        sys.stdout.write(json_lines(rows))
        sys.stdout.flush()
        return
    console.print(_counts_table(table, timing))
    if hist is not None:
        _print_histograms(hist, console)
    if stack:
        console.print(_stacks_table(tracer.stack_counts()))


def _counts_table(df, timing: bool) -> Table:
    t = Table(title="calls, counted in the kernel", title_justify="left")
    if timing:
        for name in ("% time", "seconds", "usecs/call", "max usecs", "calls", "errors"):
            t.add_column(name, justify="right")
    else:
        t.add_column("calls", justify="right")
    t.add_column("function")
    for r in df.itertuples():
        fn = f"{r.library}!{r.function}" if r.library else r.function  # (-S: SYS_name)
        if timing:
            t.add_row(f"{r.time_pct:.2f}", f"{r.total_ns / 1e9:.6f}", f"{r.mean_ns / 1e3:.3f}",
                      f"{r.max_ns / 1e3:.3f}", str(r.calls), str(r.errors), fn)
        else:
            t.add_row(str(r.calls), fn)
    total = int(df["calls"].sum())
    if timing:
        t.add_row("100.00", f"{df['total_ns'].sum() / 1e9:.6f}", "", "", str(total),
                  str(int(df["errors"].sum())), "total", style="bold")
    else:
        t.add_row(str(total), "total", style="bold")
    return t


def _print_histograms(hist, console: Console) -> None:
    for (lib, fn), g in hist.groupby(["library", "function"], sort=False):
        console.print(_histogram(f"{lib}!{fn}", g))


def _histogram(name: str, g) -> Table:
    t = Table(title=f"{name}: latency", title_justify="left")
    for col, just in (("ns", "right"), ("calls", "right"), ("", "left")):
        t.add_column(col, justify=just)
    top = max(int(g["calls"].max()), 1)
    for r in g.itertuples():
        t.add_row(f"{r.from_ns} .. {r.to_ns}", str(r.calls), "#" * max(1, round(40 * r.calls / top)))
    return t


def _stacks_table(df) -> Table:
    t = Table(title="calls per user stack", title_justify="left")
    for col in ("calls", "function", "stack (innermost first)"):
        t.add_column(col)
    for r in df.head(20).itertuples():
        t.add_row(str(r.calls), f"{r.library}!{r.function}", Text(r.stack or "(no stack)"))
    return t
