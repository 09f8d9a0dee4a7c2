"""What the host shows of a running process when keytrace first meets it: who it is, the modules
it has mapped, and each resource's table as its reader finds it. Read once, turned into host
facts by the tracker (tracer.state.tracker.Tracker.fact_records), so that traced events are
deltas on the tables."""
from __future__ import annotations

from typing import Callable, Optional

from . import proc


def sight(pid: int, readers: dict, host_libc: Optional[str] = None,
          identity: bool = True) -> dict:
    """Keyword arguments for Tracker.fact_records: exe, start, ppid (with identity), modules, and
    tables: resource name -> (status: "read", or "not read: why", [handles in use]). readers:
    resource name -> reader(pid, host_libc) -> (status, handles, the modules it read the table
    with, or None)."""
    out: dict = {}
    if identity:
        try:
            st = proc.stat(pid)
            out["start"], out["ppid"] = st.start_ns, st.ppid
        except (OSError, IndexError, ValueError):
            pass
        out["exe"] = proc.exe(pid)
    modules = None
    tables = {}
    for name, reader in readers.items():
        status, handles, seen = reader(pid, host_libc)
        tables[name] = (status, handles)
        modules = modules if modules is not None else seen
    if modules is None:
        modules = [(path, base) for path, base, _ in proc.modules(pid)]
    out["modules"] = modules
    out["tables"] = tables
    return out


Reader = Callable[[int, Optional[str]], tuple]
