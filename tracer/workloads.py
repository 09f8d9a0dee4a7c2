"""Building the C workloads: the demo's reload simulation, and the test suite's fixtures.

Sources are compiled with the system C compiler into a cache directory keyed by the source's
hash, so repeated runs reuse the binaries.
"""
from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path
from typing import Optional

from .errors import KeytraceError

SOURCES = Path(__file__).resolve().parent / "workloads"


def compile_c(src: Path, dest_dir: Path, shared: bool = False, extra: tuple = (),
              name: Optional[str] = None, compiler: str = "cc") -> Path:
    """Compile one C file to an executable (or a shared library), cached by content.
    compiler: cc, or musl-gcc (Debian's musl-tools) for a program on musl."""
    cc = shutil.which(compiler) or (compiler == "cc" and shutil.which("gcc"))
    if not cc:
        raise KeytraceError(f"no C compiler {compiler} to build the workload: "
                            "apt-get install gcc libc6-dev (musl-tools for musl-gcc)")
    text = src.read_bytes()
    digest = hashlib.sha256(text + repr((shared, extra, name, compiler)).encode()).hexdigest()[:12]
    name = name or (f"{src.stem}.so" if shared else src.stem)
    out = dest_dir / digest / name
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Frame pointers keep user stacks walkable for later attribution.
    args = [cc, "-O1", "-g", "-fno-omit-frame-pointer", "-o", str(out) + ".tmp", str(src), "-pthread"]
    if shared:
        args[1:1] = ["-shared", "-fPIC"]
    args += list(extra) + ["-ldl"]
    res = subprocess.run(args, capture_output=True, text=True)
    if res.returncode != 0:
        raise KeytraceError(f"compiling {src.name} failed:\n{res.stderr.strip()}")
    Path(str(out) + ".tmp").rename(out)
    return out


def build_demo(dest_dir: Path) -> dict[str, Path]:
    """The reload host and its libraries: libleaky (creates a key per load, never deletes it),
    libtidy (deletes it on unload), and the incident's nested pair: libimagick_demo.so needs
    libgomp_demo.so, whose constructor leaks the key."""
    gomp = compile_c(SOURCES / "libb.c", dest_dir, shared=True, name="libgomp_demo.so")
    return {
        "reload_host": compile_c(SOURCES / "reload_host.c", dest_dir),
        "libleaky": compile_c(SOURCES / "libleaky.c", dest_dir, shared=True),
        "libtidy": compile_c(SOURCES / "libtidy.c", dest_dir, shared=True),
        "libgomp": gomp,
        "libimagick": compile_c(SOURCES / "liba.c", dest_dir, shared=True, extra=(str(gomp),),
                                name="libimagick_demo.so"),
    }
