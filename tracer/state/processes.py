"""The process machine: a process is (pid, start); fork copies its parent's modules and the
tables its resources say a fork copies, exec starts a new program image (with the tables that
survive exec), exit ends it. A recycled pid starts a new history instead of merging into the old.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Optional

from .. import resource
from .modules import Modules
from .samples import Samples
from .tables import Table


@dataclass
class Process:
    pid: int
    start: int                        # ns since the epoch
    comm: str
    exe: Optional[str] = None
    parent: Optional[tuple] = None    # (pid, start) of the parent, when its fork was seen
    exited: Optional[int] = None      # ts of its exit
    # When tracing of this program image began: its fork or exec, or, met while already
    # running, when its tables were read (each table says what its read showed).
    traced_since: Optional[int] = None
    libc: str = ""                    # "musl" once an acquire ran in musl (its probe says so)
    tables: dict = field(default_factory=dict)    # resource name -> Table
    modules: Modules = field(default_factory=Modules)
    samples: dict = field(default_factory=dict)   # resource name -> Samples (tables read)

    @property
    def ident(self) -> tuple:
        return (self.pid, self.start)

    def sampled(self, name: str) -> Samples:
        """Its reads of a resource's table (empty until the first)."""
        s = self.samples.get(name)
        if s is None:
            s = self.samples[name] = Samples()
        return s

    def table(self, name: str) -> Table:
        """Its table of a resource (empty until the resource is met)."""
        t = self.tables.get(name)
        if t is None:
            t = self.tables[name] = Table()
        return t

    @property
    def active(self) -> bool:
        """Did this process touch a resource or a library (directly or by inheritance)?"""
        return any(t.touched for t in self.tables.values()) or bool(self.modules.loads)

    def copy(self) -> "Process":
        return Process(self.pid, self.start, self.comm, self.exe, self.parent, self.exited,
                       self.traced_since, self.libc,
                       {n: t.copy() for n, t in self.tables.items()}, self.modules.copy(),
                       {n: s.copy() for n, s in self.samples.items()})


class Processes:
    """Every process met, and the current one on each pid.

    With keep_exited=False, exited processes that never touched keys are forgotten at once and
    the rest after max_exited newer exits: memory then stays flat however long it runs.
    """

    def __init__(self, keep_exited: bool = True, max_exited: int = 10_000):
        self.keep_exited = keep_exited
        self.max_exited = max_exited
        self.all: dict[tuple, Process] = {}
        self.current: dict[int, Process] = {}
        self.latest: dict[int, Process] = {}   # the newest process on each pid, exited or not
        self._exited: deque = deque()

    def begin(self, p: Process) -> Process:
        self.all[p.ident] = p
        self.current[p.pid] = p
        self.latest[p.pid] = p
        return p

    def restart(self, p: Process, start: int) -> None:
        """Its true start time became known (/proc/PID/stat): it is identified by that."""
        if start != p.start:
            del self.all[p.ident]
            p.start = start
            self.all[p.ident] = p

    def fork(self, parent: Process, child: int, ts: int) -> Process:
        old = self.current.get(child)
        if old is not None:  # its exit was lost: close the old history
            self.end(old, ts)
        # A forked child starts with a copy of its parent's memory: the tables in it.
        tables = {n: t.inherited() for n, t in parent.tables.items()
                  if resource.get(n).inherit_on_fork}
        modules = parent.modules.copy()
        modules.loading.clear()  # another thread's dlopen in flight does not go on in the child
        return self.begin(Process(child, ts, parent.comm, parent.exe, parent.ident, traced_since=ts,
                                  libc=parent.libc, tables=tables, modules=modules))

    def exec(self, p: Process, exe: str, comm: str, ts: int) -> Process:
        # A new program image: its libraries and counters start empty, and the tables that do
        # not survive exec.
        tables = {n: t.inherited() for n, t in p.tables.items() if resource.get(n).keep_on_exec}
        return self.begin(Process(p.pid, p.start, comm, exe, p.parent, traced_since=ts,
                                  tables=tables))

    def end(self, p: Process, ts: int) -> None:
        p.exited = ts
        if self.current.get(p.pid) is p:
            del self.current[p.pid]
        if self.keep_exited:
            return
        if not p.active:
            del self.all[p.ident]
            self.latest.pop(p.pid, None)
            return
        self._exited.append(p.ident)
        while len(self._exited) > self.max_exited:
            gone = self.all.pop(self._exited.popleft(), None)
            if gone is not None and self.latest.get(gone.pid) is gone:
                del self.latest[gone.pid]
