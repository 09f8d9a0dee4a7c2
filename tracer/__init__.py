"""keytrace: find pthread key leaks with eBPF uprobes, into pandas.

    from tracer import KeyTracer, Ledger
"""
from .errors import KeytraceError
from .ledger import Ledger
from .session import KeyTracer

__all__ = ["KeyTracer", "Ledger", "KeytraceError"]
__version__ = "0.1.0"
