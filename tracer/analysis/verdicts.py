"""The rules: what makes a process leaking or critical, which library is responsible, and how
long is left. Written once, for every resource; the CLI, the Python API and the Jupyter views read
the frames built here, the agent the same rows as dicts (from snapshots of the tracker's
per-process state).

Rows speak of acquires, releases and handles in use; a resource that has words of its own
(pthread keys: creates, deletes, live_keys) names its columns with them, and keeps the generic
ones too (resource, acquires, releases, failed_acquires, in_use, orphaned, per_cycle).

pandas is imported by the functions that build frames only: the agent, which needs rows, never
loads it (about 40 MB resident).
"""
from __future__ import annotations

import errno
import os
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Optional

from .. import resource as resources
from ..resource import Resource
from ..state.samples import Samples
from ..state.tables import Table
from ..state.tracker import Tracker
from . import forecast as fc
from .attribution import SAME_PATH_KEYS, UNKNOWN, Attribution

NEAR_LIMIT = 0.8   # a table this full is shown as an emergency, whatever the rate
CRITICAL_HEADROOM = 0.1  # a table read with less than this share of its limit left is critical

# A summary row's fields, in order, generic: a resource with words of its own renames them.
FIELDS = [
    "pid", "start", "comm", "exe", "alive", "parent_pid", "traced_since", "table",
    "acquires", "releases", "failed_acquires", "failed_releases", "last_failure_ret",
    "in_use", "held", "never_released",
    "library", "libraries", "orphaned", "same_path", "busiest_path",
    "limit", "headroom", "per_cycle", "reload_cycles", "reloads_per_day", "per_second",
    "rate_basis", "per_day", "days_left", "exhaustion_eta", "leaking", "critical", "reason",
]
GENERIC = ["resource", "acquires", "releases", "failed_acquires", "in_use", "orphaned", "per_cycle"]
_FORECAST = ["pid", "comm", "in_use", "limit", "headroom", "per_cycle", "reload_cycles",
             "reloads_per_day", "per_second", "rate_basis", "per_day", "days_left",
             "exhaustion_eta", "leaking"]
_BRIEF = ["pid", "comm", "acquires", "releases", "failed_acquires", "in_use", "limit", "orphaned",
          "library", "days_left", "leaking", "critical", "reason"]
_LIBRARY = ["pid", "comm", "library", "acquired", "released", "in_use", "orphaned", "stack",
            "stack_note"]
_RELOAD = ["pid", "comm", "loaded", "cycles", "completed", "left", "left_per_cycle", "made_by",
           "finding"]
_NO_ATTRIBUTION = {"library": "", "libraries": {}}


def _named(r: Resource, fields: list) -> list:
    return [r.word(f) for f in fields]


# What a resource whose table is read, not traced, adds: what grows, and which limit binds.
SAMPLED = ["owner", "limit_source", "estimate"]


def summary_columns(r: Optional[Resource] = None) -> list:
    """The summary's columns, in order: the JSON contract of `watch --json` and `report
    --json`, for a resource (the first registered by default)."""
    r = r or resources.default()
    own = _named(r, FIELDS)
    return own + [c for c in GENERIC if c not in own] + ([] if r.traced else SAMPLED)


def forecast_columns(r: Optional[Resource] = None) -> list:
    return _named(r or resources.default(), _FORECAST)


def brief_columns(r: Optional[Resource] = None) -> list:
    return _named(r or resources.default(), _BRIEF)


def library_columns(r: Optional[Resource] = None) -> list:
    return _named(r or resources.default(), _LIBRARY)


def reload_columns(r: Optional[Resource] = None) -> list:
    return _named(r or resources.default(), _RELOAD)


SUMMARY_COLUMNS = summary_columns()
FORECAST_COLUMNS = forecast_columns()
BRIEF_COLUMNS = brief_columns()
LIBRARY_COLUMNS = library_columns()
RELOAD_COLUMNS = reload_columns()
_TIMES = ("start", "traced_since")  # ns since the epoch in rows; datetimes in frames
_EMPTY = Table()
_NO_SAMPLES = Samples()

if TYPE_CHECKING:
    import pandas as pd


def _errname(code: int) -> str:
    return errno.errorcode.get(code, str(code))


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _ts(ns: Optional[int]) -> Optional[datetime]:
    return datetime.fromtimestamp(ns / 1e9, tz=timezone.utc) if ns is not None else None


def is_leaking(critical, orphaned, same_path):
    """The verdict, for a summary row or a scan row alike (scalars or pandas columns): an
    acquire failed, handles are orphaned, or one code path keeps making handles that stay live
    (on SAME_PATH_KEYS separate occasions; in a scan, that many keys share a destructor)."""
    return critical | (orphaned > 0) | (same_path >= SAME_PATH_KEYS)


def _state(p, r: Resource, now_ns: int, reloads_per_day: Optional[float], attribute: bool,
           prefer_measured: bool, symbols: bool = True) -> dict:
    """A process's row for one resource, in generic fields."""
    t = p.tables.get(r.name) or _EMPTY
    unknown = (t.read or "").startswith("not read")  # handles made before tracing: not known
    row = {
        "pid": p.pid, "start": p.start, "comm": p.comm, "exe": p.exe or "",
        "alive": p.exited is None, "parent_pid": p.parent[0] if p.parent else 0,
        "traced_since": p.traced_since, "table": t.read or "", "resource": r.name,
        "acquires": t.acquires + t.missed[0] + t.missed[1], "releases": t.releases + t.missed[2],
        "failed_acquires": t.failed_acquires + t.missed[1],
        "failed_releases": t.failed_releases + t.missed[3], "last_failure_ret": t.last_failure_ret,
        "in_use": t.live_count, "held": t.held_count,
    }
    row["never_released"] = row["acquires"] - row["failed_acquires"] > 0 and row["releases"] == 0
    attr = Attribution(p, r, without_elf=not attribute, symbols=symbols).summary()
    if not attribute:
        attr.update(_NO_ATTRIBUTION)
    rates = _rates(attr, (p.exited or now_ns) - p.traced_since, reloads_per_day, prefer_measured, r)
    critical = row["failed_acquires"] > 0
    leaking = bool(is_leaking(critical, attr["orphaned"], attr["same_path"]))
    limit = r.limit_of(p) if r.limit_of else r.limit
    # No date without a leak, none without a limit; a failed acquire dates the exhaustion.
    f = fc.exhaustion(t.live_count, limit, _ts(now_ns), rates["per_day"] if leaking else None,
                      _ts(t.first_failure) if critical else None) if limit else None
    row.update(library=attr["library"], libraries=attr["libraries"], orphaned=attr["orphaned"],
               same_path=attr["same_path"], busiest_path=attr["busiest_path"], limit=limit,
               headroom=None if unknown or f is None else f.headroom,
               per_cycle=attr["per_cycle"], reload_cycles=attr["reload_cycles"], **rates,
               days_left=None if f is None or (unknown and not critical) else f.days_left,
               exhaustion_eta=(None if f is None or (unknown and not critical)
                               else f.exhaustion_eta),
               leaking=leaking, critical=critical)
    row["reason"] = _reason(row, r, attr["busiest"], t.missed[0])
    return row


def _sampled(p, r: Resource, now_ns: int, given: Optional[float],
             prefer_measured: bool) -> dict:
    """A process's row for a resource whose table is read at each completed reload cycle, not
    traced: in use as last read, what each cycle leaves (from the first read after the first
    cycle: a first load's lazily made handles are no leak), the owner that grew, the library
    reloaded. Leaking: it grew by at least MIN_CYCLES handles over MIN_CYCLES cycles or more,
    and the typical step between reads grew too (not one jump)."""
    s = p.samples.get(r.name) or _NO_SAMPLES
    first, last = s.first, s.last
    ph = s.compared()  # what a cycle leaves: reads of one phase compared
    base, then = ph.base, ph.last
    row = {
        "pid": p.pid, "start": p.start, "comm": p.comm, "exe": p.exe or "",
        "alive": p.exited is None, "parent_pid": p.parent[0] if p.parent else 0,
        "traced_since": p.traced_since, "table": s.status or "not read: not yet", "resource": r.name,
        "acquires": None, "releases": None, "failed_acquires": None, "failed_releases": None,
        "last_failure_ret": 0, "in_use": last.in_use if last else None,
        "held": first.in_use if first else None, "never_released": False, "orphaned": None,
        "same_path": 0, "busiest_path": "", "limit": last.limit if last else None,
        "headroom": last.headroom if last else None, "limit_source": last.source if last else "",
    }
    cycles = then.cycles - base.cycles if base else 0
    grown = then.in_use - base.in_use if cycles else 0
    per_cycle = grown / cycles if cycles else 0.0
    steps = sorted(d / c for c, d in ph.steps)
    typical = steps[len(steps) // 2] if steps else 0.0
    leaking = cycles >= fc.MIN_CYCLES and grown >= fc.MIN_CYCLES and typical > 0
    growth = {o: n - base.owners.get(o, 0) for o, n in then.owners.items()} if cycles else {}
    owner = max(growth, key=growth.get, default="") if grown > 0 else \
        (max(last.owners, key=last.owners.get, default="") if last else "")
    by_path = p.modules.cycles_by_path()
    most = max(by_path.values(), default=0)
    reloaded = sorted(path for path, n in by_path.items() if n == most)
    near = bool(last and last.limit and is_critical(last.headroom, last.limit))
    orphaned = last.orphaned if last else 0
    critical = near or bool(r.orphan_critical and orphaned)
    reload = fc.reload_rate(given, most, base.ts if base else None, then.ts if then else None,
                            (p.exited or now_ns) - p.traced_since, prefer_measured)
    per_day = per_cycle * reload.per_day if leaking and reload.per_day else None
    f = fc.exhaustion(last.limit - last.headroom, last.limit, _ts(now_ns), per_day) \
        if last and last.limit else None
    row.update(library=reloaded[0] if reloaded else "",
               libraries={path: by_path[path] for path in reloaded}, owner=owner,
               per_cycle=round(per_cycle, 3), reload_cycles=most,
               reloads_per_day=reload.per_day, per_second=None,
               rate_basis=reload.basis if given or most else
               "nothing to measure: no completed reload cycle",
               per_day=per_day, days_left=f.days_left if f and leaking else None,
               exhaustion_eta=f.exhaustion_eta if f and leaking else None,
               leaking=leaking or critical or bool(orphaned), critical=critical,
               orphaned=orphaned if last else None, estimate=r.estimate)
    row["reason"] = _sampled_reason(row, r, cycles, grown, growth.get(owner, 0), reloaded,
                                    near)
    return row


def orphan_reason(r: Resource, n: int, orphans: Optional[dict] = None) -> str:
    """"2 handlers orphaned: left behind by ... (libfoo.so (fork))": shared by scan and watch."""
    whose = f" ({', '.join(sorted(orphans))})" if orphans else ""
    return f"{n} {r.word('unit' if n == 1 else 'units')} orphaned: {r.word('orphaned_why')}{whose}"


def _sampled_reason(row: dict, r: Resource, cycles: int, grown: int, by_owner: int,
                    reloaded: list, near: bool) -> str:
    units = r.word("units")
    parts = []
    if near:
        most = "at most " if r.estimate else ""  # (in use is a lower bound)
        parts.append(f"{most}{row['headroom']} of {row['limit']} {units} left "
                     f"({row['limit_source']})")
    if row["orphaned"]:
        parts.append(orphan_reason(r, row["orphaned"]))
    if row["table"].startswith("not read"):
        parts.append(f"table {row['table']}")
    if row["leaking"] and cycles:
        lib = os.path.basename(reloaded[0]) + (f" and {len(reloaded) - 1} more reloaded with it"
                                               if len(reloaded) > 1 else "")
        owner = f", {by_owner} of them {row['owner']}" if row["owner"] and by_owner > 0 else ""
        parts.append(f"{grown} more {units} over {cycles} completed reload cycles of {lib}: "
                     f"{row['per_cycle']:g} a cycle{owner}")
        if row["days_left"] is not None and row["days_left"] > 0:
            parts.append(f"out of {units} in {fc.describe(row['days_left'])}")
        elif row["days_left"] is None:
            parts.append(f"no date: {row['rate_basis']}")
    return "; ".join(parts)


def _rates(attr: dict, observed: int, given: Optional[float], prefer_measured: bool,
           r: Resource) -> dict:
    """The rate fields of a row, None when unknown: handles a day are what the reload cycles
    leave at the reload rate plus what the code paths that keep making them outside reloads
    make (a second, over the observed time); rate_basis says how each was had, or why not."""
    reload = fc.reload_rate(given, attr["reload_cycles"], attr["cycles_first"],
                            attr["cycles_last"], observed, prefer_measured)
    steady = fc.steady_rate(attr["steady_keys"], attr["steady_occasions"], attr["steady_first"],
                            attr["steady_last"], observed, (r.word("unit"), r.word("units"))
                            ) if attr["steady_occasions"] else None
    per_time = steady.per_day if steady else None
    per_reload = None if reload.per_day is None else attr["per_cycle"] * reload.per_day
    known = [x for x in (per_reload, per_time) if x is not None]
    bases = [reload.basis] if given or attr["reload_cycles"] else []
    bases += [steady.basis] if steady else []
    nothing = ("nothing to measure: no completed reload cycle, no code path that keeps making "
               f"{r.word('units')}")
    return {"reloads_per_day": reload.per_day,
            "per_second": None if per_time is None else per_time / 86_400,
            "rate_basis": "; ".join(bases) or nothing,
            "per_day": sum(known) if known else None}


def _reason(row: dict, r: Resource, busiest: int, lost: int) -> str:
    unit = r.word("unit")
    parts = []
    if row["critical"]:
        call = r.word("acquire_call")
        full = f": {r.word('full')}" if row["last_failure_ret"] == errno.EAGAIN else ""
        parts.append(f"{call} failed {row['failed_acquires']}x "
                     f"({_errname(row['last_failure_ret'])}{full})")
    if row["orphaned"]:
        lib = f" (made by {os.path.basename(row['library'])})" if row["library"] else ""
        parts.append(f"{_plural(row['orphaned'], unit)} orphaned: the library instance that "
                     f"made them is unmapped{lib}")
    if row["same_path"] >= SAME_PATH_KEYS:
        parts.append(f"{_plural(busiest, unit)} live from one code path, made on "
                     f"{row['same_path']} separate occasions ({row['busiest_path']})")
    if row["leaking"]:
        if row["days_left"] is not None and row["days_left"] > 0:
            parts.append(f"out of {r.word('units')} in {fc.describe(row['days_left'])}")
        elif row["limit"] is None:
            parts.append("no date: no limit is known (--limit)")
        elif row["days_left"] is None and not row["table"].startswith("not read"):
            parts.append(f"no date: {row['rate_basis']}" if row["per_day"] is None else
                         f"no date: no {unit} a day measured ({row['rate_basis']})")
    if row["table"].startswith("not read"):
        parts.append(f"{r.word('units')} made before tracing are not counted "
                     f"(table {row['table']})")
    if lost:
        parts.append(f"{_plural(lost, r.word('acquire_word'))} not "
                     f"recorded (the kernel could not queue the records): counted, library "
                     f"\"{UNKNOWN}\"")
    return "; ".join(parts)


def _words(r: Resource, row: dict) -> dict:
    """A generic row in the resource's words, generic fields kept beside them."""
    out = {(k if k in SAMPLED else r.word(k)): v for k, v in row.items()}
    for k in GENERIC:
        out.setdefault(k, row[k])
    return out


def rows(procs, now_ns: int, reloads_per_day: Optional[float] = None,
         attribute: bool = True, prefer_measured: bool = False,
         resource: Optional[Resource] = None, symbols: bool = True) -> list:
    """The per-process summary of a resource (the first registered by default) as dicts
    (summary_columns; start and traced_since in ns since the epoch), judged, sorted: critical,
    leaking, most in use. prefer_measured: a given reloads_per_day is an assumption that a
    trusted measure replaces (the agent), not the user's what-if that wins (watch, report).
    symbols: False names code paths by module and offset (the agent: no symbol table held)."""
    r = resource or resources.default()
    if r.traced:
        out = [_state(p, r, now_ns, reloads_per_day, attribute, prefer_measured, symbols)
               for p in procs]
    else:  # its table is read at each cycle: rows for the processes read
        out = [_sampled(p, r, now_ns, reloads_per_day, prefer_measured) for p in procs
               if r.name in p.samples]
    out.sort(key=lambda x: (not x["critical"], not x["leaking"], -(x["in_use"] or 0), x["pid"]))
    return [_words(r, x) for x in out]


def recall(row: dict, saved: dict, now_ns: int, given: Optional[float] = None,
           resource: Optional[Resource] = None) -> dict:
    """A row (of rows()) of a process measured before, saved (the agent's state, across its
    restarts): the very process keeps what was measured then. Its library, when none is known
    now, and its leak per reload cycle at the rate measured then (or given), which dates it
    when nothing dates it now."""
    r = resource or resources.default()
    per_cycle = r.word("per_cycle")
    out = dict(row)
    if not str(out["library"]).startswith("/"):  # no module path known now
        out["library"] = saved["library"]
    rate = saved["reloads_per_day"] or given
    if (out["leaking"] and out["days_left"] is None and out["limit"] and rate
            and saved.get(per_cycle, 0) > 0):
        f = fc.forecast(out[r.word("in_use")], out["limit"], _ts(now_ns), saved[per_cycle], rate)
        out.update({per_cycle: saved[per_cycle], "per_cycle": saved[per_cycle],
                    "reloads_per_day": rate, "days_left": f.days_left,
                    "exhaustion_eta": f.exhaustion_eta})
    return out


def summarize(procs, now_ns: int, reloads_per_day: Optional[float] = None,
              attribute: bool = True, resource: Optional[Resource] = None) -> "pd.DataFrame":
    """The per-process summary frame, judged, sorted: critical, leaking, most in use."""
    import pandas as pd
    r = resource or resources.default()
    df = pd.DataFrame(rows(procs, now_ns, reloads_per_day, attribute, resource=r),
                      columns=summary_columns(r))
    for col in _TIMES:
        df[col] = pd.to_datetime(df[col], unit="ns", utc=True)
    df["exhaustion_eta"] = pd.to_datetime(df["exhaustion_eta"], utc=True)
    df[r.word("headroom")] = df[r.word("headroom")].astype("Int64")
    if not r.traced:  # counts a read gives; the call counts it has none of stay null
        for col in ("in_use", "held", "limit", "acquires", "releases", "failed_acquires",
                    "failed_releases", "orphaned"):
            df[col] = df[col].astype("Int64")
    return df.astype({"leaking": bool, "critical": bool, "alive": bool,
                      r.word("never_released"): bool})


def by_library(procs, resource: Optional[Resource] = None) -> "pd.DataFrame":
    import pandas as pd
    r = resource or resources.default()
    out = []
    for p in procs:
        for row in Attribution(p, r).libraries():
            out.append({r.word(k): v for k, v in {"pid": p.pid, "comm": p.comm, **row}.items()})
    return (pd.DataFrame(out, columns=library_columns(r))
            .sort_values([r.word("in_use"), "pid"], ascending=[False, True], ignore_index=True))


def reloads(procs, resource: Optional[Resource] = None) -> "pd.DataFrame":
    import pandas as pd
    r = resource or resources.default()
    out = []
    for p in procs:
        for row in Attribution(p, r).reloads():
            out.append({r.word(k): v for k, v in {"pid": p.pid, "comm": p.comm, **row}.items()})
    return pd.DataFrame(out, columns=reload_columns(r))


def flagged(summary: "pd.DataFrame") -> "pd.DataFrame":
    """The processes a --fail-on-leak gate fails on."""
    return summary[summary["leaking"]]


def is_critical(headroom, limit) -> bool:
    """A table read now has next to nothing left: the next acquires fail."""
    return headroom <= CRITICAL_HEADROOM * limit


def near_limit(keys_in_use, limit) -> bool:
    return keys_in_use >= NEAR_LIMIT * limit


def in_use_over_time(events: "pd.DataFrame", resource: Optional[Resource] = None) -> "pd.DataFrame":
    """Handles of a resource in use per process after each acquire and release: the events
    replayed through the same state machines as the ledger (exec empties a table, fork copies
    it). Columns: ts, pid, comm, and in use in the resource's words (live_keys)."""
    import pandas as pd
    r = resource or resources.default()
    t = Tracker(keep_events=False, record_levels=True)
    t.ingest(events)
    df = pd.DataFrame([(ts, pid, comm, n) for ts, pid, comm, res, n in t.levels if res == r.name],
                      columns=["ts", "pid", "comm", r.word("in_use")])
    df["ts"] = pd.to_datetime(df["ts"], unit="ns", utc=True)
    return df
