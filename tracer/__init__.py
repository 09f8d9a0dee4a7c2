"""keytrace: find pthread key leaks with eBPF uprobes, into pandas.

    from tracer import KeyTracer, Ledger, scan

Layers, imports pointing down only:
    errors, wire          the record and op codes, defined once
    host/, bpf/           /proc, ELF files, C libraries, key tables; probe units, ring, headers
    store/                ledger and table files
    state/                processes, modules, keys: the state machines, and the tracker
    analysis/             attribution, forecast, verdicts, scan, the Ledger's queries
    session               KeyTracer: probes in, a live Ledger out
    cli/, jupyter         front-ends
"""
from .analysis.ledger import Ledger
from .analysis.scan import scan
from .errors import KeytraceError
from .session import KeyTracer

__all__ = ["KeyTracer", "Ledger", "KeytraceError", "scan"]
__version__ = "0.2.0"
