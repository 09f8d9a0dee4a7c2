"""pthread keys, the first resource: pthread_key_create acquires a key (written through its
first argument), pthread_key_delete releases it, the destructor is its owner. glibc allows 1024
per process, musl 128. The live table is glibc's __pthread_keys, read through /proc/PID/mem
(tracer.host.keytable); the probes are probes/keys.bpf.c, on sites the planner proves where it
can (tracer.host.planner)."""
from __future__ import annotations

from typing import Optional

from .. import resource
from ..bpf.loader import Unit
from ..host import keytable, libc


def read_table(pid: int, host_libc: Optional[str] = None) -> tuple:
    """(status, [(key, destructor, destructor unmapped, seq)], modules read with the table)."""
    try:
        t = keytable.read(pid, host_libc)
    except keytable.Unreadable as u:
        return f"not read: {u}", [], None
    handles = list(zip(t.keys.tolist(), t.destructors.tolist(), t.unmapped().tolist(),
                       (t.seqs & 0xFFFFFFFF).tolist()))
    return "read", handles, [(path, base) for path, base, _ in t.modules]


def limit_of(p) -> int:
    """PTHREAD_KEYS_MAX of the process's C library."""
    return libc.MUSL_KEYS_MAX if p.libc == "musl" else libc.key_limit(p.modules.paths + [p.exe or ""])


# The probe unit: entry and return programs, and musl's return variant (its create reports
# failure differently).
UNIT = Unit("keys", {"pthread_key_create": ("create_enter", "create_return"),
                     "pthread_key_delete": ("delete_enter", "delete_return")},
            variants={"musl": {"create_return": "create_return_musl"}})

KEYS = resource.register(resource.Resource(
    name="keys", acquire=("pthread_key_create",), release=("pthread_key_delete",),
    handle="*arg0", release_handle="arg0", success="zero", owner="arg1",
    limit_of=limit_of, inherit_on_fork=True, keep_on_exec=False, reader=read_table,
    words={"acquires": "creates", "releases": "deletes", "failed_acquires": "failed_creates",
           "failed_releases": "failed_deletes", "in_use": "live_keys", "held": "held_keys",
           "never_released": "never_deleted", "orphaned": "orphaned_keys",
           "same_path": "same_path_keys", "per_cycle": "leak_per_reload",
           "per_second": "keys_per_second", "per_day": "keys_per_day",
           "acquired": "created", "released": "deleted", "left": "keys_left",
           "left_per_cycle": "keys_per_cycle",
           "acquire_call": "pthread_key_create", "acquire_word": "create", "unit": "key",
           "units": "keys", "full": "key table full", "owner": "destructor"},
    extra={"unit": UNIT}))
