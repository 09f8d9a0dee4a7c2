"""keytrace scan: the live pthread key table of every process, with no tracing history.

The table is read by tracer.host.keytable; here every key in use gets its destructor named, and
the watch's rules are applied to what the table shows (tracer.analysis.verdicts.is_leaking):
orphaned keys, or many keys sharing one destructor (the signature of a library that leaks a key
per reload, even reloaded at the same address), or, with history (a saved watch ledger), a
leak measured per time for its executable. Every process gets a status: a kernel thread,
musl, a process that exits mid-scan and a permission refusal are each said, never zero keys.
"""
from __future__ import annotations

import os
from collections import Counter
from typing import Iterable, Optional

import pandas as pd

from ..host import keytable, proc
from ..state.modules import Module
from . import forecast as fc
from .attribution import Resolver
from .verdicts import SAME_PATH_KEYS, is_leaking

UNMAPPED = "(unmapped)"  # the library of destructors that lie in no mapping

OK = "ok"
COLUMNS = ["pid", "comm", "exe", "status", "libc", "keys_in_use", "limit", "headroom",
           "orphaned_keys", "same_destructor_keys", "library", "libraries", "destructors",
           "leak_per_reload", "reloads_per_day", "keys_per_day", "days_left", "exhaustion_eta",
           "leaking", "reason"]


def scan_pid(pid: int, host_libc: Optional[str] = None) -> dict:
    row = {c: None for c in COLUMNS}
    # Counts stay None until the table is read: never a zero that looks like an answer.
    row.update(pid=pid, comm="", exe="", library="", libraries={}, destructors={})
    try:
        row["comm"] = proc.stat(pid).comm
        row["exe"] = proc.exe(pid) or ""
    except (OSError, IndexError, ValueError):
        pass
    try:
        t = keytable.read(pid, host_libc)
    except keytable.Unreadable as u:
        row["status"] = str(u)
        return row
    row.update(status=OK, comm=t.comm, exe=t.exe, libc=t.libc, limit=t.limit,
               keys_in_use=len(t.keys), headroom=t.limit - len(t.keys), orphaned_keys=0,
               same_destructor_keys=0)
    _name_destructors(row, t)
    return row


def _name_destructors(row: dict, t: keytable.Table) -> None:
    """Resolve the destructors of the keys in use; one outside every mapping is orphaned."""
    with_destr = t.destructors[t.destructors != 0]
    if not len(with_destr):
        return
    row["orphaned_keys"] = int(t.unmapped().sum())
    row["same_destructor_keys"] = max(Counter(with_destr.tolist()).values())
    resolver = Resolver([Module(p, b, 0, 0, file=f) for p, b, f in t.modules])
    names, libs = Counter(), Counter()
    for addr, n in Counter(with_destr.tolist()).items():
        frame = resolver.frame(addr, 1, 0)
        names[str(frame) if frame.module else f"{addr:#x} {UNMAPPED}"] += n
        libs[frame.module.path if frame.module else UNMAPPED] += n
    row["destructors"] = dict(names.most_common())
    row["libraries"] = dict(libs.most_common())
    row["library"] = libs.most_common(1)[0][0]


def _reason(r, steady: Optional[float]) -> str:
    parts = []
    if r.status == OK and r.orphaned_keys:
        parts.append(f"{r.orphaned_keys} key{'' if r.orphaned_keys == 1 else 's'} orphaned: "
                     "destructor in no mapping")
    if r.status == OK and r.same_destructor_keys >= SAME_PATH_KEYS:
        top = next(iter(r.destructors), "")
        parts.append(f"{r.same_destructor_keys} keys share one destructor ({top}): a library "
                     "that leaks a key per load")
    if r.status == OK and steady:
        parts.append(f"keeps making keys: {steady:g} keys/s measured in the ledger")
    return "; ".join(parts)


def scan(pids: Optional[Iterable[int]] = None, reloads_per_day: Optional[float] = None,
         leak_per_reload: Optional[dict] = None, default_leak: float = 1.0,
         progress=None, keys_per_second: Optional[dict] = None) -> pd.DataFrame:
    """Scan processes (all by default) and return one row each, most keys in use first, judged
    by judge() (the arguments after pids are its own)."""
    targets = proc.pids() if pids is None else list(pids)
    host_libc = keytable.host_libc()
    rows = []
    for pid in targets:
        if pid == os.getpid():
            continue
        rows.append(scan_pid(pid, host_libc))
        if progress:
            progress()
    return judge(pd.DataFrame(rows, columns=COLUMNS), reloads_per_day, leak_per_reload,
                 default_leak, keys_per_second)


def judge(df: pd.DataFrame, reloads_per_day: Optional[float] = None,
          leak_per_reload: Optional[dict] = None, default_leak: float = 1.0,
          keys_per_second: Optional[dict] = None, now: Optional[pd.Timestamp] = None) -> pd.DataFrame:
    """The watch's rules on scanned rows, and a forecast for the leaking ones.

    With reloads_per_day, each process leaking by its table leaks per reload what
    leak_per_reload (measured in a saved ledger) says for its executable, else default_leak.
    keys_per_second (measured in a saved ledger) maps a pid to the keys a second a code path of
    that very process kept making outside reloads (the caller checks it is the same process, not
    a later one on the pid): it leaks whatever its table shows, and gets a date from that rate.
    Another process of the same executable is judged on its own table: a leaking script must not
    flag every python3 on the host. Rates not known are null, never 0.
    """
    now = pd.Timestamp.now(tz="UTC") if now is None else now
    ok = df["status"] == OK
    steady = [(keys_per_second or {}).get(pid) if good else None
              for pid, good in zip(df["pid"], ok)]
    by_table = ok & is_leaking(False, df["orphaned_keys"].fillna(0),
                               df["same_destructor_keys"].fillna(0))
    df["leaking"] = by_table | pd.Series([bool(x) for x in steady], index=df.index, dtype=bool)
    for (i, r), table, per_second in zip(df.iterrows(), by_table, steady):
        leak = ((leak_per_reload or {}).get(r.exe) or default_leak) if table else 0.0
        known = [leak * reloads_per_day] if reloads_per_day and table else []
        known += [per_second * 86_400] if per_second else []
        df.at[i, "leak_per_reload"] = leak
        df.at[i, "reloads_per_day"] = reloads_per_day
        df.at[i, "keys_per_day"] = sum(known) if known else None
        df.at[i, "reason"] = _reason(r, per_second)
        if r.leaking and known:
            f = fc.exhaustion(int(r.keys_in_use), int(r.limit), now, sum(known))
            df.at[i, "days_left"] = f.days_left
            df.at[i, "exhaustion_eta"] = f.exhaustion_eta
            df.at[i, "reason"] += f"; out of keys in {fc.describe(f.days_left)}"
    df["exhaustion_eta"] = pd.to_datetime(df["exhaustion_eta"], utc=True)
    for col in ("keys_in_use", "limit", "headroom", "orphaned_keys", "same_destructor_keys"):
        df[col] = df[col].astype("Int64")
    df["ok"] = df["status"] == OK
    df = df.sort_values(["ok", "keys_in_use", "pid"], ascending=[False, False, True],
                        ignore_index=True).drop(columns="ok")
    return df
