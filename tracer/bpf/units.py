"""The probe units of probes/ as Python sees them: which functions each one probes, with which
programs. Tracepoints need no entry here (bcc attaches them when it compiles)."""
from .. import wire
from .loader import Unit

MODULES = Unit("modules", {"dlopen": ("dlopen_enter", "dlopen_return"),
                           "dlclose": ("dlclose_enter", None)})
LIFECYCLE = Unit("lifecycle")  # included last: its exit handler frees the others' thread state


def tracer_units(resource_units) -> list:
    """What a resource tracer compiles, in order: modules, the resources' own units, lifecycle."""
    return [MODULES, *resource_units, LIFECYCLE]


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
    """The kernel's counts per process image and resource: {(pid, resource name): (acquires,
    failed acquires, releases, failed releases)}, exact whatever records were lost."""
    return {(int(k.tgid), wire.resource_name(int(k.res))):
            (v.acquires, v.failed_acquires, v.releases, v.failed_releases)
            for k, v in program.bpf[b"counts"].items()}
