"""Kernel headers for bcc.

bcc compiles against kernel headers and refuses to start without them. Cloud kernels (and this
project's CI machines) ship none for the running kernel. keytrace's probes read no kernel
struct, only user memory and tracepoint fields (whose layout bcc reads from tracefs at run
time), so the distribution's headers of another version serve. Debian splits them into a
'-common' tree and an arch tree; bcc wants one tree, so keytrace merges the two with symlinks
into a cache directory and hands it to bcc as BCC_KERNEL_SOURCE. Nothing is written under
/lib/modules.
"""
from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import KeytraceError
from ..host.elf import CACHE_DIR as CACHE

SRC = Path("/usr/src")
INSTALL_HINT = "apt-get install linux-headers-amd64   (Debian; other distributions: their kernel headers package)"


@dataclass
class Headers:
    how: str                  # "env", "running-kernel", "kheaders", "merged"
    path: Optional[Path]      # what BCC_KERNEL_SOURCE gets (None: bcc finds them itself)
    detail: str


def _version_key(name: str) -> tuple:
    return tuple(int(x) for x in re.findall(r"\d+", name))


def distro_trees(src: Path = SRC) -> list[tuple[Path, Path]]:
    """(common, arch) header directory pairs under /usr/src, newest first."""
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    pairs = []
    for common in src.glob("linux-headers-*-common"):
        base = common.name[: -len("-common")]
        for cand in sorted(src.glob(f"{base}-*")):
            if cand != common and cand.name.endswith(arch) and (cand / "include").is_dir():
                pairs.append((common, cand))
    return sorted(pairs, key=lambda p: _version_key(p[1].name), reverse=True)


def merge(common: Path, arch: Path, cache: Path = CACHE) -> Path:
    """A symlink tree of common overlaid by arch, built once per header version."""
    dest = cache / "headers" / arch.name
    if (dest / ".complete").exists():
        return dest
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        # GNU cp -rs makes the symlink tree in one process; -f lets arch files win.
        subprocess.run(["cp", "-rs", f"{common}/.", str(tmp)], check=True, capture_output=True)
        subprocess.run(["cp", "-rsf", f"{arch}/.", str(tmp)], check=True, capture_output=True)
        (tmp / ".complete").write_text(f"{common}\n{arch}\n")
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    except (OSError, subprocess.CalledProcessError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        msg = e.stderr.decode(errors="replace").strip() if isinstance(e, subprocess.CalledProcessError) else str(e)
        raise KeytraceError(f"cannot build the merged kernel header tree in {dest}: {msg}") from None
    return dest


def find(build: bool = True) -> Headers:
    """Where bcc will get kernel headers from; with build, make the merged tree if needed.

    Raises KeytraceError (with the fix) when there is no way.
    """
    env = os.environ.get("BCC_KERNEL_SOURCE")
    if env:
        if Path(env, "include").is_dir():
            return Headers("env", Path(env), f"BCC_KERNEL_SOURCE={env}")
        raise KeytraceError(f"BCC_KERNEL_SOURCE={env} has no include/ directory: unset it or "
                            "point it at a kernel header tree")
    release = platform.release()
    running = Path("/lib/modules", release, "build")
    if (running / "include").is_dir():
        return Headers("running-kernel", None, f"{running} (headers of the running kernel)")
    if Path("/sys/kernel/kheaders.tar.xz").exists():
        return Headers("kheaders", None, "/sys/kernel/kheaders.tar.xz (CONFIG_IKHEADERS)")
    trees = distro_trees()
    if not trees:
        raise KeytraceError(
            f"no kernel headers: the running kernel {release} ships none (no {running}, no "
            f"CONFIG_IKHEADERS) and none are installed under {SRC}. Fix: {INSTALL_HINT}")
    common, arch = trees[0]
    detail = f"merged {common.name} + {arch.name} (running kernel {release} ships none)"
    if not build:
        dest = CACHE / "headers" / arch.name
        return Headers("merged", dest, detail + ("" if (dest / ".complete").exists()
                                                  else "; built on first use"))
    return Headers("merged", merge(common, arch), detail)


def apply(h: Headers, env: dict) -> dict:
    """The environment of a compile (env, changed) that points bcc at the headers."""
    if h.path is not None:
        env["BCC_KERNEL_SOURCE"] = str(h.path)
    return env
