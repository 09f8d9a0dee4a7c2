"""The probe units of probes/ as Python sees them: which functions each one probes, with which
programs. Tracepoints need no entry here (bcc attaches them when it compiles)."""
from .loader import Unit

MODULES = Unit("modules", {"dlopen": ("dlopen_enter", "dlopen_return"),
                           "dlclose": ("dlclose_enter", None)})
KEYS = Unit("keys", {"pthread_key_create": ("create_enter", "create_return"),
                     "pthread_key_delete": ("delete_enter", "delete_return")})
LIFECYCLE = Unit("lifecycle")  # included last: its exit handler frees the others' thread state

# What the key tracer compiles, in order.
KEY_TRACER = [MODULES, KEYS, LIFECYCLE]


def functions(units) -> list[str]:
    return sorted({f for u in units for f in u.uprobes})
