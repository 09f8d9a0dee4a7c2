"""keytrace scan: the live pthread key table of every process, with no tracing history.

The table is read by tracer.host.keytable; here every key in use gets its destructor named, and
the same forecast the watch uses is applied. Every process gets a status: a kernel thread, musl,
a process that exits mid-scan and a permission refusal are each said, never reported as zero keys.
"""
from __future__ import annotations

import os
from collections import Counter
from typing import Iterable, Optional

import numpy as np
import pandas as pd

from ..host import keytable, proc
from ..state.modules import Module
from . import forecast as fc
from .attribution import UNKNOWN, Resolver

OK = "ok"
COLUMNS = ["pid", "comm", "exe", "status", "libc", "keys_in_use", "limit", "headroom",
           "orphaned_keys", "library", "libraries", "destructors", "leak_per_reload",
           "reloads_per_day", "days_left", "exhaustion_eta"]


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
               keys_in_use=len(t.keys), headroom=t.limit - len(t.keys), orphaned_keys=0)
    _name_destructors(row, t)
    return row


def _name_destructors(row: dict, t: keytable.Table) -> None:
    """Resolve the destructors of the keys in use; one outside every mapping is orphaned."""
    with_destr = t.destructors[t.destructors != 0]
    if not len(with_destr):
        return
    starts = np.array([m[0] for m in t.maps], dtype=np.uint64)
    ends = np.array([m[1] for m in t.maps], dtype=np.uint64)
    i = np.searchsorted(starts, with_destr, side="right") - 1
    mapped = (i >= 0) & (with_destr < ends[np.maximum(i, 0)])
    row["orphaned_keys"] = int((~mapped).sum())
    resolver = Resolver([Module(p, b, 0, 0, file=f) for p, b, f in t.modules])
    names, libs = Counter(), Counter()
    for addr, n in Counter(with_destr.tolist()).items():
        frame = resolver.frame(addr, 1, 0)
        names[str(frame) if frame.module else f"{addr:#x} (unmapped)"] += n
        libs[frame.module.path if frame.module else UNKNOWN] += n
    row["destructors"] = dict(names.most_common())
    row["libraries"] = dict(libs.most_common())
    row["library"] = libs.most_common(1)[0][0]


def scan(pids: Optional[Iterable[int]] = None, reloads_per_day: Optional[float] = None,
         leak_per_reload: Optional[dict] = None, default_leak: float = 1.0,
         progress=None) -> pd.DataFrame:
    """Scan processes (all by default) and return one row each, most keys in use first.

    With reloads_per_day, each process that shows a leak gets a forecast: leak_per_reload
    maps an executable path to keys per reload (from a saved ledger); otherwise a process with
    orphaned keys is taken to leak default_leak keys per reload.
    """
    targets = proc.pids() if pids is None else list(pids)
    host_libc = keytable.host_libc()
    rows = []
    for pid in targets:
        if pid == os.getpid():
            continue
        rows.append(scan_pid(pid, host_libc))
        if progress:
            progress()
    df = pd.DataFrame(rows, columns=COLUMNS)
    now = pd.Timestamp.now(tz="UTC")
    for i, r in df.iterrows():
        leak = (leak_per_reload or {}).get(r.exe)
        if leak is None and r.status == OK and r.orphaned_keys:
            leak = default_leak
        df.at[i, "leak_per_reload"] = leak or 0.0
        df.at[i, "reloads_per_day"] = reloads_per_day or 0.0
        if r.status == OK and reloads_per_day and leak:
            f = fc.forecast(int(r.keys_in_use), int(r.limit), now, leak, reloads_per_day)
            df.at[i, "days_left"] = f.days_left
            df.at[i, "exhaustion_eta"] = f.exhaustion_eta
    df["exhaustion_eta"] = pd.to_datetime(df["exhaustion_eta"], utc=True)
    for col in ("keys_in_use", "limit", "headroom", "orphaned_keys"):
        df[col] = df[col].astype("Int64")
    df["ok"] = df["status"] == OK
    df = df.sort_values(["ok", "keys_in_use", "pid"], ascending=[False, False, True],
                        ignore_index=True).drop(columns="ok")
    return df
