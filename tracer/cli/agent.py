"""`keytrace agent`: always on, exported to Prometheus. Its own module, and run without the
rest of the command line (tracer.cli.main), so that the agent's process never imports pandas
or pyarrow: it works on records and rows only (about 40 + 40 MB less resident)."""
from __future__ import annotations

import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Optional

import typer

from ..errors import KeytraceError
from ..session import KeyTracer
from ..state.tracker import Tracker
from .console import EXIT_USAGE, RELOADS_PER_DAY, err, fail, failure, note

AGENT_PORT = 10451


def agent(
    listen: str = typer.Option(f"127.0.0.1:{AGENT_PORT}", "--listen", help="HOST:PORT to serve "
                               "/metrics on (loopback by default: put a Prometheus scrape or a "
                               "proxy in front)."),
    scan_interval: float = typer.Option(300.0, "--scan-interval", min=1, help="Seconds between "
                                        "two reads of every process's key table (reconciles "
                                        "what the probes may have missed)."),
    max_processes: int = typer.Option(100, "--max-processes", min=1, help="At most this many "
                                      "processes get series of their own (labelled pid): only "
                                      "those at risk, the riskiest first. Every process counts "
                                      "in the groups by executable."),
    reloads_per_day: Optional[float] = RELOADS_PER_DAY,
    refresh: float = typer.Option(5.0, "--refresh", min=0.1, help="Seconds between two "
                                  "recomputations of what /metrics serves (a scrape only reads "
                                  "the latest)."),
    tables_interval: float = typer.Option(60.0, "--tables-interval", min=1, help="Seconds "
                                          "between two reads of every process's other tables "
                                          "(fds, threads, mappings, timers)."),
    state_dir: Path = typer.Option(Path("/var/lib/keytrace"), "--state-dir", help="Where the "
                                   "measured leaks are kept across restarts (SQLite)."),
    web_config: Optional[Path] = typer.Option(None, "--web-config", help="A web config file "
                                              "in Prometheus exporter-toolkit's format: TLS "
                                              "(tls_server_config), client certificates, "
                                              "basic_auth_users with bcrypt hashes "
                                              "(docs/agent.md)."),
):
    """Run always on: read every process's key table, trace the whole host, and export the
    verdicts to Prometheus (per process: keys, limit, orphaned, leaking, exhaustion time;
    counters of creates, deletes and failures by executable and library; and every other table
    it can run out of, read every --tables-interval: keytrace_process_resource_*{resource}).

    Ends on SIGTERM or Ctrl-C, detaching every probe.

    \b
    Examples:
      keytrace agent
      keytrace agent --listen 0.0.0.0:10451 --reloads-per-day 1
      keytrace agent --listen 0.0.0.0:10451 --web-config /etc/keytrace/web.yml
      curl -s localhost:10451/metrics | grep keytrace_process_pthread_keys_leaking
    """
    from ..agent import web
    from ..agent.exporter import Agent, registry
    from ..agent.state import State
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise fail(f"--listen takes HOST:PORT (a port from 1 to 65535), not {listen!r}",
                   EXIT_USAGE)
    try:  # a host that names no address is a usage error, found before anything starts
        socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM,
                           flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        why = e.strerror if isinstance(e, socket.gaierror) else "not a valid host name"
        raise fail(f"--listen {listen}: {host} is no address to listen on ({why})", EXIT_USAGE)
    try:  # (before anything is attached: a bad file costs nothing)
        config = web.load(str(web_config)) if web_config is not None else web.WebConfig()
    except KeytraceError as e:
        raise failure(e)
    log = lambda s: err.print(f"keytrace agent: {s}", markup=False, soft_wrap=True)  # noqa: E731
    try:
        state = State(state_dir, log)
    except KeytraceError as e:
        raise failure(e)
    # Drained every 50 ms: a drain has a fixed cost, and 50 ms of a busy host fit the ring.
    # A 4 MiB ring (12 k records: 240 k a second at this drain rate) rather than watch's 8: it
    # is resident twice over (its data pages are mapped twice), and the agent's counts come
    # from the kernel's counters, exact when records are lost.
    tracer = KeyTracer(keep_events=False, on_note=note, interval=0.05, ring_pages=1024,
                       ledger=Tracker(keep_events=False))
    a = Agent(tracer, max_processes, reloads_per_day, scan_interval, refresh, log, state,
              tables_interval)
    try:
        server = web.serve(registry(a), host.strip("[]"), int(port), config)
    except OSError as e:
        raise fail(f"cannot listen on {listen}: {e.strerror or e}")
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    started = False
    try:
        tracer.start()
        started = True
        n = a.scan()
        a.read_tables()
        a.refresh()
        err.print(f"keytrace agent: {tracer.attached} probes attached in {len(tracer.files)} "
                  f"file(s); {n} processes read in {a.snapshot.scan_seconds:.2f} s; serving "
                  f"{config.scheme}://{listen}/metrics"
                  + (" (basic auth)" if config.users else ""), markup=False, soft_wrap=True)
        a.run(stop)
    except KeytraceError as e:
        raise failure(e)
    finally:
        try:
            if started:
                a.save()  # what was measured survives the restart
        finally:
            tracer.stop()
            server.shutdown()
            state.close()
            for s, h in previous.items():
                signal.signal(s, h)


def main() -> None:
    """keytrace agent ..., without loading the other commands."""
    single = typer.Typer(add_completion=False, rich_markup_mode=None)
    single.command()(agent)
    typer.main.get_command(single)(args=sys.argv[2:], prog_name="keytrace agent")
