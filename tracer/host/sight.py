"""What the host shows of a running process when keytrace first meets it: who it is, the modules
it has mapped, and its live key table. Read once, turned into host facts by the tracker
(tracer.state.tracker.Tracker.facts), so that traced events are deltas on the table."""
from __future__ import annotations

from typing import Optional

from . import keytable, proc


def sight(pid: int, host_libc: Optional[str] = None, identity: bool = True) -> dict:
    """Keyword arguments for Tracker.facts: exe, start (with identity), modules, and the table:
    "read" with its keys in use, or "not read: why" (then keys made before now are unknown)."""
    out: dict = {}
    if identity:
        try:
            out["start"] = proc.stat(pid).start_ns
        except (OSError, IndexError, ValueError):
            pass
        out["exe"] = proc.exe(pid)
    try:
        t = keytable.read(pid, host_libc)
    except keytable.Unreadable as u:
        out["table"] = f"not read: {u}"
        out["modules"] = [(path, base) for path, base, _ in proc.modules(pid)]
        return out
    out["table"] = "read"
    out["modules"] = [(path, base) for path, base, _ in t.modules]
    out["keys"] = list(zip(t.keys.tolist(), t.destructors.tolist(), t.unmapped().tolist(),
                           (t.seqs & 0xFFFFFFFF).tolist()))
    return out
