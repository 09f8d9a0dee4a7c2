"""The rules: what makes a process leaking or critical, which library is responsible, and how
long is left. Written once; the CLI, the Python API and the Jupyter views read the frames built
here, the agent the same rows as dicts (from snapshots of the tracker's per-process state).

pandas is imported by the functions that build frames only: the agent, which needs rows, never
loads it (about 40 MB resident).
"""
from __future__ import annotations

import errno
import os
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Optional

from ..host import libc
from ..state.tracker import Tracker
from . import forecast as fc
from .attribution import SAME_PATH_KEYS, UNKNOWN, Attribution

NEAR_LIMIT = 0.8   # a table this full is shown as an emergency, whatever the rate
NOTHING_TO_MEASURE = ("nothing to measure: no completed reload cycle, no code path that keeps "
                      "making keys")

# The summary's columns, in order: the JSON contract of `watch --json` and `report --json`.
SUMMARY_COLUMNS = [
    "pid", "start", "comm", "exe", "alive", "parent_pid", "traced_since", "table",
    "creates", "deletes", "failed_creates", "failed_deletes", "last_failure_ret",
    "live_keys", "held_keys", "never_deleted",
    "library", "libraries", "orphaned_keys", "same_path_keys", "busiest_path",
    "limit", "headroom", "leak_per_reload", "reload_cycles", "reloads_per_day", "keys_per_second",
    "rate_basis", "keys_per_day", "days_left", "exhaustion_eta", "leaking", "critical", "reason",
]
FORECAST_COLUMNS = ["pid", "comm", "live_keys", "limit", "headroom", "leak_per_reload",
                    "reload_cycles", "reloads_per_day", "keys_per_second", "rate_basis",
                    "keys_per_day", "days_left", "exhaustion_eta", "leaking"]
BRIEF_COLUMNS = ["pid", "comm", "creates", "deletes", "failed_creates", "live_keys", "limit",
                 "orphaned_keys", "library", "days_left", "leaking", "critical", "reason"]
LIBRARY_COLUMNS = ["pid", "comm", "library", "created", "deleted", "live_keys", "orphaned_keys",
                   "stack", "stack_note"]
RELOAD_COLUMNS = ["pid", "comm", "loaded", "cycles", "completed", "keys_left", "keys_per_cycle",
                  "made_by", "finding"]
_NO_ATTRIBUTION = {"library": "", "libraries": {}}
_TIMES = ("start", "traced_since")  # ns since the epoch in rows; datetimes in frames

if TYPE_CHECKING:
    import pandas as pd


def _errname(code: int) -> str:
    return errno.errorcode.get(code, str(code))


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _ts(ns: Optional[int]) -> Optional[datetime]:
    return datetime.fromtimestamp(ns / 1e9, tz=timezone.utc) if ns is not None else None


def is_leaking(critical, orphaned_keys, same_path_keys):
    """The verdict, for a summary row or a scan row alike (scalars or pandas columns):
    a create failed, keys are orphaned, or one code path keeps making keys that stay live
    (on SAME_PATH_KEYS separate occasions; in a scan, that many keys share a destructor)."""
    return critical | (orphaned_keys > 0) | (same_path_keys >= SAME_PATH_KEYS)


def _state(p, now_ns: int, reloads_per_day: Optional[float], attribute: bool,
           prefer_measured: bool) -> dict:
    k = p.keys
    unknown = (p.table or "").startswith("not read")  # keys made before tracing: not known
    row = {
        "pid": p.pid, "start": p.start, "comm": p.comm, "exe": p.exe or "",
        "alive": p.exited is None, "parent_pid": p.parent[0] if p.parent else 0,
        "traced_since": p.traced_since,
        "table": p.table or "",
        "creates": k.creates + k.missed[0] + k.missed[1], "deletes": k.deletes + k.missed[2],
        "failed_creates": k.failed_creates + k.missed[1],
        "failed_deletes": k.failed_deletes + k.missed[3], "last_failure_ret": k.last_failure_ret,
        "live_keys": k.live_count, "held_keys": k.held_count,
    }
    row["never_deleted"] = row["creates"] - row["failed_creates"] > 0 and row["deletes"] == 0
    attr = Attribution(p, without_elf=not attribute).summary()
    if not attribute:
        attr.update(_NO_ATTRIBUTION)
    rates = _rates(attr, (p.exited or now_ns) - p.traced_since, reloads_per_day, prefer_measured)
    critical = row["failed_creates"] > 0
    leaking = bool(is_leaking(critical, attr["orphaned_keys"], attr["same_path_keys"]))
    limit = libc.MUSL_KEYS_MAX if p.libc == "musl" else libc.key_limit(p.modules.paths + [row["exe"]])
    # No date without a leak; a failed create dates the exhaustion itself.
    f = fc.exhaustion(k.live_count, limit, _ts(now_ns), rates["keys_per_day"] if leaking else None,
                      _ts(k.first_failure) if critical else None)
    row.update(library=attr["library"], libraries=attr["libraries"],
               orphaned_keys=attr["orphaned_keys"], same_path_keys=attr["same_path_keys"],
               busiest_path=attr["busiest_path"], limit=limit,
               headroom=None if unknown else f.headroom,
               leak_per_reload=attr["leak_per_reload"], reload_cycles=attr["reload_cycles"],
               **rates,
               days_left=None if unknown and not critical else f.days_left,
               exhaustion_eta=None if unknown and not critical else f.exhaustion_eta,
               leaking=leaking, critical=critical)
    row["reason"] = _reason(row, attr["busiest_keys"], k.missed[0])
    return row


def _rates(attr: dict, observed: int, given: Optional[float], prefer_measured: bool) -> dict:
    """The rate fields of a row, None when unknown: keys a day are what the reload cycles
    leave at the reload rate plus what the code paths that keep making keys outside reloads
    make (keys a second, over the observed time); rate_basis says how each was had, or why not."""
    reload = fc.reload_rate(given, attr["reload_cycles"], attr["cycles_first"],
                            attr["cycles_last"], observed, prefer_measured)
    steady = fc.steady_rate(attr["steady_keys"], attr["steady_occasions"], attr["steady_first"],
                            attr["steady_last"], observed) if attr["steady_occasions"] else None
    per_time = steady.per_day if steady else None
    per_reload = None if reload.per_day is None else attr["leak_per_reload"] * reload.per_day
    known = [x for x in (per_reload, per_time) if x is not None]
    bases = [reload.basis] if given or attr["reload_cycles"] else []
    bases += [steady.basis] if steady else []
    return {"reloads_per_day": reload.per_day,
            "keys_per_second": None if per_time is None else per_time / 86_400,
            "rate_basis": "; ".join(bases) or NOTHING_TO_MEASURE,
            "keys_per_day": sum(known) if known else None}


def _reason(r: dict, busiest_keys: int, lost_creates: int) -> str:
    parts = []
    if r["critical"]:
        parts.append(f"pthread_key_create failed {r['failed_creates']}x "
                     f"({_errname(r['last_failure_ret'])}"
                     + (": key table full" if r["last_failure_ret"] == errno.EAGAIN else "") + ")")
    if r["orphaned_keys"]:
        lib = f" (made by {os.path.basename(r['library'])})" if r["library"] else ""
        parts.append(f"{_plural(r['orphaned_keys'], 'key')} orphaned: the library instance that "
                     f"made them is unmapped{lib}")
    if r["same_path_keys"] >= SAME_PATH_KEYS:
        parts.append(f"{_plural(busiest_keys, 'key')} live from one code path, made on "
                     f"{r['same_path_keys']} separate occasions ({r['busiest_path']})")
    if r["leaking"]:
        if r["days_left"] is not None and r["days_left"] > 0:
            parts.append(f"out of keys in {fc.describe(r['days_left'])}")
        elif r["days_left"] is None and not r["table"].startswith("not read"):
            parts.append(f"no date: {r['rate_basis']}" if r["keys_per_day"] is None else
                         f"no date: no key a day measured ({r['rate_basis']})")
    if r["table"].startswith("not read"):
        parts.append(f"keys made before tracing are not counted (table {r['table']})")
    if lost_creates:
        parts.append(f"{_plural(lost_creates, 'create')} not recorded (the kernel could not queue "
                     f"the records): counted, library \"{UNKNOWN}\"")
    return "; ".join(parts)


def rows(procs, now_ns: int, reloads_per_day: Optional[float] = None,
         attribute: bool = True, prefer_measured: bool = False) -> list:
    """The per-process summary as dicts (SUMMARY_COLUMNS; start and traced_since in ns since
    the epoch), judged, sorted: critical, leaking, most keys. prefer_measured: a given
    reloads_per_day is an assumption that a trusted measure replaces (the agent), not the
    user's what-if that wins (watch, report)."""
    out = [_state(p, now_ns, reloads_per_day, attribute, prefer_measured) for p in procs]
    return sorted(out, key=lambda r: (not r["critical"], not r["leaking"], -r["live_keys"], r["pid"]))


def summarize(procs, now_ns: int, reloads_per_day: Optional[float] = None,
              attribute: bool = True) -> "pd.DataFrame":
    """The per-process summary frame, judged, sorted: critical, leaking, most keys."""
    import pandas as pd
    df = pd.DataFrame(rows(procs, now_ns, reloads_per_day, attribute), columns=SUMMARY_COLUMNS)
    for col in _TIMES:
        df[col] = pd.to_datetime(df[col], unit="ns", utc=True)
    df["exhaustion_eta"] = pd.to_datetime(df["exhaustion_eta"], utc=True)
    df["headroom"] = df["headroom"].astype("Int64")
    return df.astype({"leaking": bool, "critical": bool, "alive": bool, "never_deleted": bool})


def by_library(procs) -> "pd.DataFrame":
    import pandas as pd
    out = []
    for p in procs:
        a = Attribution(p)
        for row in a.libraries():
            out.append({"pid": p.pid, "comm": p.comm, **row})
    return (pd.DataFrame(out, columns=LIBRARY_COLUMNS)
            .sort_values(["live_keys", "pid"], ascending=[False, True], ignore_index=True))


def reloads(procs) -> "pd.DataFrame":
    import pandas as pd
    out = []
    for p in procs:
        for row in Attribution(p).reloads():
            out.append({"pid": p.pid, "comm": p.comm, **row})
    return pd.DataFrame(out, columns=RELOAD_COLUMNS)


def flagged(summary: "pd.DataFrame") -> "pd.DataFrame":
    """The processes a --fail-on-leak gate fails on."""
    return summary[summary["leaking"]]


def near_limit(keys_in_use, limit) -> bool:
    return keys_in_use >= NEAR_LIMIT * limit


def keys_over_time(events: "pd.DataFrame") -> "pd.DataFrame":
    """Keys in use per process after each create and delete: the events replayed through the
    same state machines as the ledger (exec empties a table, fork copies it)."""
    import pandas as pd
    t = Tracker(keep_events=False, record_levels=True)
    t.ingest(events)
    df = pd.DataFrame(t.levels, columns=["ts", "pid", "comm", "live_keys"])
    df["ts"] = pd.to_datetime(df["ts"], unit="ns", utc=True)
    return df
