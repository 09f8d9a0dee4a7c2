"""The tracker: events in, per-process state out.

Events arrive as frames (tracer.wire.decode, a saved file, or the host facts of observe()). The
tracker keeps them (unless asked to keep only state) and replays them in order through the three
state machines: processes (fork, exec, exit), modules (dlopen, map, munmap) and keys (create,
delete). What the state *means* is decided in tracer.analysis, over snapshot() copies taken under
the lock, so analysing never stalls the ingest.
"""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Iterable, Optional

import numpy as np

from .. import wire
from ..host.elf import elf_info

if TYPE_CHECKING:  # frames are built on demand: a tracker fed records never imports pandas
    import pandas as pd
from .processes import Process, Processes
from .samples import Sample

_C = wire.CODE
_LEVEL_OPS = {_C["acquire"], _C["release"], _C["held"]}
_READ_OPS = {_C["sample"], _C["owned"]}
_HOST_CODES = len(wire.KERNEL_OPS)
_MUSL = wire.LIBCS.index("musl")  # category codes from here on are host facts, not records


class Tracker:
    """Per-process state built from events: modules, and a table per resource.

    keep_events: keep the event frames (``events``). With False only state is kept, and exited
    processes are forgotten as tracer.state.processes.Processes says: memory stays flat.
    """

    def __init__(self, keep_events: bool = True, max_exited: int = 10_000,
                 record_levels: bool = False):
        self.keep_events = keep_events
        # (ts, pid, comm, resource, handles in use) after each acquire and release, when asked
        self.levels: Optional[list] = [] if record_levels else None
        self.lost = 0        # records the kernel could not queue
        self.event_count = 0  # records the kernel sent (host facts not counted)
        self.last_ts = 0     # ns since the epoch up to which all is seen: "now" for a forecast
        self._chunks: list[pd.DataFrame] = []
        self._events: Optional[pd.DataFrame] = None
        self._procs = Processes(keep_exited=keep_events, max_exited=max_exited)
        self._lock = threading.Lock()  # ingest may run in a polling thread

    # -- input -------------------------------------------------------------------------------
    def ingest(self, frame: "pd.DataFrame", lost: Optional[int] = None,
               now: Optional[int] = None) -> None:
        """Apply a frame of events (in time order) to the state; lost: the kernel's count of
        records it could not queue so far; now: the time (ns since the epoch) up to which
        everything is known to have been seen, quiet time included."""
        self.advance(lost, now)
        with self._lock:
            if frame.empty:
                return
            if self.keep_events:
                self._chunks.append(frame)
                self._events = None
            self.event_count += int((frame["op"].cat.codes < _HOST_CODES).sum())
            self.last_ts = max(self.last_ts, int(frame["ts"].array.asi8.max()))
            self._replay(wire.frame_columns(frame))

    def ingest_records(self, batch: np.ndarray, wall_offset_ns: int, stack_of=None,
                       lost: Optional[int] = None, now: Optional[int] = None) -> None:
        """Records as the ring gives them (tracer.wire.RECORD): decoded into a frame when events
        are kept, else replayed straight from the records."""
        if self.keep_events:
            return self.ingest(wire.decode(batch, wall_offset_ns, stack_of=stack_of), lost, now)
        self.advance(lost, now)
        if not len(batch):
            return
        cols = wire.columns(batch, wall_offset_ns, stack_of)
        with self._lock:
            self.event_count += int((batch["op"] <= _HOST_CODES).sum())
            self.last_ts = max(self.last_ts, max(cols[0]))
            self._replay(cols)

    def advance(self, lost: Optional[int] = None, now: Optional[int] = None) -> None:
        """No events, but news: the lost count so far, and that all is seen up to now."""
        with self._lock:
            if lost is not None:
                self.lost = lost
            if now:
                self.last_ts = max(self.last_ts, now)

    def observe(self, pid: int, ts: int, comm: str, **facts) -> None:
        """What the host showed of a process when it was met: see facts()."""
        self.ingest_records(self.fact_records(pid, ts, comm, **facts), 0)

    @classmethod
    def facts(cls, pid: int, ts: int, comm: str, **facts) -> "pd.DataFrame":
        """fact_records() as an events frame."""
        return wire.decode(cls.fact_records(pid, ts, comm, **facts), 0)

    @staticmethod
    def fact_records(pid: int, ts: int, comm: str, exe: Optional[str] = None,
                     start: Optional[int] = None, ppid: int = 0, modules: Iterable[tuple] = (),
                     tables: Optional[dict] = None, late: bool = False) -> np.ndarray:
        """Host facts about a process as events: its identity (exe, start time, parent pid), the modules it
        had mapped ((path, base) pairs), and its resources' tables (tables: resource name ->
        (status: "read" or why not, [(handle, owner, owner unmapped[, seq])] in use)); late: its
        C library was probed just now, so tracing of it begins here. Kept like any event, so a
        saved ledger replays with them; ingest them where they belong in the stream."""
        base = dict(ts=ts, pid=pid, tid=pid, comm=comm)
        rows = []
        if exe is not None or start is not None:
            rows.append(dict(base, op="seen", path=exe or "", aux=start or 0, child=ppid))
        rows += [dict(base, op="mapped", path=path, aux=addr) for path, addr in modules]
        for name, (status, handles) in (tables or {}).items():
            rows.append(dict(base, op="table", resource=name, path=status, ret=int(late)))
            rows += [dict(base, op="held", resource=name, handle=handle, owner=owner,
                          ret=int(unmapped), seq=seq[0] if seq else 0)
                     for handle, owner, unmapped, *seq in handles]
        return wire.records(rows)  # ts: ns since the epoch already (wall offset 0)

    @staticmethod
    def sample_records(pid: int, ts: int, comm: str, name: str, census=None,
                       why: str = "", top: int = 16, began: int = 0) -> np.ndarray:
        """A resource's table read (census: tracer.resource.Census; else why it was not read)
        as host facts: the count, the limit, headroom and the top owners. ts: when the read
        ended; began: when it began (0: the same)."""
        base = dict(ts=ts, pid=pid, tid=pid, comm=comm, resource=name, load=began or ts)
        if census is None:
            return wire.records([dict(base, op="sample", path=why)])
        c = census
        rows = [dict(base, op="sample", path=c.limit_source or "none", aux=c.in_use,
                     owner=c.limit or 0, caller=max(c.headroom or 0, 0), ret=c.orphaned)]
        rows += [dict(base, op="owned", path=o, aux=n) for o, n in c.owners.most_common(top)]
        return wire.records(rows)

    @staticmethod
    def counted(counts: dict, ts: int) -> np.ndarray:
        """The kernel's counts ({(pid, resource name): (acquires, failed acquires, releases,
        failed releases)}) as host facts: records, to ingest_records(..., 0)."""
        rows = [dict(op="counted", ts=ts, pid=pid, tid=pid, resource=name, aux=a, caller=fa,
                     owner=r, load=fr) for (pid, name), (a, fa, r, fr) in counts.items()]
        return wire.records(rows)

    def known_pids(self) -> set:
        with self._lock:
            return set(self._procs.latest)

    def settled(self, pid: int) -> bool:
        """Is the process on this pid between reload cycles (tracer.state.modules)?"""
        with self._lock:
            p = self._procs.current.get(pid)
            return p is None or p.modules.phase(self.last_ts) is not None

    def library_at(self, pid: int, addr: int) -> Optional[str]:
        """The library whose instance held addr in the process, the latest first: one unmapped
        since is what a dangling code pointer (a handler left behind) belongs to."""
        with self._lock:
            p = self._procs.current.get(pid)
            instances = list(p.modules.instances) if p is not None else []
        for m in reversed(instances):
            if m.base <= addr and m.path:
                info = elf_info(m.path)
                if info is not None and addr < m.base + info.hi:
                    return m.path
        return None

    def knows(self, pid: int) -> bool:
        """Is there a current (not exited) process on this pid?"""
        with self._lock:
            return pid in self._procs.current

    def _replay(self, cols: tuple) -> None:
        # One pass in time order: key values are reused by glibc after a delete, and fork/exec/
        # exit cut histories, so the order of operations is the state. Columns come as Python
        # lists (one C-level conversion each); the loop itself touches only dicts.
        procs = self._procs
        current = procs.current
        for ts, pid, comm, op, res, handle, ret, owner, caller, path, aux, load, child, stack, \
                seq in zip(*cols):
            p = current.get(pid)
            if op == _C["counted"]:  # may come after the exit: the newest process on the pid
                p = p or procs.latest.get(pid)
                if p is not None:
                    p.table(res).reconcile(aux, caller, owner, load)
                continue
            if p is None and op in _READ_OPS:
                continue  # a table read of a process not (or no longer) known: no ghost
            if p is None:
                start = aux if op == _C["seen"] and aux else ts
                p = procs.begin(Process(pid=pid, start=start, comm=comm, traced_since=ts))
            if op == _C["acquire"]:
                p.table(res).acquire(handle, caller, load, stack, owner, ts, seq)
                if aux == _MUSL:
                    p.libc = "musl"
            elif op == _C["release"]:
                p.table(res).release(handle, ret, seq)
            elif op == _C["acquire_failed"]:
                p.table(res).acquire_failed(ret, ts)
            elif op == _C["map"] or op == _C["mapped"]:
                # The main program's link_map has no name; found already mapped (load 0): taken
                # as mapped since the process (image) began.
                p.modules.map(path or p.exe or "", aux, load, ts if load else p.start)
            elif op == _C["unmap"]:
                p.modules.unmap(aux, ts)
            elif op == _C["dlopen"]:
                p.modules.dlopen(load, path, aux, ts)
            elif op == _C["dlopen_begin"]:
                p.modules.begin(load, ts)
            # dlclose: kept in the events, but unmapping (unmap) is what says a library is gone
            elif op == _C["fork"]:
                procs.fork(p, child, ts)
            elif op == _C["exec"]:
                p = procs.exec(p, path, comm, ts)
            elif op == _C["exit"]:
                procs.end(p, ts)
            elif op == _C["held"]:
                p.table(res).held(handle, owner, bool(ret), ts, seq)
            elif op == _C["table"]:
                # Read again later (a rescan, a late probe): tracing began at the first read,
                # and a table read once stays "read".
                t = p.table(res)
                if t.read is None or (t.read != "read" and path == "read"):
                    t.read = path
                if p.traced_since is None or ret:
                    p.traced_since = ts
            elif op == _C["seen"]:
                p.exe = path or p.exe
                if child and p.parent is None:  # its parent as the host showed it (not forked
                    p.parent = (child, 0)        # under the probes: start unknown)
                if aux:
                    procs.restart(p, aux)
            elif op == _C["sample"]:
                if path.startswith("not read"):
                    p.sampled(res).failed(path)
                else:
                    # its modules changed while it was read (load: when the read began): the
                    # read may have caught either side of it
                    phase = p.modules.phase(ts) if p.modules.changed < load else None
                    p.sampled(res).add(Sample(ts, p.modules.cycles(), aux, owner or None,
                                              caller if owner else None, path,
                                              phase or "between", orphaned=ret))
            elif op == _C["owned"]:
                last = p.sampled(res).last
                if last is not None:  # (two names cut to one path length add up)
                    last.owners[path] = last.owners.get(path, 0) + aux
            if op != _C["exit"]:
                p.comm = comm  # thread names at exit are not the process's
            if self.levels is not None and op in _LEVEL_OPS:
                self.levels.append((ts, pid, p.comm, res, len(p.table(res).live)))

    # -- output ------------------------------------------------------------------------------
    @property
    def events(self) -> "pd.DataFrame":
        """Every event kept, in arrival order (empty when keep_events is False)."""
        import pandas as pd
        with self._lock:
            if self._events is None:
                self._events = (pd.concat(self._chunks, ignore_index=True) if self._chunks
                                else wire.empty_events())
                self._chunks = [self._events]
            return self._events

    def snapshot(self, only=None) -> tuple[list[Process], int]:
        """Copies of the processes (those for which only(p) holds) and the newest event's ts,
        taken under the lock: analyse them at leisure."""
        with self._lock:
            return ([p.copy() for p in self._procs.all.values() if only is None or only(p)],
                    self.last_ts)

    def processes(self) -> list[Process]:
        return self.snapshot()[0]
