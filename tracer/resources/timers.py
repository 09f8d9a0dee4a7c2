"""POSIX timers: timer_create makes one (its id written through the third argument),
timer_delete frees it. Each holds a preallocated signal queue entry charged to the user, so the
limit that binds is RLIMIT_SIGPENDING (shared by every process of the uid: /proc/PID/status
SigQ says how much is used). A timer is not inherited by a fork, and an exec deletes them all.

At first sight the live table is /proc/PID/timers (the kernel's ids). glibc hands out the
kernel's id as the timer_t of a SIGEV_SIGNAL or SIGEV_NONE timer, so a traced timer_delete of a
timer made before tracing matches it; a SIGEV_THREAD timer's timer_t (glibc 2.34+) is a pointer
of glibc's own, and its deletion leaves the id read at first sight counted as in use.
"""
from __future__ import annotations

import resource as rlimit
from collections import Counter
from typing import Optional

from .. import resource
from ..host import proc, tables
from . import pairs

_SIGPENDING = "Max pending signals"


def read_timers(pid: int, host_libc: Optional[str] = None) -> tuple:
    """(status, [(timer id, owner 0, False, seq 0)], no modules): /proc/PID/timers."""
    try:
        with open(f"/proc/{pid}/timers") as fh:
            ids = [int(line.split()[1]) for line in fh if line.startswith("ID:")]
    except FileNotFoundError:
        return ("not read: exited" if not proc.exists(pid) else
                "not read: this kernel has no /proc/PID/timers"), [], None
    except PermissionError:
        return "not read: permission denied", [], None
    except (OSError, ValueError, IndexError) as e:
        return f"not read: {e}", [], None
    return "read", [(i, 0, False, 0) for i in ids], None


def limit_of(p) -> int:
    """The process's RLIMIT_SIGPENDING soft limit while it runs; once it has exited, this
    host's (keytrace's own, which a process inherits unless it was changed)."""
    try:
        with open(f"/proc/{p.pid}/limits") as fh:
            for line in fh:
                if line.startswith(_SIGPENDING) and p.exited is None:
                    soft = line[len(_SIGPENDING):].split()[0]
                    return int(soft) if soft.isdigit() else 0
    except OSError:
        pass
    soft = rlimit.getrlimit(rlimit.RLIMIT_SIGPENDING)[0]
    return soft if soft != rlimit.RLIM_INFINITY else 0


def census(pid: int, cache: dict) -> resource.Census:
    """The table now: how each timer notifies; the limit the uid's signal queue (SigQ)."""
    owners = Counter(tables.timer_owners(pid))
    used, limit = (int(x) for x in tables.status(pid, cache)["SigQ"].split("/"))
    if limit >= 2**63:  # unlimited (RLIM_INFINITY, 2^64 - 1): no limit binds
        return resource.Census(sum(owners.values()), None, None, "none (RLIMIT_SIGPENDING "
                               "unlimited)", owners)
    return resource.Census(sum(owners.values()), limit, max(limit - used, 0),
                           "RLIMIT_SIGPENDING (SigQ)", owners)


TIMERS = pairs.declare(
    pairs.parse("libc:timer_create=*arg2/timer_delete=arg0"), name="timers",
    reader=read_timers, limit_of=limit_of, census=census, inherit_on_fork=False, keep_on_exec=False,
    words={"unit": "timer", "units": "timers", "acquire_word": "create",
           "full": "signal queue limit reached (RLIMIT_SIGPENDING)", "owner": "notification"})
