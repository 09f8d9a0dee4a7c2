"""keytrace scan: read the live pthread key table of every process, with no tracing history.

For each process: find the file that holds `__pthread_keys` (libc.so.6; libpthread.so.0 before
glibc 2.34; the executable itself when static), take its layout from glibc's own `_thread_db_*`
descriptors (tracer.keytable), read the table through /proc/PID/mem, and name the destructor of
every key in use. Every process gets a status: a kernel thread, musl, a process that exits
mid-scan and a permission refusal are each said, never reported as zero keys.
"""
from __future__ import annotations

import errno
import os
from collections import Counter
from typing import Iterable, Optional

import numpy as np
import pandas as pd

from . import forecast as fc
from . import keytable, procmaps
from .attribution import UNKNOWN, Resolver
from .ledger import Module, Process
from .symbols import CANDIDATE, system_libraries

OK = "ok"
PF_KTHREAD = 0x00200000
COLUMNS = ["pid", "comm", "exe", "status", "libc", "keys_in_use", "limit", "headroom",
           "orphaned_keys", "library", "libraries", "destructors", "leak_per_reload",
           "reloads_per_day", "days_left", "exhaustion_eta"]


class _Skip(Exception):
    """A process that cannot be read, with the status to report instead."""


def _status_of(e: OSError) -> str:
    if isinstance(e, (FileNotFoundError, ProcessLookupError)) or e.errno == errno.ESRCH:
        return "exited"
    if isinstance(e, PermissionError):
        return "permission denied"
    return f"unreadable: {e.strerror or e}"


def _is_kernel_thread(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return bool(int(fields[6]) & PF_KTHREAD)  # field 9 of stat: flags


def _holder(pid: int, mods: list, exe: str, host_libc: Optional[str]):
    """(path as seen by the process, load bias, layout) of the key table's file."""
    # The C library files first (cheap to check), then the executable (static programs).
    ordered = sorted(mods, key=lambda m: (not CANDIDATE.search(m[0]), m[0] != exe))
    why = "no module defines __pthread_keys"
    for path, base, opened in ordered:
        if not CANDIDATE.search(path) and path != exe:
            continue
        lay, how = keytable.layout(opened, fallback=host_libc)
        if lay is not None:
            return path, base, lay
        if how != "no __pthread_keys":
            why = f"{os.path.basename(path)}: {how}"
    raise _Skip(f"unsupported: {why}")


def scan_pid(pid: int, host_libc: Optional[str] = None) -> dict:
    row = {c: None for c in COLUMNS}
    # Counts stay None until the table is read: never a zero that looks like an answer.
    row.update(pid=pid, comm="", exe="", library="", libraries={}, destructors={})
    try:
        with open(f"/proc/{pid}/comm") as fh:
            row["comm"] = fh.read().strip()
        if _is_kernel_thread(pid):
            raise _Skip("kernel thread")
        row["exe"] = os.readlink(f"/proc/{pid}/exe")
        maps = procmaps.mappings(pid)
        mods = procmaps.modules(pid)
        if any(fc.is_musl(p) for p, _, _ in mods):
            raise _Skip("unsupported: musl libc keeps no key table that can be read")
        path, base, lay = _holder(pid, mods, row["exe"], host_libc)
        with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
            mem.seek(base + lay.table)
            data = mem.read(lay.count * lay.stride)
        if len(data) != lay.count * lay.stride:
            raise _Skip("unreadable: short read of the key table")
    except _Skip as s:
        row["status"] = str(s)
        return row
    except OSError as e:
        row["status"] = _status_of(e)
        return row
    row.update(status=OK, libc=path, limit=lay.count, orphaned_keys=0)
    table = np.frombuffer(data, dtype=np.dtype({
        "names": ["seq", "destr"], "formats": [f"<u{lay.seq[1]}", f"<u{lay.destr[1]}"],
        "offsets": [lay.seq[0], lay.destr[0]], "itemsize": lay.stride}))
    in_use = (table["seq"] & 1) == 1  # glibc: odd sequence number = key in use
    row["keys_in_use"] = int(in_use.sum())
    row["headroom"] = lay.count - row["keys_in_use"]
    _name_destructors(row, pid, maps, mods, table["destr"][in_use])
    return row


def _name_destructors(row: dict, pid: int, maps: list, mods: list, destr: np.ndarray) -> None:
    """Resolve the destructors of the keys in use; one outside every mapping is orphaned."""
    with_destr = destr[destr != 0]
    if not len(with_destr):
        return
    starts = np.array([m[0] for m in maps], dtype=np.uint64)
    ends = np.array([m[1] for m in maps], dtype=np.uint64)
    i = np.searchsorted(starts, with_destr, side="right") - 1
    mapped = (i >= 0) & (with_destr < ends[np.maximum(i, 0)])
    row["orphaned_keys"] = int((~mapped).sum())
    proc = Process(pid=pid, start=0, comm=row["comm"], exe=row["exe"],
                   modules=[Module(p, b, 0, 0, file=f) for p, b, f in mods])
    resolver = Resolver(proc)
    names, libs = Counter(), Counter()
    for addr, n in Counter(with_destr.tolist()).items():
        frame = resolver.frame(addr, 1, 0)
        names[str(frame) if frame.module else f"{addr:#x} (unmapped)"] += n
        libs[frame.module.path if frame.module else UNKNOWN] += n
    row["destructors"] = dict(names.most_common())
    row["libraries"] = dict(libs.most_common())
    row["library"] = libs.most_common(1)[0][0]


def _host_libc() -> Optional[str]:
    for path in system_libraries():
        if keytable.layout(path)[0] is not None:
            return path
    return None


def scan(pids: Optional[Iterable[int]] = None, reloads_per_day: Optional[float] = None,
         leak_per_reload: Optional[dict] = None, default_leak: float = 1.0,
         progress=None) -> pd.DataFrame:
    """Scan processes (all by default) and return one row each, most keys in use first.

    With reloads_per_day, each process that shows a leak gets a forecast: leak_per_reload
    maps an executable path to keys per reload (from a saved ledger); otherwise a process with
    orphaned keys is taken to leak default_leak keys per reload.
    """
    targets = sorted(int(d) for d in os.listdir("/proc") if d.isdigit()) if pids is None else list(pids)
    host_libc = _host_libc()
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
