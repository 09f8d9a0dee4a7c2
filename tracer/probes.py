"""Compiling probes/keys.bpf.c with bcc, attaching it, and detaching it on every exit path."""
from __future__ import annotations

import ctypes as ct
import os
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from . import headers
from .errors import KeytraceError
from .records import RECORD
from .ringbuf import RingReader
from .symbols import Target, find_targets

PROBES_DIR = Path(os.environ.get("KEYTRACE_PROBES", Path(__file__).resolve().parent.parent / "probes"))
TRACEFS = Path("/sys/kernel/tracing")

# function -> (entry program, return program or None)
PROGRAMS = {
    "pthread_key_create": ("create_enter", "create_return"),
    "pthread_key_delete": ("delete_enter", "delete_return"),
    "dlopen": ("dlopen_enter", "dlopen_return"),
    "dlclose": ("dlclose_enter", None),
}
DEFAULT_RING_PAGES = 2048  # 8 MiB: ~24k records, 10 ms of a very busy host


def source(name: str = "keys") -> str:
    path = PROBES_DIR / f"{name}.bpf.c"
    try:
        return path.read_text()
    except OSError as e:
        raise KeytraceError(f"cannot read probe source {path}: {e.strerror} "
                            "(set KEYTRACE_PROBES to the probes/ directory)") from None


def ensure_tracefs() -> None:
    """bcc reads tracepoint formats from tracefs; mount it where it is missing."""
    if (TRACEFS / "events").is_dir() or Path("/sys/kernel/debug/tracing/events").is_dir():
        return
    if os.system(f"mount -t tracefs nodev {TRACEFS} 2>/dev/null") != 0:
        raise KeytraceError(f"tracefs is not mounted and mounting it failed: "
                            f"mount -t tracefs nodev {TRACEFS}")


def _exit_has_group_dead() -> bool:
    fmt = TRACEFS / "events/sched/sched_process_exit/format"
    try:
        return "group_dead" in fmt.read_text()
    except OSError:
        return False


class ProbeSet:
    """The compiled probe set: attach with open(), read with drain(), always close().

    pids: trace only these processes and their descendants (filtered in the kernel);
    None traces the whole host.
    """

    def __init__(self, pids: Optional[Iterable[int]] = None, ring_pages: int = DEFAULT_RING_PAGES):
        if ring_pages < 1 or ring_pages & (ring_pages - 1):
            raise KeytraceError(f"ring buffer pages must be a power of two, not {ring_pages}")
        self.pids = None if pids is None else sorted(set(pids))
        self.ring_pages = ring_pages
        self.bpf = None
        self.ring: Optional[RingReader] = None
        self.targets: list[Target] = []
        self.attached = 0  # probes attached (entry and return counted apart)

    def open(self) -> "ProbeSet":
        try:
            self._open()
        except BaseException:
            self.close()
            raise
        return self

    def _open(self) -> None:
        ensure_tracefs()
        headers.apply(headers.find())
        try:
            from bcc import BPF
        except ImportError:
            raise KeytraceError("bcc is not importable: apt-get install python3-bpfcc, and run "
                                "keytrace from /usr/bin/python3 or a venv made with "
                                "--system-site-packages") from None
        cflags = [f"-DKT_RING_PAGES={self.ring_pages}", f"-DKT_SELF={os.getpid()}"]
        if self.pids is not None:
            cflags.append("-DKT_FILTER")
        if _exit_has_group_dead():
            cflags.append("-DKT_GROUP_DEAD")
        try:
            self.bpf = BPF(text=source().encode(), cflags=cflags)
        except Exception as e:
            raise KeytraceError(f"compiling the probes failed: {e} (run keytrace doctor)") from None
        # clang frees its working memory after the compile; hand it back to the system
        # (about 30 MB of RSS here).
        ct.CDLL(None).malloc_trim(0)
        if self.pids is not None:
            traced = self.bpf[b"traced"]
            for pid in self.pids:
                traced[ct.c_uint(pid)] = ct.c_ubyte(1)
        events = self.bpf[b"events"]
        self.ring = RingReader(events.map_fd, self.ring_pages * os.sysconf("SC_PAGE_SIZE"), RECORD)
        self.targets = find_targets(self.pids)
        if not self.targets:
            raise KeytraceError("no C library defining pthread_key_create was found to probe")
        for t in self.targets:
            for func, addr in sorted(t.functions.items()):
                entry, ret = PROGRAMS[func]
                try:
                    self.bpf.attach_uprobe(name=t.path.encode(), addr=addr, fn_name=entry.encode())
                    self.attached += 1
                    if ret:
                        self.bpf.attach_uretprobe(name=t.path.encode(), addr=addr, fn_name=ret.encode())
                        self.attached += 1
                except Exception as e:
                    raise KeytraceError(f"attaching to {func} in {t.path} failed: {e}") from None

    def add_pid(self, pid: int) -> None:
        """Trace one more process (and its future children); filtered sets only."""
        self.bpf[b"traced"][ct.c_uint(pid)] = ct.c_ubyte(1)

    def drain(self) -> np.ndarray:
        return self.ring.drain()

    def stack(self, stack_id: int) -> list:
        """A user stack's addresses, innermost first; the entry is then freed for reuse."""
        table = self.bpf[b"stacks"]
        try:
            addrs = list(table.walk(stack_id))
        except KeyError:
            return []
        try:
            del table[ct.c_int(stack_id)]
        except KeyError:
            pass
        return addrs

    def lost(self) -> int:
        """Records the kernel dropped because the ring buffer was full, since open()."""
        return int(sum(self.bpf[b"lost"][ct.c_int(0)]))

    def close(self) -> None:
        """Detach everything; safe to call twice and after a failed open()."""
        if self.ring is not None:
            self.ring.close()
            self.ring = None
        if self.bpf is not None:
            try:
                self.bpf.cleanup()  # detaches uprobes and tracepoints, closes the programs
            finally:
                self.bpf = None
                self.attached = 0
