"""The rules: what makes a process leaking or critical, which library is responsible, and how
long is left. Written once; the CLI, the Python API and the Jupyter views all read the frames
built here (from snapshots of the tracker's per-process state).
"""
from __future__ import annotations

import errno
import os
from typing import Optional

import pandas as pd

from ..host import libc
from ..state.tracker import Tracker
from . import forecast as fc
from .attribution import Attribution

NEAR_LIMIT = 0.8  # a table this full is shown as an emergency, whatever the rate

# The summary's columns, in order: the JSON contract of `watch --json` and `report --json`.
SUMMARY_COLUMNS = [
    "pid", "start", "comm", "exe", "alive", "parent_pid",
    "creates", "deletes", "failed_creates", "failed_deletes", "last_failure_ret",
    "live_keys", "keys_after_dlclose",
    "library", "libraries", "orphaned_keys",
    "limit", "headroom", "leak_per_reload", "reloads_per_day", "keys_per_day", "days_left",
    "exhaustion_eta", "leaking", "critical", "reason",
]
FORECAST_COLUMNS = ["pid", "comm", "live_keys", "limit", "headroom", "leak_per_reload",
                    "reloads_per_day", "keys_per_day", "days_left", "exhaustion_eta", "leaking"]
BRIEF_COLUMNS = ["pid", "comm", "creates", "deletes", "failed_creates", "live_keys", "limit",
                 "orphaned_keys", "library", "days_left", "leaking", "critical", "reason"]
LIBRARY_COLUMNS = ["pid", "comm", "library", "created", "deleted", "live_keys", "orphaned_keys",
                   "stack", "stack_note"]
RELOAD_COLUMNS = ["pid", "comm", "loaded", "cycles", "keys_left", "keys_per_cycle", "made_by",
                  "finding"]


def _errname(code: int) -> str:
    return errno.errorcode.get(code, str(code))


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _state(p, now: pd.Timestamp, reloads_per_day: Optional[float], attribute: bool) -> dict:
    k = p.keys
    row = {
        "pid": p.pid, "start": pd.Timestamp(p.start, unit="ns", tz="UTC"), "comm": p.comm,
        "exe": p.exe or "", "alive": p.exited is None, "parent_pid": p.parent[0] if p.parent else 0,
        "creates": k.creates, "deletes": k.deletes, "failed_creates": k.failed_creates,
        "failed_deletes": k.failed_deletes, "last_failure_ret": k.last_failure_ret,
        "live_keys": len(k.live),
        "keys_after_dlclose": sum(1 for site in k.live.values() if site.load in p.modules.unloaded),
    }
    attr = (Attribution(p).summary() if attribute else
            {"library": "", "libraries": {}, "orphaned_keys": 0, "leak_per_reload": 0.0,
             "reload_cycles": 0, "reload_span_ns": 0})
    rate = reloads_per_day or fc.measured_reloads_per_day(attr["reload_cycles"], attr["reload_span_ns"])
    f = fc.forecast(row["live_keys"], libc.key_limit(p.modules.paths + [row["exe"]]),
                    now, attr["leak_per_reload"], rate)
    row.update(library=attr["library"], libraries=attr["libraries"],
               orphaned_keys=attr["orphaned_keys"], limit=f.limit, headroom=f.headroom,
               leak_per_reload=attr["leak_per_reload"], reloads_per_day=rate or 0.0,
               keys_per_day=f.keys_per_day, days_left=f.days_left, exhaustion_eta=f.exhaustion_eta)
    return row


def summarize(procs, now_ns: int, reloads_per_day: Optional[float] = None,
              attribute: bool = True) -> pd.DataFrame:
    """The per-process summary frame, judged."""
    now = pd.Timestamp(now_ns, unit="ns", tz="UTC")
    rows = [_state(p, now, reloads_per_day, attribute) for p in procs]
    df = pd.DataFrame(rows, columns=SUMMARY_COLUMNS[:-3])
    df["exhaustion_eta"] = pd.to_datetime(df["exhaustion_eta"], utc=True)
    return judge(df)


def judge(df: pd.DataFrame) -> pd.DataFrame:
    """Add the verdict columns, and sort: critical, leaking, most keys.

    - critical: a pthread_key_create failed (EAGAIN: the key table is full). A failure is
      never counted as a leak of its own (no key was made), but it is the outage itself.
    - leaking: keys were created and none deleted; or keys outlived the dlclose of the library
      whose load made them; or keys are orphaned (their maker's instance is unmapped, so glibc
      holds a dangling destructor); or the process is critical.
    """
    df = df.copy()
    made = df["creates"] - df["failed_creates"]
    never_deleted = (made > 0) & (df["deletes"] == 0)
    df["critical"] = df["failed_creates"] > 0
    df["leaking"] = (never_deleted | (df["keys_after_dlclose"] > 0) | (df["orphaned_keys"] > 0)
                     | df["critical"])
    reasons = []
    for r, nd, n_made in zip(df.itertuples(), never_deleted, made):
        parts = []
        if r.critical:
            parts.append(f"pthread_key_create failed {r.failed_creates}x ({_errname(r.last_failure_ret)}"
                         + (": key table full" if r.last_failure_ret == errno.EAGAIN else "") + ")")
        if nd:
            parts.append(f"created {_plural(n_made, 'key')}, deleted none")
        if r.orphaned_keys:
            lib = f" (made by {os.path.basename(r.library)})" if r.library else ""
            parts.append(f"{_plural(r.orphaned_keys, 'key')} orphaned: the library instance that "
                         f"made them is unmapped{lib}")
        elif r.keys_after_dlclose:
            parts.append(f"{_plural(r.keys_after_dlclose, 'key')} outlived dlclose of the library "
                         "that created them")
        if r.leaking and r.days_left is not None and r.days_left > 0:
            parts.append(f"out of keys in {fc.describe(r.days_left)}")
        reasons.append("; ".join(parts))
    df["reason"] = pd.Series(reasons, index=df.index, dtype=object)
    df = df.astype({"leaking": bool, "critical": bool, "alive": bool})[SUMMARY_COLUMNS]
    return df.sort_values(["critical", "leaking", "live_keys", "pid"],
                          ascending=[False, False, False, True], ignore_index=True)


def by_library(procs) -> pd.DataFrame:
    rows = []
    for p in procs:
        a = Attribution(p)
        for row in a.libraries():
            rows.append({"pid": p.pid, "comm": p.comm, **row})
    return (pd.DataFrame(rows, columns=LIBRARY_COLUMNS)
            .sort_values(["live_keys", "pid"], ascending=[False, True], ignore_index=True))


def reloads(procs) -> pd.DataFrame:
    rows = []
    for p in procs:
        for row in Attribution(p).reloads():
            rows.append({"pid": p.pid, "comm": p.comm, **{k: v for k, v in row.items()
                                                          if k not in ("first_load", "last_load")}})
    return pd.DataFrame(rows, columns=RELOAD_COLUMNS)


def flagged(summary: pd.DataFrame) -> pd.DataFrame:
    """The processes a --fail-on-leak gate fails on."""
    return summary[summary["leaking"]]


def near_limit(keys_in_use, limit) -> bool:
    return keys_in_use >= NEAR_LIMIT * limit


def keys_over_time(events: pd.DataFrame) -> pd.DataFrame:
    """Keys in use per process after each create and delete: the events replayed through the
    same state machines as the ledger (exec empties a table, fork copies it)."""
    t = Tracker(keep_events=False, record_levels=True)
    t.ingest(events)
    df = pd.DataFrame(t.levels, columns=["ts", "pid", "comm", "live_keys"])
    df["ts"] = pd.to_datetime(df["ts"], unit="ns", utc=True)
    return df
