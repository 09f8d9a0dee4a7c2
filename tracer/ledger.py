"""The ledger: events in, per-process key state out.

Events arrive as frames (tracer.records.decode, or a saved file). The ledger keeps them (unless
asked to keep only state) and replays them, in order, into per-process state: live keys,
counters, the libraries dlopen'd and dlclose'd. What that state *means* (leaking, critical) is
decided in tracer.analysis, once for every front-end.

A process is identified by (pid, start), start being the time its fork was seen or, for a
process already running, the time of its first event; an exit ends it, so a recycled pid
starts a new history instead of merging into the old one.
"""
from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import numpy as np
import pandas as pd

from . import analysis
from .records import COLUMNS, OP_TYPE, empty_events

(CREATE, CREATE_FAILED, DELETE, DLOPEN, DLCLOSE, EXEC, EXIT, FORK, MAP,
 UNMAP) = range(len(OP_TYPE.categories))


@dataclass(slots=True)
class Site:
    """Where keys come from: one call site (caller, stack) within one dlopen (load id)."""
    caller: int
    load: int
    stack: Optional[str]
    destructor: int
    first: int            # ts of its first create
    created: int = 0
    deleted: int = 0


@dataclass(slots=True)
class Module:
    """One mapped instance of an ELF module: reloading a library makes a new instance, even at
    the same address."""
    path: str
    base: int             # load bias (link_map l_addr)
    load: int             # the dlopen that reported it (0: seen in /proc/PID/maps)
    mapped: int           # ts
    unmapped: Optional[int] = None
    file: Optional[str] = None  # where to open it now, when known (a scan's map_files link)


@dataclass
class Process:
    pid: int
    start: int  # ns since the epoch
    comm: str
    exe: Optional[str] = None
    parent: Optional[tuple] = None  # (pid, start) of the parent, when its fork was seen
    creates: int = 0          # pthread_key_create calls, failed ones included
    failed_creates: int = 0
    deletes: int = 0          # successful pthread_key_delete calls
    failed_deletes: int = 0
    last_failure_ret: int = 0
    first_failure: Optional[int] = None  # ts of the first failed create
    exited: Optional[int] = None
    keys: dict = field(default_factory=dict)      # key -> Site that created it
    sites: dict = field(default_factory=dict)     # (caller, load, stack) -> Site
    modules: list = field(default_factory=list)   # Module instances, in mapping order
    loads: dict = field(default_factory=dict)     # dlopen id -> (path, handle, ts)
    handles: dict = field(default_factory=dict)   # open handle -> [references, [dlopen ids]]
    unloaded: set = field(default_factory=set)    # dlopen ids whose handle was closed for good

    @property
    def ident(self) -> tuple:
        return (self.pid, self.start)

    @property
    def active(self) -> bool:
        """Did this process touch keys or libraries (directly or by inheritance)?"""
        return bool(self.creates or self.deletes or self.failed_deletes or self.keys or self.loads)

    def fork(self, child_pid: int, ts: int) -> "Process":
        # A forked child starts with a copy of its parent's memory, key table included; copies,
        # so that its own creates and unmaps do not touch the parent's.
        sites = {k: replace(s) for k, s in self.sites.items()}
        return Process(pid=child_pid, start=ts, comm=self.comm, exe=self.exe, parent=self.ident,
                       keys={k: sites[(s.caller, s.load, s.stack)] for k, s in self.keys.items()},
                       sites=sites, modules=[replace(m) for m in self.modules],
                       loads=dict(self.loads),
                       handles={h: [n, list(ids)] for h, (n, ids) in self.handles.items()},
                       unloaded=set(self.unloaded))


class Ledger:
    """Per-process pthread key state built from events.

    keep_events: keep the event frames (``events``). With False only state is kept, and exited
    processes that never touched keys are forgotten at once, the rest after ``max_exited``
    newer exits: memory then stays flat however long the ledger runs.
    resolve_exe: called with a pid the first time a running process is met (live tracing).
    """

    def __init__(self, keep_events: bool = True, max_exited: int = 10_000,
                 resolve_exe: Optional[Callable[[int], Optional[str]]] = None):
        self.keep_events = keep_events
        self.max_exited = max_exited
        self.resolve_exe = resolve_exe
        self.lost = 0  # records the kernel could not queue (ring buffer full)
        self._chunks: list[pd.DataFrame] = []
        self._events: Optional[pd.DataFrame] = None
        self._procs: dict[tuple, Process] = {}
        self._current: dict[int, Process] = {}
        self._exited: deque = deque()
        self._lock = threading.Lock()  # ingest may run in a polling thread
        self.event_count = 0
        self.last_ts = 0  # ns since the epoch of the newest event: "now" for a forecast

    # -- input -------------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path, **kwargs) -> "Ledger":
        """A ledger replayed from a file written by ``save`` (Parquet, CSV or JSON lines)."""
        from .files import load_events
        ledger = cls(**kwargs)
        ledger.ingest(load_events(path))
        return ledger

    def ingest(self, frame: pd.DataFrame) -> None:
        """Apply a frame of events (in time order) to the state."""
        if frame.empty:
            return
        with self._lock:
            if self.keep_events:
                self._chunks.append(frame)
                self._events = None
            self.event_count += len(frame)
            self.last_ts = max(self.last_ts, int(frame["ts"].array.asi8.max()))
            self._replay(frame)

    def _replay(self, f: pd.DataFrame) -> None:
        # One pass in time order: key values are reused by glibc after a delete, and fork/exec/
        # exit cut histories, so the order of operations is the state. Columns go to Python
        # lists first (one C-level conversion each), the loop itself touches only dicts.
        cols = (
            f["ts"].array.asi8.tolist(),
            f["pid"].tolist(), f["comm"].astype(object).tolist(),
            f["op"].cat.codes.tolist(), f["key"].fillna(-1).astype(np.int64).tolist(),
            f["ret"].tolist(), f["destructor"].tolist(), f["caller"].tolist(),
            f["path"].astype(object).tolist(), f["handle"].tolist(), f["load"].tolist(),
            f["child"].tolist(), f["stack"].astype(object).tolist(),
        )
        current = self._current
        for ts, pid, comm, op, key, ret, destructor, caller, path, handle, load, child, stack \
                in zip(*cols):
            p = current.get(pid)
            if p is None:
                p = self._begin(Process(pid=pid, start=ts, comm=comm,
                                        exe=self.resolve_exe(pid) if self.resolve_exe else None))
            if op == CREATE:
                p.creates += 1
                site = p.sites.get((caller, load, stack))
                if site is None:
                    site = p.sites[(caller, load, stack)] = Site(caller, load, stack, destructor, ts)
                site.created += 1
                p.keys[key] = site
            elif op == DELETE:
                if ret == 0:
                    p.deletes += 1
                    # Paired by key value, never by caller: a library's destructor may
                    # tail-call pthread_key_delete from anywhere.
                    site = p.keys.pop(key, None)
                    if site is not None:
                        site.deleted += 1
                else:
                    p.failed_deletes += 1
            elif op == CREATE_FAILED:
                p.creates += 1
                p.failed_creates += 1
                p.last_failure_ret = ret
                if p.first_failure is None:
                    p.first_failure = ts
            elif op == MAP:
                path = path or p.exe or ""  # the main program's link_map has no name
                known = any(m.base == handle and m.path == path and m.unmapped is None
                            for m in p.modules[-64:])  # reported again while still mapped
                if path.startswith("/") and not known:
                    # load 0: found already mapped (startup objects, /proc maps): take it as
                    # mapped since the process (image) began.
                    p.modules.append(Module(path, handle, load, ts if load else p.start))
            elif op == UNMAP:
                for m in reversed(p.modules):
                    if m.base == handle and m.unmapped is None:
                        m.unmapped = ts
                        break
            elif op == DLOPEN:
                if handle:
                    p.loads[load] = (path, handle, ts)
                    refs = p.handles.setdefault(handle, [0, []])
                    refs[0] += 1
                    refs[1].append(load)
            elif op == DLCLOSE:
                refs = p.handles.get(handle)
                if refs:
                    refs[0] -= 1
                    if refs[0] == 0:
                        # The last reference: by dlopen's count the instance is unloaded. (One
                        # pinned by RTLD_NODELETE or a dependency stays mapped; exact unmapping
                        # is the attribution layer's to track.)
                        del p.handles[handle]
                        p.unloaded.update(refs[1])
            elif op == FORK:
                old = current.get(child)
                if old is not None:  # its exit was lost: close the old history
                    self._end(old, ts)
                self._begin(p.fork(child, ts))
            elif op == EXEC:
                # A new program image: its key table, libraries and counters start empty.
                p = self._begin(Process(pid=pid, start=p.start, comm=comm, exe=path,
                                        parent=p.parent))
            elif op == EXIT:
                self._end(p, ts)
            if op != EXIT:
                p.comm = comm  # thread names at exit are not the process's

    def _begin(self, p: Process) -> Process:
        self._procs[p.ident] = p
        self._current[p.pid] = p
        return p

    def _end(self, p: Process, ts: int) -> None:
        p.exited = ts
        if self._current.get(p.pid) is p:
            del self._current[p.pid]
        if self.keep_events:
            return
        if not p.active:
            del self._procs[p.ident]
            return
        self._exited.append(p.ident)
        while len(self._exited) > self.max_exited:
            self._procs.pop(self._exited.popleft(), None)

    # -- output ------------------------------------------------------------------------------
    @property
    def events(self) -> pd.DataFrame:
        """Every event kept, in arrival order (empty when keep_events is False)."""
        with self._lock:
            if self._events is None:
                self._events = (pd.concat(self._chunks, ignore_index=True) if self._chunks
                                else empty_events())
                self._chunks = [self._events]
            return self._events

    def processes(self) -> list[Process]:
        with self._lock:
            return list(self._procs.values())

    def summary(self, all_processes: bool = False, reloads_per_day: Optional[float] = None,
                attribute: bool = True) -> pd.DataFrame:
        """One row per process: counters, live keys, the library behind them, the forecast and
        the verdict (see tracer.analysis). Only processes that touched keys or libraries are
        listed unless all_processes. attribute=False skips naming libraries (cheaper)."""
        with self._lock:
            procs = [p for p in self._procs.values() if all_processes or p.active]
            return analysis.summarize(procs, self.last_ts, reloads_per_day, attribute)

    def forecast(self, reloads_per_day: Optional[float] = None) -> pd.DataFrame:
        """Per process: keys in use, the limit, the leak rate and when it runs out."""
        cols = ["pid", "comm", "live_keys", "limit", "headroom", "leak_per_reload",
                "reloads_per_day", "keys_per_day", "days_left", "exhaustion_eta", "leaking"]
        return self.summary(reloads_per_day=reloads_per_day)[cols]

    def keys_over_time(self) -> pd.DataFrame:
        """Keys in use per process after each create and delete (ts, pid, comm, live_keys),
        from the kept events. Counts restart at exec; keys inherited through fork are not
        included (the child's line starts at 0)."""
        ev = self.events
        ev = ev[ev["op"].isin(["create", "delete", "exec", "exit"])]
        delta = ((ev["op"] == "create").astype(int)
                 - ((ev["op"] == "delete") & (ev["ret"] == 0)).astype(int))
        # A new program image (exec) or a new process on the pid (after exit) starts at zero.
        boundary = ev["op"].isin(["exec", "exit"]).astype(int)
        segment = boundary.groupby(ev["pid"]).cumsum() - boundary
        level = delta.groupby([ev["pid"], segment]).cumsum()
        keep = ev["op"].isin(["create", "delete"])
        return pd.DataFrame({"ts": ev["ts"][keep], "pid": ev["pid"][keep],
                             "comm": ev["comm"][keep].astype(str), "live_keys": level[keep]}
                            ).reset_index(drop=True)

    def _repr_html_(self) -> str:
        from .jupyter import ledger_html
        return ledger_html(self)

    def by_library(self) -> pd.DataFrame:
        """One row per (process, creating library): keys created, deleted, live, orphaned."""
        with self._lock:
            return analysis.by_library([p for p in self._procs.values() if p.sites])

    def reloads(self) -> pd.DataFrame:
        """One row per (process, dlopen'd path): cycles and the keys each one leaves behind."""
        with self._lock:
            return analysis.reloads([p for p in self._procs.values() if p.loads])


__all__ = ["Ledger", "Process", "Site", "Module", "COLUMNS"]
