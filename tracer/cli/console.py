"""What every command prints through: stdout and stderr consoles, one-line errors, exit codes."""
from __future__ import annotations

import signal
import sys

import typer
from rich.console import Console

from ..errors import KeytraceError, UsageError

EXIT_ERROR, EXIT_USAGE, EXIT_LEAK = 1, 2, 3

# Piped output gets a width that fits the verdicts instead of rich's default 80 columns.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 160)


def fail(message: str, code: int = EXIT_ERROR) -> "typer.Exit":
    err.print(f"keytrace: error: {message}", markup=False, soft_wrap=True)
    return typer.Exit(code)


def failure(e: KeytraceError) -> "typer.Exit":
    """A KeytraceError as one line: exit 2 for a mistake in what was asked, else 1."""
    return fail(str(e), EXIT_USAGE if isinstance(e, UsageError) else EXIT_ERROR)


def command_status(returncode, why: str) -> int:
    """What keytrace exits with for a launched command: its own status when it ended by itself
    and failed (128 + N when signal N killed it, as a shell says), else 0. A command keytrace
    ended (--duration, Ctrl-C, SIGTERM) gives keytrace's own status instead; so does one that
    Ctrl-C ended (on a terminal, it shares keytrace's process group and gets the SIGINT too)."""
    if why != "exited" or not returncode or returncode == -signal.SIGINT:
        return 0
    return 128 - returncode if returncode < 0 else returncode


def note(text: str) -> None:
    err.print(f"keytrace: {text}", markup=False, soft_wrap=True)


# Options shared by several commands (typer reads these as declarations, so one serves all).
RELOADS_PER_DAY = typer.Option(
    None, "--reloads-per-day", min=0, help="Reload cycles per day for the forecast (default: "
    "measured from the traced dlopens). Apache's daily graceful restart: 1.")
