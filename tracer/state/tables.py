"""The pair machine: one resource's acquires and releases in one process, paired by handle.

A released handle's value may come back from the next acquire (glibc reuses a deleted key's
number, the kernel the lowest free fd), so the order of operations is the state; pairing is by
handle value, never by caller (a release may come from anywhere). Where the probes see a
handle's sequence number, a handle value has generations: an acquire of generation s and the
release that ends it (s + 1) are paired even when two threads' records reach the ring in the
other order.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional


@dataclass(slots=True)
class Site:
    """Where handles come from: one call site (caller, stack) within one dlopen (load id); or,
    for handles already live when the process was met (held), their owner."""
    caller: int
    load: int
    stack: Optional[str]
    owner: int
    first: int            # ts of its first acquire (held: when the table was read)
    acquired: int = 0
    released: int = 0
    held: bool = False    # from the live table, not a traced acquire
    unmapped: bool = False  # held: its owner lay in no mapping when the table was read


@dataclass
class Table:
    live: dict = field(default_factory=dict)      # handle -> Site that acquired it
    born: dict = field(default_factory=dict)      # handle -> ts of its acquire (held: the read)
    sites: dict = field(default_factory=dict)     # (caller, load, stack) -> Site
    gen: dict = field(default_factory=dict)       # handle -> sequence number of its generation
    ended: set = field(default_factory=set)       # (handle, seq) releases seen before acquires
    acquires: int = 0         # calls, failed ones included
    failed_acquires: int = 0
    releases: int = 0         # successful release calls
    failed_releases: int = 0
    last_failure_ret: int = 0
    first_failure: Optional[int] = None  # ts of the first failed acquire
    # Calls the kernel counted whose records were lost: (acquires, failed acquires, releases,
    # failed releases). They cost detail (which handle, who acquired it), never a count.
    missed: tuple = (0, 0, 0, 0)
    ends: int = 0   # live handles that ended: releases that found theirs, and handles replaced
    read: Optional[str] = None  # its table at first sight: "read" or why not (None: not asked)

    @property
    def touched(self) -> bool:
        return bool(self.acquires or self.releases or self.failed_releases or self.live)

    def reconcile(self, acquires: int, failed: int, releases: int, failed_releases: int) -> None:
        """The kernel's counts for this image: whatever the traced records fall short of was lost."""
        traced = (self.acquires - self.failed_acquires, self.failed_acquires, self.releases,
                  self.failed_releases)
        kernel = (acquires, failed, releases, failed_releases)
        self.missed = tuple(max(0, k - t) for k, t in zip(kernel, traced))

    @property
    def live_count(self) -> int:
        """Handles in use. With records lost, the kernel's counts decide: every traced acquire
        added one and every end removed one, so what the records miss is the kernel's acquires
        not traced less its releases that ended nothing traced."""
        if self.missed == (0, 0, 0, 0):
            return len(self.live)
        traced = self.acquires - self.failed_acquires
        kernel_acquires = traced + self.missed[0]
        kernel_releases = self.releases + self.missed[2]
        return max(0, len(self.live) + (kernel_acquires - traced) - (kernel_releases - self.ends))

    @property
    def held_count(self) -> int:
        """Handles live when the process was met (from its table) and live still."""
        return sum(1 for s in self.live.values() if s.held)

    def acquire(self, handle: int, caller: int, load: int, stack: Optional[str], owner: int,
                ts: int, seq: int = 0) -> None:
        self.acquires += 1
        site = self.sites.get((caller, load, stack))
        if site is None:
            site = self.sites[(caller, load, stack)] = Site(caller, load, stack, owner, ts)
        site.acquired += 1
        if seq and (handle, seq + 1) in self.ended:  # its release came first: made and gone
            self.ended.discard((handle, seq + 1))
            site.released += 1
            self.ends += 1
            return
        if handle in self.live:  # still live by our records: the release that freed it was lost
            self.ends += 1
        self.live[handle] = site
        self.born[handle] = ts
        self.gen[handle] = seq

    def held(self, handle: int, owner: int, unmapped: bool, ts: int, seq: int = 0) -> None:
        """A handle the live table showed in use. The table already holds what traced events
        before its reading did, so a handle known live stays as it is: holding is idempotent,
        and a table may be read again at any time without counting a handle twice."""
        if handle in self.live:
            return
        site = self.sites.get(("held", owner))
        if site is None:
            site = self.sites[("held", owner)] = Site(0, 0, None, owner, ts, held=True,
                                                      unmapped=unmapped)
        site.acquired += 1
        self.live[handle] = site
        self.born[handle] = ts
        self.gen[handle] = seq

    def acquire_failed(self, ret: int, ts: int) -> None:
        self.acquires += 1
        self.failed_acquires += 1
        self.last_failure_ret = ret
        if self.first_failure is None:
            self.first_failure = ts

    def release(self, handle: int, ret: int, seq: int = 0) -> None:
        if ret != 0:
            self.failed_releases += 1
            return
        self.releases += 1
        live = self.gen.get(handle, 0)
        if seq and handle in self.live and live and live != seq - 1:
            if live < seq - 1:     # ends a generation whose acquire is still to come
                self.ended.add((handle, seq))
            return                 # else it ended a generation already replaced: nothing live
        if seq and handle not in self.live:
            self.ended.add((handle, seq))
            return
        site = self.live.pop(handle, None)
        self.gen.pop(handle, None)
        self.born.pop(handle, None)
        if site is not None:
            site.released += 1
            self.ends += 1

    def inherited(self) -> "Table":
        """A forked child's table: the parent's live handles, in copies of their sites (the
        child's own acquires and releases must not touch the parent's), and no calls of its own
        yet: the sites' counts start at zero, so the parent's calls are counted once."""
        return self._clone(keep_counts=False)

    def _clone(self, keep_counts: bool) -> "Table":
        copies = {id(s): replace(s) if keep_counts else replace(s, acquired=0, released=0)
                  for s in self.sites.values()}
        return Table(live={k: copies[id(s)] for k, s in self.live.items()},
                     sites={k: copies[id(s)] for k, s in self.sites.items()},
                     born=dict(self.born), gen=dict(self.gen), ended=set(self.ended),
                     read=self.read if keep_counts else None)

    def copy(self) -> "Table":
        """An independent snapshot (sites copied, so later counts do not leak into it)."""
        out = self._clone(keep_counts=True)
        for name in ("acquires", "failed_acquires", "releases", "failed_releases",
                     "last_failure_ret", "first_failure", "missed", "ends"):
            setattr(out, name, getattr(self, name))
        return out
