"""Bad input gets one clear line on stderr and a non-zero exit, never a traceback."""
import os
import subprocess
import sys

import pytest

from conftest import keytrace


def assert_one_line_error(res, text):
    assert res.returncode != 0
    assert "Traceback" not in res.stderr, res.stderr
    assert res.stderr.startswith("keytrace: error: "), res.stderr
    assert text in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_a_missing_pid(bpf):
    assert_one_line_error(keytrace("watch", "--pid", "999999999"), "no process with pid 999999999")


def test_an_unknown_command(bpf):
    assert_one_line_error(keytrace("watch", "--", "/no/such/program"), "command not found")


def test_unknown_output_extension():
    assert_one_line_error(keytrace("watch", "-o", "events.xlsx", "--", "true"), "cannot tell the format")


def test_bad_ring_size(bpf):
    assert_one_line_error(keytrace("watch", "--ring-pages", "3", "--", "true"), "power of two")


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to an unprivileged user needs root")
def test_not_root():
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"]
    probe = subprocess.run([*nobody, sys.executable, "-c", "import tracer.cli"], capture_output=True, cwd="/")
    # Where nobody cannot read this checkout (under /root, say), stay uid 0 but drop every
    # capability: the same check, the same message.
    drop = nobody if probe.returncode == 0 else ["setpriv", "--bounding-set=-all", "--inh-caps=-all"]
    res = subprocess.run([*drop, sys.executable, "-m", "tracer.cli", "watch", "--", "true"],
                         capture_output=True, text=True, cwd="/", env={**os.environ, "HOME": "/"})
    assert_one_line_error(res, "privileges")
    assert "run as root" in res.stderr


def test_every_command_has_help_with_examples():
    for cmd in ("watch", "report", "demo", "doctor"):
        res = keytrace(cmd, "--help")
        assert res.returncode == 0 and "Example" in res.stdout, res.stdout


def test_doctor_passes_here(bpf):
    res = keytrace("doctor")
    assert res.returncode == 0, res.stdout
    assert "FAIL" not in res.stdout and "kernel headers" in res.stdout
