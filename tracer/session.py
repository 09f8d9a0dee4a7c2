"""KeyTracer: a tracing session. Probes in, a live Ledger out; for the CLI, notebooks and agents.

    with KeyTracer(command=["./host", "libleaky.so", "10"]) as t:
        t.wait()
    t.ledger.summary()

start() returns once the probes are attached; a background thread drains the ring buffer every
`interval` seconds into the ledger. stop() (also on leaving the with-block, at interpreter exit,
or after a failed start) drains what is left, detaches every probe and ends a launched command.
"""
from __future__ import annotations

import atexit
import functools
import os
import shutil
import signal
import subprocess
import threading
import time
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

from . import wire
from .analysis.ledger import Ledger
from .bpf import doctor, units
from .bpf.loader import DEFAULT_RING_PAGES, Program
from .errors import KeytraceError
from .host import keytable, libc, proc
from .host.elf import elf_info
from .host.sight import sight

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


class KeyTracer:
    """Trace pthread key creation and deletion.

    pids: trace these running processes (and their children); command: launch this argv and
    trace it with its children; neither: trace the whole host. keep_events=False keeps only
    per-process state (flat memory for long runs). on_ready is called once probes are attached;
    on_note with each line worth telling a user while tracing (a C library probed late, a
    process that cannot be traced), also kept in ``notes``.

    A process met while already running (a -p pid, or host-wide at its first event) starts
    from its live key table (tracer.host.sight): traced events are deltas on it.
    """

    def __init__(self, pids: Optional[Iterable[int]] = None, command: Optional[Sequence[str]] = None,
                 keep_events: bool = True, ring_pages: int = DEFAULT_RING_PAGES,
                 interval: float = 0.01, on_ready: Optional[Callable[["KeyTracer"], None]] = None,
                 on_note: Optional[Callable[[str], None]] = None):
        self.pids = None if pids is None else sorted({int(p) for p in pids})
        self.command = list(command) if command else None
        self.interval = interval
        self.on_ready = on_ready
        self.on_note = on_note
        self.notes: list[str] = []
        self.ledger = Ledger(keep_events=keep_events)
        self.process: Optional[Launched] = None
        self._ring_pages = ring_pages
        self._probes: Optional[Program] = None
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._poll_lock = threading.Lock()
        self._offset = wire.boot_to_wall_offset_ns()
        self._poll_error: Optional[BaseException] = None
        self._snapshotted: set = set()  # pids whose current image's modules are in the ledger
        self._probed: set = set()        # (dev, inode) of every file probed
        self._pending: dict = {}         # exec'd pid -> deadline to find its C library
        self._host_libc: Optional[str] = None
        self._functions = units.functions(units.KEY_TRACER)

    # -- life cycle -----------------------------------------------------------------------------
    def start(self, background: bool = True) -> "KeyTracer":
        if self._probes is not None:
            raise KeytraceError("this tracer is already started")
        doctor.require_tracing()
        for pid in self.pids or ():
            if not proc.exists(pid):
                raise KeytraceError(f"no process with pid {pid}")
        gate_w = None
        filter_pids = self.pids
        try:
            if self.command:
                self.process, gate_w = self._spawn_gated(self.command)
                filter_pids = (self.pids or []) + [self.process.pid]
            self._probes = Program(units.KEY_TRACER, filter_pids, self._ring_pages)
            atexit.register(self.stop)
            self._probes.open()
            self._attach_targets()
            # Met now, while they surely run: the -p processes, and the launched command's gate
            # (its exec starts a fresh, fully traced image).
            for pid in (self.pids or []) + ([self.process.pid] if self.process else []):
                self._meet_running(pid)
            if gate_w is not None:
                os.write(gate_w, b"go\n")
        except BaseException:
            self.stop()
            raise
        finally:
            if gate_w is not None:
                os.close(gate_w)  # unread, it makes the gate exit 127 instead of running
        if self.on_ready:
            self.on_ready(self)
        if background:
            self._thread = threading.Thread(target=self._run, name="keytrace-poll", daemon=True)
            self._thread.start()
        return self

    def _attach_targets(self) -> None:
        """Probes on every C library the traced processes (or the host) may use, and on a
        launched command that is itself one (a static executable)."""
        targets = libc.find_targets(self._functions, self._probes.pids)
        if self.command and self.process is not None:
            exe = shutil.which(self.command[0])
            static = exe and self._static_target(exe)
            if static:
                targets.append(static)
        if not targets:
            raise KeytraceError("no C library defining pthread_key_create was found to probe")
        for t in targets:
            self._attach(t)
        self._host_libc = keytable.host_libc()

    def _attach(self, t: libc.Target) -> bool:
        if t.ident in self._probed:
            return False
        self._probes.attach(t.path, t.functions, t.flavour)
        self._probed.add(t.ident)
        return True

    def _static_target(self, path: str) -> Optional[libc.Target]:
        """A statically linked glibc executable with symbols defines the functions itself."""
        info = elf_info(path)
        if info is None or not info.static:
            return None
        t = libc.target(path, self._functions)
        return t if t is not None and keytable.layout(path)[1] != "no __pthread_keys" else None

    def _note(self, text: str) -> None:
        self.notes.append(text)
        if self.on_note:
            self.on_note(text)

    def _sight(self, pid: int, identity: bool = True) -> dict:
        """What the host shows of a running process (tracer.host.sight), its modules' munmaps
        watched from now on, so their keys become orphaned when a reload unmaps them."""
        seen = sight(pid, self._host_libc, identity)
        units.watch_unmaps(self._probes, pid, [base for _, base in seen.get("modules", ())])
        return seen

    def _meet_running(self, pid: int) -> None:
        """A process traced by pid is met now, while it surely runs: who it is, its modules, and
        its key table as the state tracing starts from."""
        try:
            comm = proc.stat(pid).comm
        except (OSError, IndexError, ValueError):
            return
        self._snapshotted.add(pid)
        self.ledger.observe(pid, time.time_ns(), comm, **self._sight(pid))

    def _discover(self, now: float) -> None:
        """C libraries of exec'd processes that no probe covers yet (a container's or a chroot's
        copy, a static executable): probe them as soon as they are mapped, then read the
        process's table, so the keys made before the probes arrived are counted too."""
        for pid, (deadline, exec_path) in list(self._pending.items()):
            alive = proc.exists(pid)
            exe = f"/proc/{pid}/exe" if alive else exec_path  # gone already: the file it ran
            info = elf_info(exe)
            if info is not None and info.static:
                del self._pending[pid]
                found = self._static_target(exe)
                if found is None:
                    self._untraceable(pid, exec_path, exe)
                    continue
                fresh = [found]
            else:
                paths = libc.mapped_libraries(pid)
                if paths or now > deadline or not alive:
                    del self._pending[pid]  # mapped, or never will be
                fresh = [t for t in (libc.target(p, self._functions, name) for p, name in paths) if t]
            fresh = [t for t in fresh if t.ident not in self._probed]
            if not fresh:
                continue
            for t in fresh:
                self._attach(t)
            self._note(f"probing {', '.join(t.path for t in fresh)} from now on: first mapped by "
                       f"pid {pid} ({exec_path})")
            try:
                comm = proc.stat(pid).comm
            except (OSError, IndexError, ValueError):
                continue  # gone: nothing more to read
            self.ledger.observe(pid, time.time_ns(), comm, **self._sight(pid, identity=False))

    def _untraceable(self, pid: int, exec_path: str, exe: str) -> None:
        """Say so when an exec'd program is one no probe can cover."""
        why = ("statically linked without symbols" if libc.target(exe, self._functions) is None
               else "statically linked with a C library other than glibc")
        self._note(f"cannot trace pid {pid} ({exec_path}): {why}; its pthread keys are not counted")

    def _spawn_gated(self, argv: Sequence[str]):
        path = shutil.which(argv[0])
        if path is None:
            raise KeytraceError(f"command not found: {argv[0]}")
        r, w = os.pipe()
        try:
            # posix_spawn puts the gate's read end on fd 3 and nothing else of ours is inherited.
            pid = os.posix_spawn("/bin/sh", ["/bin/sh", "-c", _gate_script(), "keytrace-gate", path, *argv[1:]],
                                 os.environ, file_actions=[(os.POSIX_SPAWN_DUP2, r, 3)])
        finally:
            os.close(r)
        return Launched(pid), w

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.interval):
                self.poll()
        except BaseException as e:  # surfaced by stop()/wait(), never lost in the thread
            self._poll_error = e

    def poll(self) -> int:
        """Drain the ring buffer into the ledger once; returns the number of events."""
        with self._poll_lock:
            if self._probes is None:
                return 0
            batch = self._probes.drain()
            lost = self._probes.lost()
            frame = wire.decode(batch, self._offset, stack_of=self._probes.stack)
            at = 0
            for pos, facts in self._meet(batch, frame):
                self.ledger.ingest(frame.iloc[at:pos])
                self.ledger.ingest(facts)
                at = pos
            self.ledger.ingest(frame.iloc[at:], lost=lost, now=time.time_ns())
            execs = frame[frame["op"] == "exec"]
            now = time.monotonic()
            self._pending.update((pid, (now + 0.5, path))
                                 for pid, path in zip(execs["pid"].tolist(), execs["path"].tolist()))
            if self._pending:
                self._discover(now)
            return len(batch)

    def _meet(self, batch: np.ndarray, frame) -> list:
        """Tell the ledger what the host shows of the processes this batch is the first news
        of (identity), and of those about to create keys in a program image whose modules it
        does not know yet (so their callers can be named). dlopens after that are reported by
        the probes themselves."""
        ops, pids = batch["op"], batch["pid"]
        ts = frame["ts"].array.asi8
        forked = set(batch["other"][ops == wire.CODE["fork"]].tolist())
        creating = (ops == wire.CODE["create"]) | (ops == wire.CODE["create_failed"])
        out = []
        for pid in np.unique(pids).tolist():
            mine = pids == pid
            first = int(np.argmax(mine))
            comm = str(frame["comm"].iloc[first])
            if pid not in forked and not self.ledger.knows(pid):
                # Met while already running: its table now is the state to start from. An exec
                # in this batch started the image the table belongs to: the facts go after it.
                execs = np.flatnonzero(mine & (ops == wire.CODE["exec"]))
                at = int(execs[-1]) + 1 if len(execs) else first
                self._snapshotted.add(pid)
                out.append((at, Ledger.facts(pid, int(ts[min(at, len(ts) - 1)]) - 1, comm,
                                             **self._sight(pid))))
                continue
            if pid not in self._snapshotted and creating[mine].any():
                self._snapshotted.add(pid)
                at = int(np.argmax(mine & creating))
                mods = [(path, base) for path, base, _ in proc.modules(pid)]
                units.watch_unmaps(self._probes, pid, [base for _, base in mods])
                out.append((at, Ledger.facts(pid, int(ts[at]) - 1, comm, modules=mods)))
        # A new image (exec) or a new process on the same pid (exit) needs a new snapshot.
        self._snapshotted.difference_update(
            pids[(ops == wire.CODE["exec"]) | (ops == wire.CODE["exit"])].tolist())
        return sorted(out, key=lambda item: item[0])

    def wait(self, duration: Optional[float] = None, stop: Optional[threading.Event] = None,
             tick: Optional[Callable[[], None]] = None) -> str:
        """Block until the launched command exits (or, tracing pids, all of them have exited),
        duration passes, or stop is set.

        Returns why: "exited", "duration" or "stopped". tick is called about 4 times a second.
        """
        deadline = None if duration is None else time.monotonic() + duration
        while True:
            if self._poll_error is not None:
                raise self._poll_error
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

    def stop(self) -> None:
        """Drain, detach every probe, end a launched command still running. Idempotent."""
        # The launched command ends first, while the probes still see its exit.
        self._end_command()
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None
        try:
            if self._probes is not None and self._probes.bpf is not None:
                self.poll()
        finally:
            if self._probes is not None:
                self._probes.close()
                self._probes = None
            atexit.unregister(self.stop)

    def _end_command(self) -> None:
        p = self.process
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

    def __enter__(self) -> "KeyTracer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _repr_html_(self) -> str:
        from .analysis.html import ledger_html
        state = "tracing" if self._probes is not None else "stopped"
        return ledger_html(self.ledger, heading=f"KeyTracer: {state}, {self.attached} probes")

    # -- facts for front-ends -----------------------------------------------------------------
    @property
    def attached(self) -> int:
        return self._probes.attached if self._probes else 0

    @property
    def files(self) -> list[str]:
        return list(self._probes.files) if self._probes else []

    @property
    def returncode(self) -> Optional[int]:
        return self.process.returncode if self.process else None
