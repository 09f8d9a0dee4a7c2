"""The one exception type front-ends turn into a single line on stderr and a non-zero exit."""


class KeytraceError(Exception):
    """A failure the user can act on; the message says what and, where known, how to fix it."""


class UsageError(KeytraceError):
    """A mistake in what was asked (a pattern, an option): the command line's exit status 2."""
