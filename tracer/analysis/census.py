"""keytrace scan --resource: every process's tables as read now (each resource's census), with
no tracing history, judged by the rules a table alone supports.

A row is one (process, resource): in use, the limit that binds and which one it is, headroom,
the owners that hold most, and a verdict. `critical`: the table is within CRITICAL_HEADROOM of
its limit. `leaking`: handles are orphaned, or one owner holds as many as the resource declares
a leak by itself (30 fds open to one file), never a bare count a busy healthy process also has
(a thread pool, connections). A table not read says why in `status`, with counts left null.
"""
from __future__ import annotations

import os
from datetime import datetime, timezone
from typing import Iterable, Optional

from .. import resource
from ..errors import UsageError
from ..host import proc, tables
from ..resource import Resource
from . import forecast as fc
from .verdicts import is_critical, orphan_reason

OK = "ok"
KERNEL_THREAD = "kernel thread"
TOP = 5  # owners a row names
COLUMNS = ["pid", "comm", "exe", "resource", "status", "in_use", "limit", "limit_source",
           "headroom", "owner", "owners", "same_owner", "orphaned", "estimate", "critical",
           "leaking", "reason", "per_day", "days_left", "exhaustion_eta"]
_COUNTS = ("in_use", "limit", "headroom", "same_owner", "orphaned")


def census_row(pid: int, comm: str, exe: str, r: Resource, cache: dict,
               reloads_per_day: Optional[float] = None, leak_per_reload: float = 1.0,
               now: Optional[datetime] = None) -> dict:
    """One process's table of one resource, judged, and dated when it leaks and a reload rate
    is given (leak_per_reload handles a reload)."""
    row = _blank(pid, comm, exe, r)
    try:
        c = r.census(pid, cache)
    except tables.Unreadable as u:
        row["status"] = str(u)
        return row
    except (OSError, ValueError, KeyError, IndexError) as e:  # a /proc shape not foreseen
        row["status"] = f"not read: {type(e).__name__}: {e}"
        return row
    judged = c.judged if c.judged is not None else c.owners
    top = judged.most_common(1)
    row.update(status=OK, in_use=c.in_use, limit=c.limit, headroom=c.headroom,
               limit_source=c.limit_source, owners=dict(c.owners.most_common(TOP)),
               owner=(c.owners.most_common(1) or [("", 0)])[0][0],
               same_owner=top[0][1] if top else 0, orphaned=c.orphaned, estimate=c.estimate or r.estimate)
    near = bool(c.limit and is_critical(c.headroom, c.limit))
    row["critical"] = near or bool(r.orphan_critical and c.orphaned)
    crowded = bool(r.same_owner and top and top[0][1] >= r.same_owner)
    row["leaking"] = bool(c.orphaned) or crowded
    reasons = []
    if near:
        most = "at most " if row["estimate"] else ""  # (in use is a lower bound)
        reasons.append(f"{most}{c.headroom} of {c.limit} {r.word('units')} left "
                       f"({c.limit_source})")
    if c.orphaned:
        reasons.append(orphan_reason(r, c.orphaned, c.orphans))
        if c.orphans:
            row["owner"] = c.orphans.most_common(1)[0][0]
    if crowded:
        reasons.append(f"{top[0][1]} {r.word('units')} held by one {r.word('owner')} "
                       f"({top[0][0]})")
    if row["leaking"] and c.limit and reloads_per_day:
        f = fc.forecast(c.limit - c.headroom, c.limit, now or datetime.now(timezone.utc),
                        leak_per_reload, reloads_per_day)
        row.update(per_day=f.keys_per_day, days_left=f.days_left, exhaustion_eta=f.exhaustion_eta)
        if f.days_left is not None:
            reasons.append(f"full in {fc.describe(f.days_left)}")
    row["reason"] = "; ".join(reasons)
    return row


def _blank(pid: int, comm: str, exe: str, r: Resource) -> dict:
    row = {c: None for c in COLUMNS}
    row.update(pid=pid, comm=comm, exe=exe, resource=r.name, owner="", owners={},
               critical=False, leaking=False, reason="", estimate=False)
    return row


def rows(resources: list, pids: Optional[Iterable[int]] = None,
         reloads_per_day: Optional[float] = None, leak_per_reload: float = 1.0,
         progress=None, now: Optional[datetime] = None) -> list:
    """One row (a dict) per process and resource, every process by default (keytrace itself
    only when asked for); what survey() frames. The agent uses these: no pandas."""
    cache: dict = {}  # what one reading of the host shares (threads per uid, sysctls)
    now = now or datetime.now(timezone.utc)
    out = []
    for pid in (proc.pids() if pids is None else list(pids)):
        if pid == os.getpid() and pids is None:
            continue
        try:
            st = proc.stat(pid)
            comm, exe, kthread = st.comm, proc.exe(pid) or "", st.kernel_thread
        except (OSError, IndexError, ValueError):
            comm, exe, kthread = "", "", False
        for r in resources:
            if kthread:
                out.append(dict(_blank(pid, comm, exe, r), status=KERNEL_THREAD))
            else:
                out.append(census_row(pid, comm, exe, r, cache, reloads_per_day,
                                      leak_per_reload, now))
        tables.drop_process(cache, pid)  # (what its tables' reads shared)
        if progress:
            progress()
    return out


def read_tables(names="all", pids: Optional[Iterable[int]] = None,
                reloads_per_day: Optional[float] = None, leak_per_reload: float = 1.0,
                progress=None):
    """The tables named (a comma list, a list of names, or "all": every resource with a table
    to read) of every process, or of pids: survey() on the resources by name."""
    return survey(readable(names), pids, reloads_per_day, leak_per_reload, progress)


def readable(names) -> list:
    """The resources named, each one whose table keytrace can read; else a UsageError."""
    chosen = resource.select([names] if isinstance(names, str) else list(names))
    if names == "all" or names == ["all"]:
        return [r for r in chosen if r.census is not None]
    unread = [r.name for r in chosen if r.census is None]
    if unread:
        raise UsageError(f"{unread[0]} has no table keytrace can read: trace it with "
                         f"keytrace watch --resource {unread[0]}")
    return chosen


def survey(resources: list, pids: Optional[Iterable[int]] = None,
           reloads_per_day: Optional[float] = None, leak_per_reload: float = 1.0,
           progress=None, now: Optional[datetime] = None):
    """rows() as a DataFrame: critical and leaking first, then each resource in the order
    given, the fullest (least headroom for its limit) first."""
    import pandas as pd
    df = pd.DataFrame(rows(resources, pids, reloads_per_day, leak_per_reload, progress, now),
                      columns=COLUMNS)
    df["exhaustion_eta"] = pd.to_datetime(df["exhaustion_eta"], utc=True)
    for col in _COUNTS:
        df[col] = df[col].astype("Int64")
    for col in ("days_left", "per_day"):
        df[col] = df[col].astype("Float64")
    share = (df["headroom"].astype("Float64") / df["limit"].astype("Float64")).fillna(2.0)
    order = {name: i for i, name in enumerate(dict.fromkeys(df["resource"]))}
    df = df.assign(_ok=df["status"] == OK, _share=share, _r=df["resource"].map(order))
    df = df.sort_values(["_ok", "critical", "leaking", "_r", "_share", "in_use", "pid"],
                        ascending=[False, False, False, True, True, False, True],
                        ignore_index=True)
    return df.drop(columns=["_ok", "_share", "_r"])
