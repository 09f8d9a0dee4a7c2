"""What a resource is, to the generic layers: a declaration, and the registry of them by name.

A resource is anything a process acquires and releases through library calls, held in a table
with a limit: pthread keys (tracer.resources.keys), a user's --pair (tracer.resources.pairs),
file descriptors... Its declaration says its functions, where the handle is, what success means,
its owner, how its table is read at first sight, its limit, its planned sites and its names. The
generic layers (wire, bpf, state, store, analysis) read declarations; they import no resource
module and name no resource.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from . import wire
from .errors import UsageError


@dataclass(frozen=True)
class Resource:
    name: str                         # in records (by id), frames, rows and metrics
    acquire: tuple = ()               # the functions that acquire a handle
    release: tuple = ()               # the functions that release one
    handle: str = "ret"               # where an acquire leaves it: ret, argN, or *argN (at return)
    release_handle: str = "arg0"      # where a release takes it: argN
    success: str = "nonneg"           # an acquire succeeded when its return value is: zero,
                                      # nonneg (>= 0) or nonnull (a pointer)
    owner: str = ""                   # argN: a code address the handle belongs to ("": none)
    limit: Optional[int] = None       # a fixed limit on handles in use per process
    limit_of: Optional[Callable[[Any], int]] = None  # or one per process (its C library, say)
    inherit_on_fork: bool = True      # a fork copies the table (memory, descriptors)
    keep_on_exec: bool = False        # the table survives exec (descriptors without CLOEXEC)
    # How its table is read at first sight: reader(pid, host_libc) -> (status, [(handle, owner,
    # owner unmapped, seq)]); None: handles made before tracing are unknown, and said so.
    reader: Optional[Callable[..., tuple]] = None
    # How its table is read now, with no tracing (keytrace scan --resource): census(pid, cache)
    # -> Census, or raises tracer.host.tables.Unreadable; cache is shared by one survey's calls.
    census: Optional[Callable[..., "Census"]] = None
    # Handles held by one owner that a table alone shows to be a leak (None: no count does).
    same_owner: Optional[int] = None
    # One orphaned handle makes the process critical (a handler whose code is gone: the next
    # fork or exit crashes), not only leaking.
    orphan_critical: bool = False
    # Its count is an estimate (a lower bound, say), never to be shown as a count.
    estimate: bool = False
    words: dict = field(default_factory=dict, hash=False)  # its names in rows: see row_names
    extra: dict = field(default_factory=dict, hash=False)  # what its own probe unit needs

    @property
    def traced(self) -> bool:
        """Whether keytrace traces its calls (watch), or only reads its table (scan)."""
        return bool(self.acquire)

    @property
    def id(self) -> int:
        return wire.register_resource(self.name)

    def word(self, generic: str) -> str:
        """The name this resource gives a generic thing ("acquires" -> "creates" for keys)."""
        if generic in self.words:
            return self.words[generic]
        if generic == "acquire_call":
            return self.acquire[0] if self.acquire else "acquire"
        return _PLAIN.get(generic, generic)


@dataclass
class Census:
    """A resource's table in one process, as read now."""
    in_use: int
    limit: Optional[int]          # the limit that binds (None: none does)
    headroom: Optional[int]       # acquires left before it binds (a limit shared by others
                                  # leaves less than limit - in_use)
    limit_source: str             # which limit that is, in words ("RLIMIT_NOFILE")
    owners: Counter               # what grows (an fd's target, a thread's name) -> handles
    judged: Optional[Counter] = None  # the owners a same_owner count judges (None: owners)
    orphaned: int = 0             # handles whose owner's code is no longer mapped
    orphans: Optional[Counter] = None  # the owners of those, when known
    estimate: bool = False        # in_use is an estimate, not a count


# Words of the prose (reasons) a resource without words of its own is spoken of in.
_PLAIN = {"unit": "handle", "units": "handles", "acquire_word": "acquire", "full": "table full",
          "owner": "owner", "orphaned_why": "owner in no mapping"}

_REGISTRY: dict = {}


def register(r: Resource) -> Resource:
    """Make a resource known by its name (its record id is its wire id)."""
    _REGISTRY[r.name] = r
    wire.register_resource(r.name)
    return r


def get(name: str) -> Resource:
    """A resource by name; one met only in a saved ledger (a --pair of another run) gets the
    generic declaration."""
    return _REGISTRY.get(name) or Resource(name)


def default() -> Resource:
    """The first resource registered: what a tracer traces and a ledger shows when not told."""
    if not _REGISTRY:
        raise LookupError("no resource is registered (import tracer.resources)")
    return next(iter(_REGISTRY.values()))


def known() -> list:
    return list(_REGISTRY.values())


def select(names, traced: bool = False) -> list:
    """The registered resources a list names (a comma list is split; "all": every one), in the
    order given; a name none has is a UsageError that lists those known. traced: for a tracer,
    which takes "all" to mean every resource it can trace or read at each reload cycle, and
    refuses one it can do neither with."""
    pool = [r for r in known() if r.traced or r.census is not None or not traced]
    wanted = [n.strip() for item in names for n in str(item).split(",") if n.strip()]
    if "all" in wanted:
        return pool
    unknown = [n for n in wanted if n not in _REGISTRY]
    if unknown:
        raise UsageError(f"no resource {unknown[0]!r}: keytrace knows "
                         f"{', '.join(r.name for r in known())} (or all)")
    if not wanted:
        raise UsageError("no resource named: give one or more of "
                         f"{', '.join(r.name for r in pool)} (or all)")
    read_only = [n for n in wanted if _REGISTRY[n] not in pool]
    if read_only:
        raise UsageError(f"{read_only[0]} can be neither traced nor read: watch takes "
                         f"{', '.join(r.name for r in pool)}")
    return [_REGISTRY[n] for n in dict.fromkeys(wanted)]
