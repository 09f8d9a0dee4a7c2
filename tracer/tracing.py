"""The one life cycle of every tracer (KeyTracer, CallTracer): start, wait, stop, the with-block.

    start()  checks what was asked (pids that exist, a command that is found) before anything
             needs privileges; spawns a launched command held at its gate; lets the subclass
             compile and attach (_open); tells the kernel the command's tree; opens the gate;
             starts the drain thread. A failure on the way stops everything it started.
    wait()   until the launched command exits, every pid has exited, a duration passes or an
             event is set: "exited", "duration" or "stopped". A drain failure is raised here.
    stop()   ends the launched command's whole tree, stops the thread, drains once more (unless
             the drain failed: it is not tried again), detaches every probe. Idempotent; also at
             interpreter exit and on leaving a with-block.
    check()  raises what stopped the drain thread, once it has.
"""
from __future__ import annotations

import atexit
import os
import shutil
import threading
import time
from typing import Callable, Iterable, Optional, Sequence

from .bpf import doctor
from .bpf.loader import Program
from .errors import KeytraceError, UsageError
from .host import proc
from .launch import Launched, drain_failure, end_command, gate_execs, open_gate, spawn_gated

SITES = ("planned", "entry")


def check_sites(sites: str) -> str:
    """The one check of a --sites / sites= value, for the command line and the API alike."""
    if sites not in SITES:
        raise UsageError(f"sites (--sites) is planned or entry, not {sites!r}")
    return sites


class Tracing:
    """A tracer's life cycle. Subclasses implement _open(filter_pids) (compile and attach,
    setting self._program), poll(final) and, if they keep something at the end, _finish().

    pids: trace these running processes (and their children); command: launch this argv and
    trace it with its children; neither: the whole host. on_note(text) gets each line worth
    telling while tracing (also kept in notes). from_exec: a launched command is traced from its
    own exec on (its gate's work is not the command's); else from its gate."""

    thread_name = "keytrace-drain"
    from_exec = False

    def __init__(self, pids: Optional[Iterable[int]] = None,
                 command: Optional[Sequence[str]] = None, interval: float = 0.01,
                 on_note: Optional[Callable[[str], None]] = None, quiet_stdout: bool = False):
        self.pids = None if pids is None else sorted({int(p) for p in pids})
        self.command = list(command) if command else None
        if self.pids and self.command:
            raise UsageError("pids (-p) and a command (after --) exclude each other: trace "
                             "running processes, or launch one")
        self.interval = interval
        self.on_note = on_note
        self.notes: list[str] = []
        self.process: Optional[Launched] = None
        self.quiet_stdout = quiet_stdout  # the command's stdout to our stderr (JSON on ours)
        self._program: Optional[Program] = None
        self._closing: Optional[Program] = None  # stopped, its probes still detaching
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._error: Optional[BaseException] = None
        self._told = False  # the drain's error reached the caller (check, wait or stop)
        self._started = False

    # -- what subclasses provide ------------------------------------------------------------------
    def _prepare(self, exe: Optional[str]) -> None:
        """What can be worked out before privileges are checked (patterns, say)."""

    def _open(self, filter_pids: Optional[list]) -> None:
        raise NotImplementedError

    def _ready(self) -> None:
        """After attaching, before the launched command runs."""

    def poll(self, final: bool = False) -> int:
        raise NotImplementedError

    def _finish(self) -> None:
        """At stop, probes still attached, after the last drain: read what the kernel kept."""

    # -- the life cycle ---------------------------------------------------------------------------
    def start(self, background: bool = True):
        if self._started:
            raise KeytraceError("this tracer is already started")
        for pid in self.pids or ():  # what was asked comes first: no privilege needed to say so
            if not proc.exists(pid):
                raise KeytraceError(f"no process with pid {pid}")
        exe = None
        if self.command:
            exe = shutil.which(self.command[0])
            if exe is None:
                raise KeytraceError(f"command not found: {self.command[0]}")
        self._prepare(exe)
        doctor.require_tracing()
        self._started = True
        gate = None
        try:
            # the children the pids have already are theirs too (those they make, the probes add)
            filter_pids = proc.with_descendants(self.pids) if self.pids else self.pids
            if self.command:
                self.process, gate = spawn_gated(self.command, self.quiet_stdout)
                # traced from its gate (in the filter from the start), or from its exec on
                filter_pids = (self.pids or []) + ([] if self.from_exec else [self.process.pid])
            atexit.register(self.stop)
            self._open(filter_pids)
            if self.process is not None:
                if self.from_exec:
                    self._program.add_pid(self.process.pid, after_execs=gate_execs())
                self._program.launch(self.process.pid)
            self._ready()
            if gate is not None:
                open_gate(gate)
        except BaseException:
            self.stop()
            raise
        finally:
            if gate is not None:
                os.close(gate)  # unread, it makes the gate exit 127 instead of running
        if background:
            self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.interval):
                self.poll()
        except BaseException as e:  # surfaced by wait() and check(), never lost in the thread
            self._error = drain_failure(e)

    def wait(self, duration: Optional[float] = None, stop: Optional[threading.Event] = None,
             tick: Optional[Callable[[], None]] = None) -> str:
        """Block until the launched command exits (or, tracing pids, all of them have exited),
        duration passes, or stop is set: "exited", "duration" or "stopped". tick is called
        about 4 times a second."""
        deadline = None if duration is None else time.monotonic() + duration
        while True:
            self.check()
            if self.process is not None and self.process.poll() is not None:
                return "exited"
            if self.process is None and self.pids and not any(map(proc.alive, self.pids)):
                return "exited"
            if deadline is not None and time.monotonic() >= deadline:
                return "duration"
            if stop is not None and stop.is_set():
                return "stopped"
            if tick:
                tick()
            left = 0.25 if deadline is None else max(0.0, min(0.25, deadline - time.monotonic()))
            if stop is not None:
                stop.wait(left)
            else:
                time.sleep(left)

    def stop(self, wait: bool = True) -> None:
        """End the launched command's tree, drain, detach every probe. Idempotent.
        wait=False: the probes' detach (the kernel's grace periods) goes on in the background
        while the caller reports; a later stop() waits for it, as does the process's exit."""
        # The command ends first, while the probes still see its exits.
        end_command(self.process, self._program)
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None
        try:
            if self._program is not None and self._program.bpf is not None:
                if self._error is None:  # a drain that failed is not tried again
                    self.poll(final=True)
                self._finish()
        except Exception as e:
            raise drain_failure(e) from None
        finally:
            if self._program is not None:
                self._closing, self._program = self._program, None
            if self._closing is not None:
                closing = self._closing
                if wait:
                    self._closing = None
                closing.close(wait=wait)
            atexit.unregister(self.stop)
        self.check()  # a drain that failed unseen (no wait, no check) is not lost at the stop

    def check(self) -> None:
        """Raise what stopped the background drain, if anything did, once."""
        if self._error is not None and not self._told:
            self._told = True
            raise self._error

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _note(self, text: str) -> None:
        self.notes.append(text)
        if self.on_note:
            self.on_note(text)

    # -- facts for front-ends -----------------------------------------------------------------
    @property
    def attached(self) -> int:
        return self._program.attached if self._program is not None else 0

    @property
    def files(self) -> list:
        return list(self._program.files) if self._program is not None else []

    @property
    def returncode(self) -> Optional[int]:
        """The launched command's exit status (negative: the signal that killed it)."""
        return self.process.returncode if self.process else None
