"""The key machine: pthread_key_create and pthread_key_delete paired by key value.

glibc hands a deleted key's number to the next create, so the order of operations is the state;
pairing is by key value, never by caller (a destructor may tail-call pthread_key_delete from
anywhere).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional


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


@dataclass
class Keys:
    live: dict = field(default_factory=dict)      # key -> Site that created it
    sites: dict = field(default_factory=dict)     # (caller, load, stack) -> Site
    creates: int = 0          # pthread_key_create calls, failed ones included
    failed_creates: int = 0
    deletes: int = 0          # successful pthread_key_delete calls
    failed_deletes: int = 0
    last_failure_ret: int = 0
    first_failure: Optional[int] = None  # ts of the first failed create

    @property
    def touched(self) -> bool:
        return bool(self.creates or self.deletes or self.failed_deletes or self.live)

    def create(self, key: int, caller: int, load: int, stack: Optional[str], destructor: int,
               ts: int) -> None:
        self.creates += 1
        site = self.sites.get((caller, load, stack))
        if site is None:
            site = self.sites[(caller, load, stack)] = Site(caller, load, stack, destructor, ts)
        site.created += 1
        self.live[key] = site

    def create_failed(self, ret: int, ts: int) -> None:
        self.creates += 1
        self.failed_creates += 1
        self.last_failure_ret = ret
        if self.first_failure is None:
            self.first_failure = ts

    def delete(self, key: int, ret: int) -> None:
        if ret != 0:
            self.failed_deletes += 1
            return
        self.deletes += 1
        site = self.live.pop(key, None)
        if site is not None:
            site.deleted += 1

    def inherited(self) -> "Keys":
        """A forked child's table: the parent's live keys, in copies of their sites (the child's
        own creates and deletes must not touch the parent's), and no calls of its own yet."""
        sites = {k: replace(s) for k, s in self.sites.items()}
        return Keys(live={k: sites[(s.caller, s.load, s.stack)] for k, s in self.live.items()},
                    sites=sites)

    def copy(self) -> "Keys":
        """An independent snapshot (sites copied, so later counts do not leak into it)."""
        out = self.inherited()
        for name in ("creates", "failed_creates", "deletes", "failed_deletes",
                     "last_failure_ret", "first_failure"):
            setattr(out, name, getattr(self, name))
        return out
