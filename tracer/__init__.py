"""keytrace: find pthread key leaks with eBPF uprobes, into pandas.

    from tracer import KeyTracer, Ledger, scan, read_tables, CallTracer

Layers, imports pointing down only:
    errors, wire          the record and op codes, defined once
    host/, bpf/           /proc, ELF files, C libraries, key tables; probe units, ring, headers
    store/                ledger and table files
    state/                processes, modules, keys: the state machines, and the tracker
    analysis/             attribution, forecast, verdicts, scan, census, the Ledger's queries
    session, calls        KeyTracer: probes in, a live Ledger out; CallTracer: any library call
    cli/, jupyter         front-ends
"""
from importlib import import_module

from . import resources as _resources  # noqa: F401  (registers the resources keytrace knows)

__all__ = ["CallTracer", "KeyTracer", "Ledger", "KeytraceError", "scan", "read_tables"]
__version__ = "0.2.0"

# Imported on first use, so that `import tracer.<module>` loads no more than that module needs
# (the agent decides what pandas may load before pandas is imported).
_EXPORTS = {"CallTracer": ".calls", "KeyTracer": ".session", "Ledger": ".analysis.ledger", "KeytraceError": ".errors",
            "scan": ".analysis.scan", "read_tables": ".analysis.census"}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module 'tracer' has no attribute {name!r}")
