"""The probe units of probes/ as Python sees them: which functions each one probes, with which
programs. Tracepoints need no entry here (bcc attaches them when it compiles)."""
from .loader import Unit

MODULES = Unit("modules", {"dlopen": ("dlopen_enter", "dlopen_return"),
                           "dlclose": ("dlclose_enter", None)})
KEYS = Unit("keys", {"pthread_key_create": ("create_enter", "create_return"),
                     "pthread_key_delete": ("delete_enter", "delete_return")},
            variants={"musl": {"create_return": "create_return_musl"}})
LIFECYCLE = Unit("lifecycle")  # included last: its exit handler frees the others' thread state

# What the key tracer compiles, in order.
KEY_TRACER = [MODULES, KEYS, LIFECYCLE]


def functions(units) -> list[str]:
    return sorted({f for u in units for f in u.uprobes})


def watch_unmaps(program, pid: int, bases) -> None:
    """Tell the modules unit the load bases a process had mapped before tracing (its own dlopen
    reports only the ones it loads): their munmap is then seen too, as an unmap record."""
    table = program.bpf[b"modules"]
    for base in bases:
        key = table.Key()
        key.pid, key.base = pid, base
        table[key] = table.Leaf(1)


def read_counts(program) -> dict:
    """The keys unit's per-process counts: {pid: (creates, failed creates, deletes, failed
    deletes)}, exact whatever records were lost."""
    return {int(k.value): (v.creates, v.failed_creates, v.deletes, v.failed_deletes)
            for k, v in program.bpf[b"counts"].items()}
