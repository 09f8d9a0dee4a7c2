"""A resource's table read now and then (a read-only resource: no acquire or release traced),
as the reload cycles go by, kept bounded: the first read and the last, and per phase of the
cycle it was read in (the reloaded libraries loaded, or unloaded) the first read after a
completed cycle (the base: a first load's lazily made handles are not a leak), the last, and
the steps between reads. tracer.analysis turns them into what each cycle leaves: reads of one
phase compared with each other only, so a server read now between restarts and now between its
unloads and its loads does not look as if it grew or shrank.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Optional

STEPS = 256  # steps kept (cycles, handles) between consecutive reads of one phase


@dataclass(slots=True)
class Sample:
    ts: int
    cycles: int                      # completed load/unload cycles of the process by then
    in_use: int
    limit: Optional[int]             # None: no limit binds
    headroom: Optional[int]
    source: str                      # which limit
    phase: str = ""                  # "loaded" or "unloaded" (tracer.state.modules.phase)
    owners: dict = field(default_factory=dict)  # what grows -> handles (the top of them)
    orphaned: int = 0                # handles whose owner's code was gone when read


@dataclass
class Phase:
    base: Optional[Sample] = None
    last: Optional[Sample] = None
    steps: deque = field(default_factory=lambda: deque(maxlen=STEPS))

    def add(self, s: Sample) -> None:
        if self.base is None:
            if s.cycles >= 1:
                self.base = self.last = s
            return
        if s.cycles > self.last.cycles:
            self.steps.append((s.cycles - self.last.cycles, s.in_use - self.last.in_use))
        self.last = s

    def copy(self) -> "Phase":
        return Phase(self.base, self.last, deque(self.steps, maxlen=STEPS))


@dataclass
class Samples:
    status: str = ""                 # the last read: "read", or "not read: why"
    first: Optional[Sample] = None
    last: Optional[Sample] = None
    reads: int = 0
    phases: dict = field(default_factory=dict)  # phase -> Phase

    def add(self, s: Sample) -> None:
        self.status = "read"
        self.reads += 1
        if self.first is None:
            self.first = s
        self.last = s
        self.phases.setdefault(s.phase, Phase()).add(s)

    def failed(self, why: str) -> None:
        self.status = why

    def compared(self) -> Phase:
        """The phase whose reads say most of what a cycle leaves: most steps, then the
        latest."""
        settled = [ph for name, ph in self.phases.items() if name != "between"]
        if not settled:
            return Phase()
        return max(settled,
                   key=lambda ph: (len(ph.steps), ph.last.ts if ph.last else 0))

    def copy(self) -> "Samples":
        # A Sample is not changed once its owners are in (right after it): shared.
        return Samples(self.status, self.first, self.last, self.reads,
                       {k: ph.copy() for k, ph in self.phases.items()})
