"""A compiled object in the kernel: its maps created, its programs loaded when first asked for
(with the maps' descriptors written into them), tracepoints attached, and everything closed on
close(). Uprobes are the loader's (tracer.bpf.loader): links or perf events on its programs.
System calls only (tracer.bpf.kernel): no compiler, no bcc in this process.
"""
from __future__ import annotations

import ctypes as ct
import errno
import os
from typing import Optional

from . import kernel, maps
from .compiled import Compiled

TRACEPOINT_PREFIX = "tracepoint__"  # tracepoint__<category>__<event>: attached at load (bcc's rule)
LOG_SIZE = 1 << 20


class ProgramError(OSError):
    """The kernel refused a program; the verifier's last words are in the message."""


class Loaded:
    def __init__(self, obj: Compiled, tracefs: str, self_pid: Optional[int] = None):
        """Create the object's maps and attach its tracepoint programs. self_pid: written into
        the kt_self map, where the object has one (the probes never trace it)."""
        self.obj = obj
        self.map_fds: dict = {}
        self.tables: dict = {}
        self.programs: dict = {}   # (name, expected attach type) -> fd
        self.events: list = []     # the tracepoints' perf events: fds, closed to detach
        try:
            for name, spec in obj.maps.items():
                self.map_fds[name] = kernel.map_create(
                    spec["type"], spec["key_size"], spec["value_size"], spec["max_entries"],
                    spec["flags"], spec.get("kernel_name") or name, spec.get("map_extra", 0))
            if self_pid is not None and "kt_self" in self.map_fds:
                self["kt_self"][0] = ct.c_uint32(self_pid)
            for name in obj.programs:
                if name.startswith(TRACEPOINT_PREFIX):
                    category, event = name[len(TRACEPOINT_PREFIX):].split("__", 1)
                    fd = self.program(name, kernel.BPF_PROG_TYPE_TRACEPOINT)
                    self.events.append(kernel.tracepoint(fd, tracefs, category, event))
        except BaseException:
            self.close()
            raise

    def __getitem__(self, name):
        """A map, with bcc's table interface (tracer.bpf.maps); KeyError if there is none."""
        name = name.decode() if isinstance(name, bytes) else name
        if name not in self.tables:
            if name not in self.map_fds:
                raise KeyError(name)
            self.tables[name] = maps.table(name, self.map_fds[name], self.obj.maps[name])
        return self.tables[name]

    def program(self, name, prog_type: int, attach_type: int = 0) -> int:
        """A program's descriptor, loaded on first use for this attach type."""
        name = name.decode() if isinstance(name, bytes) else name
        if (name, attach_type) in self.programs:
            return self.programs[(name, attach_type)]
        try:
            code, refs = self.obj.programs[name]
        except KeyError:
            raise KeyError(f"no program {name} in the compiled probes") from None
        insns = bytearray(code)
        for i, map_name in refs:
            # ld_imm64 src_reg=BPF_PSEUDO_MAP_FD: the immediate is the map's descriptor
            insns[8 * i + 4:8 * i + 8] = self.map_fds[map_name].to_bytes(4, "little")
        args = (prog_type, bytes(insns), self.obj.license, name, self.obj.kern_version,
                attach_type)
        try:
            fd = kernel.prog_load(*args)
        except OSError as e:
            if e.errno == errno.EPERM:  # not allowed to load at all (EACCES: the verifier)
                raise
            log = (ct.c_char * LOG_SIZE)()
            try:  # again, for the verifier's account of what it refused
                fd = kernel.prog_load(*args, log=log)
            except OSError:
                said = log.value.decode(errors="replace").strip().splitlines()
                raise ProgramError(e.errno, f"the kernel refused program {name}: {e.strerror}"
                                   + ("\n" + "\n".join(said[-12:]) if said else "")) from None
        self.programs[(name, attach_type)] = fd
        return fd

    def attachments(self) -> list:
        """The tracepoints' descriptors (each close waits out a grace period), taken from the
        object: the caller closes them (in parallel), then close()."""
        fds, self.events = self.events, []
        return fds

    def close(self) -> None:
        """Detach and free everything; safe to call twice."""
        for fd in (self.attachments() + list(self.programs.values())
                   + list(self.map_fds.values())):
            try:
                os.close(fd)
            except OSError:
                pass
        self.programs, self.map_fds, self.tables = {}, {}, {}
