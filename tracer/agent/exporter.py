"""The agent: every process's key table read at start, the whole host traced, tables read
again every scan interval, and the verdicts exported to Prometheus. Every other table a process
can run out of (fds, threads, mappings, timers: tracer.analysis.census) is read every tables
interval and exported beside the keys as keytrace_process_resource_*{resource=...}.
Series labelled pid are kept to the processes at risk (at most --max-processes); every process
counts in the groups by executable, container and resource (keytrace_processes and the
keytrace_resource_*_max gauges), whose number does not grow with pids.

Scrapes never touch the ledger: a refresh thread computes a Snapshot every few seconds (the
analysis runs on a copy taken under the ingest lock) and the collector serves the latest one,
so a scrape is cheap and never stalls the drain. Counters are monotonic sums kept here: what
each process (pid, start) added since the last refresh, by executable and by the library that
made the keys; creates the kernel counted whose records were lost go to library "?".
A given --reloads-per-day is the fleet's assumption: a rate measured on enough cycles or time
replaces it (verdicts' prefer_measured). A process that is gone drops its series, even when its
exit record was lost.

The agent works on the verdicts' rows (dicts), never frames: it does not load pandas.
"""
from __future__ import annotations

import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from importlib import metadata
from typing import Callable, Optional

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .. import resource, wire
from ..analysis import census, verdicts
from ..analysis.attribution import Attribution
from ..host import proc
from ..resources.keys import KEYS
from ..session import KeyTracer
from ..state.tables import Table
from ..state.tracker import Tracker
from .state import State

PROCESS_LABELS = ["pid", "comm", "exe", "container"]


def at_risk(row: dict) -> bool:
    """A process gets series of its own (labelled pid) when one of its tables is at risk:
    leaking, critical, or (keys) above the near-limit share that the rules alert on."""
    if row["leaking"] or row["critical"]:
        return True
    return "live_keys" in row and bool(row["limit"]) and verdicts.near_limit(row["live_keys"],
                                                                             row["limit"])


def risk_order(row: dict):
    return (not row["critical"], not row["leaking"], -used_ratio(row), row["pid"])


def used_ratio(row: dict) -> float:
    """How full the table is, against what its limit leaves (a shared pool counts whole)."""
    if not row["limit"]:
        return 0.0
    if "live_keys" in row:
        return row["live_keys"] / row["limit"]
    return (row["limit"] - row["headroom"]) / row["limit"]


def group(rows: list) -> list:
    """Every process's tables, grouped by (exe, container, resource): how many processes, the
    most any holds, and the fullest share of a limit. Series whose number does not grow with
    the processes a host runs."""
    out: dict = {}
    for r in rows:
        key = (exe_label(r["exe"], r["comm"]), r["container"], r["resource"])
        g = out.setdefault(key, {"processes": 0, "in_use_max": 0, "used_ratio_max": 0.0})
        g["processes"] += 1
        g["in_use_max"] = max(g["in_use_max"], r["in_use"])
        g["used_ratio_max"] = max(g["used_ratio_max"], used_ratio(r))
    return [dict(zip(("exe", "container", "resource"), k), **v) for k, v in sorted(out.items())]


def exe_label(exe: str, comm: str) -> str:
    """The exe label of every series, gauges and counters alike (so that they join): the
    executable, or the command name when it is not known."""
    return exe or comm


TABLE_LABELS = PROCESS_LABELS + ["resource"]
# A start is known to the clock tick from /proc/PID/stat and to the nanosecond from a traced
# fork: two readings of one process agree within a tick or two (10 ms each).
SAME_START_NS = 25_000_000


@dataclass
class Snapshot:
    rows: list = field(default_factory=list)     # per process: dicts of the summary, bounded
    creates: dict = field(default_factory=dict)  # (exe, library) -> total
    deletes: dict = field(default_factory=dict)
    failures: dict = field(default_factory=dict)  # exe -> total
    lost: int = 0
    probed: int = 0
    scan_seconds: float = 0.0
    tables: list = field(default_factory=list)   # per (process, resource) census rows, bounded
    tables_seconds: float = 0.0
    groups: list = field(default_factory=list)   # per (exe, container, resource): every process


class Totals:
    """Monotonic counters from per-process counts that may restart (a new process on a pid)."""

    def __init__(self):
        self.seen: dict = {}                  # (ident, exe, library) -> last count
        self.sum: dict = defaultdict(float)   # (exe, library) -> total

    def add(self, ident, exe: str, library: str, count: int) -> None:
        key = (ident, exe, library)
        before = self.seen.get(key, 0)
        if count > before:
            self.sum[(exe, library)] += count - before
            self.seen[key] = count

    def forget(self, live_idents: set) -> None:
        """Drop the last counts of processes the ledger forgot (their totals stay)."""
        self.seen = {k: v for k, v in self.seen.items() if k[0] in live_idents}


class Agent:
    def __init__(self, tracer: KeyTracer, max_processes: int = 100,
                 reloads_per_day: Optional[float] = None, scan_interval: float = 300.0,
                 refresh: float = 5.0, log: Callable[[str], None] = lambda s: None,
                 state: Optional[State] = None, tables_interval: float = 60.0):
        self.tracer = tracer
        self.state = state
        self.prior = state.load() if state else {}  # (pid, start) -> facts saved before a restart
        self.ledger: Tracker = tracer.ledger
        self.max_processes = max_processes
        self.reloads_per_day = reloads_per_day
        self.scan_interval = scan_interval
        self.refresh_every = refresh
        self.log = log
        self.snapshot = Snapshot()
        self._creates, self._deletes, self._failures = Totals(), Totals(), Totals()
        self._counted: dict = {}  # ident -> the counts last turned into totals
        self._stop = threading.Event()
        self._scan_seconds = 0.0
        # The tables read, not traced: every resource with one but keys (the trace has them).
        self.read_only = [r for r in resource.known() if r.census is not None and r is not KEYS]
        self.tables_interval = tables_interval
        self._tables: list = []
        self._tables_seconds = 0.0

    # -- the loop -----------------------------------------------------------------------------
    def scan(self) -> int:
        """Read every process's table into the ledger (a daemon up for years is known at once)."""
        t0 = time.monotonic()
        n = self.tracer.meet()
        self._scan_seconds = time.monotonic() - t0
        return n

    def read_tables(self) -> int:
        """Read every other table of every process now (the rows refresh() exports)."""
        t0 = time.monotonic()
        read = [dict(r, owners=None) for r in census.rows(self.read_only,
                                                          reloads_per_day=self.reloads_per_day)
                if r["status"] == census.OK]
        self._tables = read
        self._tables_seconds = time.monotonic() - t0
        return len(read)

    def run(self, stop: threading.Event) -> None:
        """Refresh the snapshot every refresh seconds, rescan every scan interval and read the
        other tables every tables interval, until stop."""
        next_scan = time.monotonic() + self.scan_interval
        next_tables = time.monotonic() + self.tables_interval
        while not stop.is_set():
            self.tracer.check()  # a drain that died must end the agent, not freeze its metrics
            if time.monotonic() >= next_tables:
                self.read_tables()
                next_tables = time.monotonic() + self.tables_interval
            self.refresh()
            proc.trim_heap()  # what a refresh or a burst of events freed: back to the system
            if time.monotonic() >= next_scan:
                self.scan()
                next_scan = time.monotonic() + self.scan_interval
            stop.wait(self.refresh_every)

    def refresh(self) -> Snapshot:
        procs, now = self.ledger.snapshot()
        alive = [r for r in self._rows([p for p in procs if p.active], now) if r["alive"]]
        offset = wire.boot_to_wall_offset_ns()
        keys = []
        for r in alive:
            if not running(r["pid"], r["start"] - offset):  # its exit record was lost
                continue
            saved = self._prior(r["pid"], r["start"])
            keys.append(verdicts.recall(r, saved, now, self.reloads_per_day) if saved else r)
        tables = [r for r in self._tables if proc.exists(r["pid"])]
        # Series per process only for the processes at risk, at most max_processes of them
        # (the riskiest); every process, at risk or not, counts in the groups by executable.
        risky = sorted({r["pid"]: r for r in [*keys, *tables] if at_risk(r)}.values(),
                       key=risk_order)
        exported = {r["pid"] for r in risky[:self.max_processes]}
        containers = {pid: proc.container(pid) for pid in
                      {r["pid"] for r in [*keys, *tables]}}
        keys = [dict(r, container=containers[r["pid"]]) for r in keys]
        tables = [dict(r, container=containers[r["pid"]]) for r in tables]
        groups = group([dict(r, resource=KEYS.name, in_use=r["live_keys"],
                             headroom=r["limit"] - r["live_keys"]) for r in keys] + tables)
        for p in procs:
            self._count(p)
        live = {p.ident for p in procs}
        for t in (self._creates, self._deletes, self._failures):
            t.forget(live)
        self._counted = {i: sig for i, sig in self._counted.items() if i in live}
        self.snapshot = Snapshot(sorted((r for r in keys if r["pid"] in exported), key=risk_order),
                                 dict(self._creates.sum), dict(self._deletes.sum),
                                 {exe: n for (exe, _), n in self._failures.sum.items()},
                                 self.ledger.lost, len(self.tracer.files), self._scan_seconds,
                                 [r for r in tables if r["pid"] in exported],
                                 self._tables_seconds, groups)
        self.save(alive, now)
        return self.snapshot

    def _rows(self, procs, now: int) -> list:
        # --reloads-per-day is the assumption until a measure is trusted: prefer_measured
        # Code paths by module and offset: they tell paths apart as well as names do, and an
        # agent that named them would hold the symbol tables of every large library whose
        # keys it judges (tens of MB for one process of LLVM's or Arrow's).
        return verdicts.rows(procs, now, self.reloads_per_day, prefer_measured=True,
                             symbols=False)

    def _prior(self, pid: int, start: int) -> Optional[dict]:
        """The saved facts of this very process: same pid, same start (SAME_START_NS)."""
        for (p, s), saved in self.prior.items():
            if p == pid and abs(s - start) < SAME_START_NS:
                return saved
        return None

    def save(self, alive=None, now: Optional[int] = None) -> None:
        """Keep the measured leaks of the processes alive now (and what was recalled)."""
        if self.state is None:
            return
        if alive is None:
            procs, now = self.ledger.snapshot(lambda p: p.exited is None and p.active)
            alive = self._rows(procs, now)
        keep = {}
        for r in alive:
            ident = (r["pid"], r["start"])
            if r["leak_per_reload"] > 0 and r["reloads_per_day"]:
                keep[ident] = r
            elif self._prior(*ident):
                keep[ident] = {**self._prior(*ident), "pid": r["pid"], "start": r["start"]}
        self.state.save(list(keep.values()), now or time.time_ns())

    def _count(self, p) -> None:
        # Naming the library of each site reads ELF files: only when the process's counts moved.
        t = p.tables.get(KEYS.name) or Table()
        sig = (t.acquires, t.releases, t.missed)
        if self._counted.get(p.ident) == sig:
            return
        self._counted[p.ident] = sig
        exe = exe_label(p.exe, p.comm)
        for lib, (created, deleted) in Attribution(p, symbols=False).counts_by_library().items():
            self._creates.add(p.ident, exe, lib, created)
            self._deletes.add(p.ident, exe, lib, deleted)
        self._failures.add(p.ident, exe, "", t.failed_acquires + t.missed[1])


class Collector:
    """prometheus_client collector serving an Agent's latest snapshot."""

    def __init__(self, agent: Agent):
        self.agent = agent

    def collect(self):
        s = self.agent.snapshot
        gauges = {
            "keys": GaugeMetricFamily("keytrace_process_pthread_keys",
                                      "pthread keys in use by the process", labels=PROCESS_LABELS),
            "limit": GaugeMetricFamily("keytrace_process_pthread_keys_limit",
                                       "PTHREAD_KEYS_MAX of its C library", labels=PROCESS_LABELS),
            "orphaned": GaugeMetricFamily("keytrace_process_pthread_keys_orphaned",
                                          "keys whose maker's instance is unmapped",
                                          labels=PROCESS_LABELS),
            "leaking": GaugeMetricFamily("keytrace_process_pthread_keys_leaking",
                                         "1 when the process is at risk of running out",
                                         labels=PROCESS_LABELS),
            "eta": GaugeMetricFamily("keytrace_process_pthread_keys_exhaustion_timestamp_seconds",
                                     "when pthread_key_create will fail, where a leak rate is known",
                                     labels=PROCESS_LABELS),
        }
        for r in s.rows:
            labels = [str(r["pid"]), r["comm"], exe_label(r["exe"], r["comm"]), r["container"]]
            gauges["keys"].add_metric(labels, r["live_keys"])
            gauges["limit"].add_metric(labels, r["limit"])
            gauges["orphaned"].add_metric(labels, r["orphaned_keys"])
            gauges["leaking"].add_metric(labels, 1 if r["leaking"] else 0)
            if r["exhaustion_eta"] is not None:
                gauges["eta"].add_metric(labels, r["exhaustion_eta"].timestamp())
        yield from gauges.values()
        yield from self.resources(s)
        yield from self.groups(s)
        for name, doc, values in (("keytrace_pthread_key_creates", "pthread_key_create calls that "
                                   "made a key", s.creates),
                                  ("keytrace_pthread_key_deletes", "pthread_key_delete calls that "
                                   "freed a key", s.deletes)):
            c = CounterMetricFamily(name, doc + ' (library "?": the kernel could not queue the '
                                    'records of these calls)', labels=["exe", "library"])
            for (exe, lib), n in sorted(values.items()):
                c.add_metric([exe, lib], n)
            yield c
        c = CounterMetricFamily("keytrace_pthread_key_create_failures",
                                "pthread_key_create calls that failed (EAGAIN: table full)",
                                labels=["exe"])
        for exe, n in sorted(s.failures.items()):
            c.add_metric([exe], n)
        yield c
        yield CounterMetricFamily("keytrace_events_lost", "records the kernel could not queue "
                                  "(counts stay exact)", value=s.lost)
        yield GaugeMetricFamily("keytrace_probed_files", "files carrying keytrace's uprobes",
                                value=s.probed)
        yield GaugeMetricFamily("keytrace_scan_duration_seconds",
                                "how long the last read of every process's table took",
                                value=s.scan_seconds)
        yield GaugeMetricFamily("keytrace_tables_duration_seconds",
                                "how long the last read of every process's other tables took",
                                value=s.tables_seconds)
        info = GaugeMetricFamily("keytrace_build_info", "keytrace's version", labels=["version"])
        info.add_metric([version()], 1)
        yield info


    @staticmethod
    def groups(s: Snapshot):
        """Every process, at risk or not, by (exe, container, resource)."""
        labels = ["exe", "container", "resource"]
        g = {m: GaugeMetricFamily(name, doc, labels=labels) for m, name, doc in (
            ("processes", "keytrace_processes", "processes of this executable holding the table"),
            ("in_use_max", "keytrace_resource_in_use_max", "the most any one of them holds"),
            ("used_ratio_max", "keytrace_resource_used_ratio_max", "the fullest share of its "
             "limit any one of them has used (a shared pool counted whole)"))}
        for row in s.groups:
            for m, fam in g.items():
                fam.add_metric([row["exe"], row["container"], row["resource"]], row[m])
        yield from g.values()

    @staticmethod
    def resources(s: Snapshot):
        """Every table of every process, one family per measure, labelled resource: the keys
        from the trace (the rows above), the others as last read."""
        g = {m: GaugeMetricFamily(f"keytrace_process_resource_{m}", doc, labels=TABLE_LABELS)
             for m, doc in (("in_use", "handles the process holds in the table"),
                            ("limit", "the limit that binds the table"),
                            ("headroom", "what can still be acquired before it binds (a limit "
                                         "shared by other processes leaves less than limit - "
                                         "in_use)"),
                            ("leaking", "1 when the table is judged to be leaking"),
                            ("orphaned", "handles left by a library instance that is gone (a "
                                         "fork or exit handler among them crashes the next "
                                         "fork or exit)"),
                            ("exhaustion_timestamp_seconds", "when the table will be full, "
                                                             "where a leak rate is known"))}
        # Which library to blame and what grows, as labels an alert can take (group_left):
        # one series per table at risk, in the manner of *_info metrics.
        blame = GaugeMetricFamily("keytrace_process_leak_info", "1 for each table at risk: "
                                  "the library that made what leaks (\"\": not known from a "
                                  "table read) and what grows", labels=TABLE_LABELS
                                  + ["library", "owner"])
        keys = [dict(r, resource=KEYS.name, in_use=r["live_keys"],
                     headroom=r["limit"] - r["live_keys"]) for r in s.rows]
        for r in keys + s.tables:
            labels = [str(r["pid"]), r["comm"], exe_label(r["exe"], r["comm"]), r["container"],
                      r["resource"]]
            g["in_use"].add_metric(labels, r["in_use"])
            if r["limit"] is not None:
                g["limit"].add_metric(labels, r["limit"])
                g["headroom"].add_metric(labels, r["headroom"])
            g["leaking"].add_metric(labels, 1 if r["leaking"] else 0)
            if r.get("orphaned") is not None:
                g["orphaned"].add_metric(labels, r["orphaned"])
            if r["exhaustion_eta"] is not None:
                g["exhaustion_timestamp_seconds"].add_metric(labels, r["exhaustion_eta"].timestamp())
            if r["leaking"] or r["critical"]:
                blame.add_metric(labels + [r.get("library") or "", str(r.get("owner") or "")], 1)
        yield from g.values()
        yield blame


def running(pid: int, boot_start: int) -> bool:
    """Is the process (pid, its start on the boot clock) still running? Its exit record may have
    been lost. Compared on the boot clock: a wall-clock step (NTP at boot, a VM resumed) must
    not end every series."""
    try:
        started = proc.boot_start_ns(pid)
    except (OSError, IndexError, ValueError):
        return False
    return proc.alive(pid) and abs(started - boot_start) < SAME_START_NS


def registry(agent: Agent) -> CollectorRegistry:
    reg = CollectorRegistry()
    reg.register(Collector(agent))
    ProcessCollector(registry=reg)
    return reg


def version() -> str:
    try:
        return metadata.version("keytrace")
    except metadata.PackageNotFoundError:
        return "unknown"
