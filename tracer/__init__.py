"""keytrace: find pthread key leaks with eBPF uprobes, into pandas.

    from tracer import KeyTracer, Ledger, scan
"""
from .errors import KeytraceError
from .ledger import Ledger
from .scan import scan
from .session import KeyTracer

__all__ = ["KeyTracer", "Ledger", "KeytraceError", "scan"]
__version__ = "0.1.0"
