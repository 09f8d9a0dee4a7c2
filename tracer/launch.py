"""Launching a command to trace, for every tracer: it waits at a gate until the probes are
attached (so its first instruction is traced), becomes the command by exec (keeping its pid, already
in the kernel's filter), gets a parent-death signal through setpriv, and ends with its whole tree.
"""
from __future__ import annotations

import ctypes
import functools
import os
import shutil
import signal
import subprocess
import time
from typing import Optional, Sequence

from .bpf.loader import Program
from .errors import KeytraceError
from .host import proc

# The launched command waits on fd 3 until the probes are attached, then becomes the command
# (exec keeps the pid, which is already in the kernel's filter). Through setpriv it gets a
# parent-death signal, so a killed keytrace leaves no launched command running.
_GATE = 'read -r _ <&3 || exit 127; exec 3<&-; exec {pdeath}"$@"'


@functools.lru_cache(maxsize=1)
def _gate_script() -> str:
    setpriv = shutil.which("setpriv")
    try:
        ok = setpriv and "--pdeathsig" in subprocess.run([setpriv, "--help"], capture_output=True,
                                                         text=True, timeout=5).stdout
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    return _GATE.format(pdeath=f"{setpriv} --pdeathsig TERM -- " if ok else "")


class Launched:
    """The launched command: a child process we wait for (Popen's interface, the parts used)."""

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode: Optional[int] = None

    def poll(self) -> Optional[int]:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: Optional[float] = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(str(self.pid), timeout)
            time.sleep(0.01)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def gate_execs() -> int:
    """The execs from the gate to the command itself: the gate's, and setpriv's if used."""
    return 2 if "setpriv" in _gate_script() else 1


def spawn_gated(argv: Sequence[str], stdout_to_stderr: bool = False) -> tuple:
    """Start argv held at a gate: (Launched, the gate's write end). It runs once "go" is
    written there; closing the write end unwritten makes it exit 127 instead. stdout_to_stderr:
    its standard output goes to our standard error (ours then holds only what we print)."""
    path = shutil.which(argv[0])
    if path is None:
        raise KeytraceError(f"command not found: {argv[0]}")
    r, w = os.pipe()
    try:
        # posix_spawn puts the gate's read end on fd 3 and nothing else of ours is inherited.
        actions = [(os.POSIX_SPAWN_DUP2, r, 3)] + ([(os.POSIX_SPAWN_DUP2, 2, 1)]
                                                   if stdout_to_stderr else [])
        # A process group of its own, unless keytrace runs in the foreground of a terminal (the
        # shell made its job a group of its own; the command keeps reading the terminal and
        # getting Ctrl-C and Ctrl-Z with keytrace). A server run in the foreground, such as
        # Apache, signals its whole group when it stops: never a CI script's or a test runner's.
        own = {} if _foreground() else {"setpgroup": 0}
        pid = os.posix_spawn("/bin/sh", ["/bin/sh", "-c", _gate_script(), "keytrace-gate", path, *argv[1:]],
                             os.environ, file_actions=actions, **own)
    finally:
        os.close(r)
    return Launched(pid), w


def _foreground() -> bool:
    try:
        return os.isatty(0) and os.tcgetpgrp(0) == os.getpgrp()
    except OSError:
        return False


def open_gate(gate: int) -> None:
    """Let a gated command run; KeytraceError when it is gone already (killed while waiting)."""
    try:
        os.write(gate, b"go\n")
    except BrokenPipeError:
        raise KeytraceError("the command ended before it could start (was it killed?)") from None


def end_command(p: Optional[Launched], program: Optional[Program] = None,
                grace: float = 5.0) -> None:
    """End a launched command and every process of its tree still running: the kernel keeps the
    tree (Program.launched_pids), so daemons that double-forked out of the command's process
    group go too. SIGTERM first, SIGKILL to what is left after grace seconds. Those orphaned on
    the way (a server's worker that outlived its master) are ours to reap: keytrace is their
    subreaper meanwhile, and only meanwhile (an embedding process's other orphans stay
    init's), so none is left a zombie for init to reap later."""
    if p is None:
        return

    def left() -> set:
        pids = set()
        if program is not None and program.bpf is not None:
            pids = {q for q in program.launched_pids() if proc.alive(q)}
        if p.poll() is None:
            pids.add(p.pid)
        pids.discard(os.getpid())
        return pids

    ours = _children()  # before: what this process had forked itself (not for us to reap)
    _subreaper(True)
    try:
        termed: set = set()
        deadline = time.monotonic() + grace
        while True:
            pids = left()
            if not pids:
                # every orphan the tree left us, a zombie now: those TERMed, and those that died
                # between two looks (never seen alive, so never in termed)
                _reap((termed | (_children() - ours)) - {p.pid})
                return
            late = time.monotonic() >= deadline
            for q in pids - (set() if late else termed):  # a fork made meanwhile gets TERM too
                try:
                    os.kill(q, signal.SIGKILL if late else signal.SIGTERM)
                except ProcessLookupError:
                    pass
            termed |= pids
            if late and time.monotonic() >= deadline + grace:
                return  # not even SIGKILL ended them (uninterruptible sleep): nothing more to do
            time.sleep(0.02)
    finally:
        _subreaper(False)


def _reap(pids: set) -> None:
    """Reap the tree's processes that were orphaned to us, and only those: a child this
    process had before end_command began is someone else's to wait for."""
    for q in pids:
        try:
            os.waitpid(q, os.WNOHANG)
        except ChildProcessError:  # not ours (reaped by its own parent, or gone)
            pass


def _children() -> set:
    """This process's children now, zombies included (/proc/self/task/*/children)."""
    out: set = set()
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return out
    for t in tasks:
        try:
            with open(f"/proc/self/task/{t}/children") as fh:
                out |= {int(x) for x in fh.read().split()}
        except (OSError, ValueError):
            continue
    return out


PR_SET_CHILD_SUBREAPER = 36


def _subreaper(on: bool) -> None:
    """While on, orphans of our descendants come to us, not to init."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0)


def drain_failure(e: BaseException) -> BaseException:
    """What a drain thread's failure tells the user: one line (its traceback is no use to an
    SRE); the tracer stops and detaches on its way out (wait() and check() raise it)."""
    if isinstance(e, KeytraceError):
        return e
    return KeytraceError(f"tracing stopped: reading the probes' records failed "
                         f"({type(e).__name__}: {e})")
