"""The resources keytrace knows: each one module, one declaration (tracer.resource.Resource),
registered by importing it here. Adding a resource is a module and a line below."""
from . import keys  # noqa: F401  (registers pthread keys, the first resource)
from . import timers  # noqa: F401  (POSIX timers)
from . import fds  # noqa: F401  (file descriptors: read only)
from . import threads  # noqa: F401  (threads: read only)
from . import maps  # noqa: F401  (memory mappings: read only)
from . import handlers  # noqa: F401  (fork and exit handlers: read only)
from . import tls  # noqa: F401  (static TLS: read only)
