"""Probe source compiled to BPF, kept on disk: an unchanged program is never compiled twice.

bcc compiles in a child process (tracer/bpf/bcc_compile.py), so the tracer never maps LLVM and
clang: importing bcc alone costs about 65 MB resident, a compile peaks near 100 MB more, and it
takes most of a second. The child prints the object (instructions, the maps they name, the
maps' types); it is kept in CACHE_DIR/bpf under a hash of everything the compile read: the
source and flags, the running kernel (its tracepoint formats), the kernel headers bcc was given,
bcc itself and the compile script. A changed probe, option, kernel or bcc is a new hash, so a
new compile. tracer.bpf.loaded puts an object into the kernel.

A cached object is only used when this user owns it and nobody else may write it or its
directory (the kernel would run what it holds): else it is compiled again.
"""
from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import KeytraceError
from ..host.elf import CACHE_DIR
from . import headers

FORMAT = 1
KEEP, KEEP_BYTES = 256, 64 << 20  # objects kept, at most; the least recently used go first
COMPILER = Path(__file__).with_name("bcc_compile.py")


@dataclass(frozen=True)
class Compiled:
    license: str
    kern_version: int
    maps: dict       # name -> {type, key_size, value_size, max_entries, flags, map_extra, key, leaf}
    programs: dict   # name -> (instructions, [(instruction index, map name)])
    cached: bool = False  # read from the cache (no compile this time)

    @classmethod
    def from_json(cls, d: dict, cached: bool = False) -> "Compiled":
        programs = {name: (base64.b64decode(p["insns"]), [(int(i), m) for i, m in p["maps"]])
                    for name, p in d["programs"].items()}
        for name, (code, refs) in programs.items():
            if len(code) % 8 or any(m not in d["maps"] or not 0 <= i < len(code) // 8
                                    for i, m in refs):
                raise ValueError(f"program {name} is malformed")
        return cls(str(d["license"]), int(d["kern_version"]), dict(d["maps"]), programs, cached)


def _identity(path: Path) -> str:
    st = path.stat()
    return f"{path}:{st.st_size}:{st.st_mtime_ns}"


def key(text: str, cflags: list) -> str:
    """The hash an object is kept under: everything its compile read."""
    h = hashlib.sha256()
    spec = importlib.util.find_spec("bcc")  # (found, not imported: that would load LLVM)
    if spec is None or spec.origin is None:
        raise KeytraceError("bcc is not importable: apt-get install python3-bpfcc, and run "
                            "keytrace from /usr/bin/python3 or a venv made with "
                            "--system-site-packages")
    try:
        hdrs = headers.find(build=False)
        parts = [str(FORMAT), platform.release(), platform.version(), hdrs.how, str(hdrs.path),
                 _identity(Path(spec.origin)), COMPILER.read_text(), *sorted(cflags), text]
    except OSError as e:
        raise KeytraceError(f"cannot read what the probes are compiled with: {e}") from None
    for p in parts:
        h.update(p.encode() + b"\0")
    return h.hexdigest()[:32]


def _trusted(path: Path) -> bool:
    """Owned by this user and writable by nobody else, the file and its directory."""
    try:
        for p in (path.parent, path):
            st = p.lstat()
            if st.st_uid != os.geteuid() or st.st_mode & 0o022:
                return False
    except OSError:
        return False
    return True


def cache_dir() -> Path:
    return CACHE_DIR / "bpf"


def _load(path: Path) -> Optional[Compiled]:
    if not _trusted(path):
        return None
    try:
        got = Compiled.from_json(json.loads(path.read_bytes()), cached=True)
        os.utime(path)  # used: kept longest
    except (OSError, ValueError, KeyError, TypeError):
        return None  # a torn or foreign file: compiled again, and replaced
    return got


def _save(path: Path, raw: bytes) -> None:
    """Kept for the next run, whole or not at all (temporary file, then rename)."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".obj-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(raw)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
        newest = sorted(((p.stat(), p) for p in path.parent.glob("*.json")),
                        key=lambda sp: -sp[0].st_mtime)
        total = 0
        for n, (st, p) in enumerate(newest):
            total += st.st_size
            if n >= KEEP or (total > KEEP_BYTES and p != path):
                p.unlink(missing_ok=True)
    except OSError:
        pass  # not kept: compiled again next time


def compile(text: str, cflags: list, note=None) -> Compiled:  # noqa: A001 (it compiles)
    """The object of this source and flags: from the cache, else compiled now by bcc in a child
    (note is told a line then) and kept."""
    path = cache_dir() / f"{key(text, cflags)}.json"
    got = _load(path)
    if got is not None:
        return got
    if note:
        note("compiling the probes (once for this kernel, bcc and options; kept in "
             f"{cache_dir()})")
    env = headers.apply(headers.find(), dict(os.environ))
    # -I: only the standard library and site-packages (bcc), not this package's directory
    proc = subprocess.run([sys.executable, "-I", str(COMPILER), *cflags], input=text.encode(),
                          capture_output=True, env=env)
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip().splitlines()
        raise KeytraceError("compiling the probes failed: " + "\n".join(err[-30:])
                            + "\n(run keytrace doctor)")
    try:
        got = Compiled.from_json(json.loads(proc.stdout))
    except (ValueError, KeyError, TypeError) as e:
        raise KeytraceError(f"the probe compiler's output is unreadable: {e}") from None
    _save(path, proc.stdout)
    return got
