"""The key machine: pthread_key_create and pthread_key_delete paired by key value.

glibc hands a deleted key's number to the next create, so the order of operations is the state;
pairing is by key value, never by caller (a destructor may tail-call pthread_key_delete from
anywhere). Where the probes see the slot's sequence number (planned sites, the live table), a
key number has generations: a create of generation s and the delete that ends it (s + 1) are
paired even when two threads' records reach the ring in the other order.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional


@dataclass(slots=True)
class Site:
    """Where keys come from: one call site (caller, stack) within one dlopen (load id); or, for
    keys already live when the process was met (held), their destructor."""
    caller: int
    load: int
    stack: Optional[str]
    destructor: int
    first: int            # ts of its first create (held: when the table was read)
    created: int = 0
    deleted: int = 0
    held: bool = False    # from the live table, not a traced create
    unmapped: bool = False  # held: its destructor lay in no mapping when the table was read


@dataclass
class Keys:
    live: dict = field(default_factory=dict)      # key -> Site that created it
    born: dict = field(default_factory=dict)      # key -> ts of its create (held: of the read)
    sites: dict = field(default_factory=dict)     # (caller, load, stack) -> Site
    gen: dict = field(default_factory=dict)       # key -> sequence number of its live generation
    ended: set = field(default_factory=set)       # (key, seq) deletes seen before their create
    creates: int = 0          # pthread_key_create calls, failed ones included
    failed_creates: int = 0
    deletes: int = 0          # successful pthread_key_delete calls
    failed_deletes: int = 0
    last_failure_ret: int = 0
    first_failure: Optional[int] = None  # ts of the first failed create
    # Calls the kernel counted whose records were lost: (creates, failed creates, deletes,
    # failed deletes). They cost detail (which key, who made it), never a count.
    missed: tuple = (0, 0, 0, 0)
    ends: int = 0   # live keys that ended: deletes that found their key, and keys replaced

    @property
    def touched(self) -> bool:
        return bool(self.creates or self.deletes or self.failed_deletes or self.live)

    def reconcile(self, creates: int, failed_creates: int, deletes: int, failed_deletes: int) -> None:
        """The kernel's counts for this image: whatever the traced records fall short of was lost."""
        traced = (self.creates - self.failed_creates, self.failed_creates, self.deletes,
                  self.failed_deletes)
        kernel = (creates, failed_creates, deletes, failed_deletes)
        self.missed = tuple(max(0, k - t) for k, t in zip(kernel, traced))

    @property
    def live_count(self) -> int:
        """Keys in use. With records lost, the kernel's counts decide: every traced create added
        a key and every end removed one, so what the records miss is the kernel's creates not
        traced less its deletes that ended nothing traced."""
        if self.missed == (0, 0, 0, 0):
            return len(self.live)
        traced_creates = self.creates - self.failed_creates
        kernel_creates = traced_creates + self.missed[0]
        kernel_deletes = self.deletes + self.missed[2]
        return max(0, len(self.live) + (kernel_creates - traced_creates)
                   - (kernel_deletes - self.ends))

    @property
    def held_count(self) -> int:
        """Keys live when the process was met (from its table) and live still."""
        return sum(1 for s in self.live.values() if s.held)

    def create(self, key: int, caller: int, load: int, stack: Optional[str], destructor: int,
               ts: int, seq: int = 0) -> None:
        self.creates += 1
        site = self.sites.get((caller, load, stack))
        if site is None:
            site = self.sites[(caller, load, stack)] = Site(caller, load, stack, destructor, ts)
        site.created += 1
        if seq and (key, seq + 1) in self.ended:  # its delete came first: created and gone
            self.ended.discard((key, seq + 1))
            site.deleted += 1
            self.ends += 1
            return
        if key in self.live:  # still live by our records: the delete that freed it was lost
            self.ends += 1
        self.live[key] = site
        self.born[key] = ts
        self.gen[key] = seq

    def held(self, key: int, destructor: int, unmapped: bool, ts: int, seq: int = 0) -> None:
        """A key the live table showed in use. The table already holds what traced events
        before its reading did, so a key known live stays as it is: holding is idempotent, and
        a table may be read again at any time without counting a key twice."""
        if key in self.live:
            return
        site = self.sites.get(("held", destructor))
        if site is None:
            site = self.sites[("held", destructor)] = Site(0, 0, None, destructor, ts, held=True,
                                                          unmapped=unmapped)
        site.created += 1
        self.live[key] = site
        self.born[key] = ts
        self.gen[key] = seq

    def create_failed(self, ret: int, ts: int) -> None:
        self.creates += 1
        self.failed_creates += 1
        self.last_failure_ret = ret
        if self.first_failure is None:
            self.first_failure = ts

    def delete(self, key: int, ret: int, seq: int = 0) -> None:
        if ret != 0:
            self.failed_deletes += 1
            return
        self.deletes += 1
        live = self.gen.get(key, 0)
        if seq and key in self.live and live and live != seq - 1:
            if live < seq - 1:     # ends a generation whose create is still to come
                self.ended.add((key, seq))
            return                 # else it ended a generation already replaced: nothing live
        if seq and key not in self.live:
            self.ended.add((key, seq))
            return
        site = self.live.pop(key, None)
        self.gen.pop(key, None)
        self.born.pop(key, None)
        if site is not None:
            site.deleted += 1
            self.ends += 1

    def inherited(self) -> "Keys":
        """A forked child's table: the parent's live keys, in copies of their sites (the child's
        own creates and deletes must not touch the parent's), and no calls of its own yet: the
        sites' counts start at zero, so the parent's calls are counted once, in the parent."""
        return self._clone(keep_counts=False)

    def _clone(self, keep_counts: bool) -> "Keys":
        copies = {id(s): replace(s) if keep_counts else replace(s, created=0, deleted=0)
                  for s in self.sites.values()}
        return Keys(live={k: copies[id(s)] for k, s in self.live.items()},
                    sites={k: copies[id(s)] for k, s in self.sites.items()},
                    born=dict(self.born), gen=dict(self.gen), ended=set(self.ended))

    def copy(self) -> "Keys":
        """An independent snapshot (sites copied, so later counts do not leak into it)."""
        out = self._clone(keep_counts=True)
        for name in ("creates", "failed_creates", "deletes", "failed_deletes",
                     "last_failure_ret", "first_failure", "missed", "ends"):
            setattr(out, name, getattr(self, name))
        return out
