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

from . import doctor, procmaps
from .errors import KeytraceError
from .ledger import Ledger
from .probes import DEFAULT_RING_PAGES, ProbeSet
from .records import OPS, PATH_LEN, RECORD, boot_to_wall_offset_ns, decode

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


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting to be reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _exe_of(pid: int) -> Optional[str]:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None


class KeyTracer:
    """Trace pthread key creation and deletion.

    pids: trace these running processes (and their children); command: launch this argv and
    trace it with its children; neither: trace the whole host. keep_events=False keeps only
    per-process state (flat memory for long runs). on_ready is called once probes are attached.
    """

    def __init__(self, pids: Optional[Iterable[int]] = None, command: Optional[Sequence[str]] = None,
                 keep_events: bool = True, ring_pages: int = DEFAULT_RING_PAGES,
                 interval: float = 0.01, on_ready: Optional[Callable[["KeyTracer"], None]] = None):
        self.pids = None if pids is None else sorted({int(p) for p in pids})
        self.command = list(command) if command else None
        self.interval = interval
        self.on_ready = on_ready
        self.ledger = Ledger(keep_events=keep_events, resolve_exe=_exe_of)
        self.process: Optional[Launched] = None
        self._ring_pages = ring_pages
        self._probes: Optional[ProbeSet] = None
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._poll_lock = threading.Lock()
        self._offset = boot_to_wall_offset_ns()
        self._poll_error: Optional[BaseException] = None
        self._snapshotted: set = set()  # pids whose /proc maps are in the ledger

    # -- life cycle -----------------------------------------------------------------------------
    def start(self, background: bool = True) -> "KeyTracer":
        if self._probes is not None:
            raise KeytraceError("this tracer is already started")
        doctor.require_tracing()
        for pid in self.pids or ():
            if not os.path.exists(f"/proc/{pid}"):
                raise KeytraceError(f"no process with pid {pid}")
        gate_w = None
        filter_pids = self.pids
        try:
            if self.command:
                self.process, gate_w = self._spawn_gated(self.command)
                filter_pids = (self.pids or []) + [self.process.pid]
            self._probes = ProbeSet(filter_pids, self._ring_pages)
            atexit.register(self.stop)
            self._probes.open()
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
            self.ledger.lost = self._probes.lost()
            if len(batch):
                batch = self._with_module_snapshots(batch)
                self.ledger.ingest(decode(batch, self._offset, stack_of=self._probes.stack))
            return len(batch)

    def _with_module_snapshots(self, batch: np.ndarray) -> np.ndarray:
        """Put "map" records of the modules a process had mapped before we saw it (from
        /proc/PID/maps) in front of its first key creation, so its callers can be named.
        dlopens after that are reported by the probes themselves."""
        ops, pids = batch["op"], batch["pid"]
        creating = (ops == OPS.index("create")) | (ops == OPS.index("create_failed"))
        extra, where = [], []
        for pid in np.unique(pids[creating]).tolist():
            if pid in self._snapshotted:
                continue
            self._snapshotted.add(pid)
            first = int(np.flatnonzero(creating & (pids == pid))[0])
            mods = procmaps.modules(pid)
            recs = np.zeros(len(mods), dtype=RECORD)
            recs["op"] = OPS.index("map")
            recs["pid"] = recs["tid"] = pid
            recs["ts"] = batch["ts"][first] - 1
            recs["comm"] = batch["comm"][first]
            recs["stack"] = -1
            for i, (path, base, _) in enumerate(mods):
                recs[i]["path"] = path.encode()[:PATH_LEN - 1]
                recs[i]["handle"] = base
            extra.append(recs)
            where += [first] * len(recs)
        # A new image (exec) or a new process on the same pid (exit) needs a new snapshot.
        self._snapshotted.difference_update(
            pids[(ops == OPS.index("exec")) | (ops == OPS.index("exit"))].tolist())
        return np.insert(batch, where, np.concatenate(extra)) if where else batch

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
            if self.process is None and self.pids and not any(map(_alive, self.pids)):
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
        from .jupyter import ledger_html
        state = "tracing" if self._probes is not None else "stopped"
        return ledger_html(self.ledger, heading=f"KeyTracer: {state}, {self.attached} probes")

    # -- facts for front-ends -----------------------------------------------------------------
    @property
    def attached(self) -> int:
        return self._probes.attached if self._probes else 0

    @property
    def files(self) -> list[str]:
        return [t.path for t in self._probes.targets] if self._probes else []

    @property
    def returncode(self) -> Optional[int]:
        return self.process.returncode if self.process else None
