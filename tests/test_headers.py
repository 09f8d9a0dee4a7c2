"""The merged header tree bcc compiles against when the running kernel ships no headers."""
import os
from pathlib import Path

import pytest

from tracer.bpf import headers


def test_merged_tree_overlays_arch_on_common(tmp_path):
    trees = headers.distro_trees()
    if not trees:
        pytest.skip("no distribution kernel headers under /usr/src")
    common, arch = trees[0]
    before = sorted(os.listdir("/lib/modules")) if os.path.isdir("/lib/modules") else []
    dest = headers.merge(common, arch, cache=tmp_path)
    assert (dest / ".complete").exists()
    # Common headers and the arch tree's generated ones side by side, as links.
    assert (dest / "include/linux/sched.h").resolve().is_relative_to(common)
    assert (dest / "include/generated/autoconf.h").resolve().is_relative_to(arch)
    assert headers.merge(common, arch, cache=tmp_path) == dest  # cached
    assert (sorted(os.listdir("/lib/modules")) if os.path.isdir("/lib/modules") else []) == before


def test_no_headers_is_an_error_with_the_fix(monkeypatch, tmp_path):
    monkeypatch.delenv("BCC_KERNEL_SOURCE", raising=False)
    monkeypatch.setattr(headers, "SRC", tmp_path)
    monkeypatch.setattr(headers.platform, "release", lambda: "0.0-none")
    monkeypatch.setattr(headers, "distro_trees", lambda src=tmp_path: [])
    if Path("/sys/kernel/kheaders.tar.xz").exists():
        pytest.skip("this kernel has CONFIG_IKHEADERS")
    with pytest.raises(headers.KeytraceError, match="apt-get install linux-headers"):
        headers.find()


def test_bad_bcc_kernel_source_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv("BCC_KERNEL_SOURCE", str(tmp_path))
    with pytest.raises(headers.KeytraceError, match="BCC_KERNEL_SOURCE"):
        headers.find()
