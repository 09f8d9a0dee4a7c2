"""keytrace's agent in a container: the image is built offline (deploy/container/build: a
Debian rootfs by mmdebstrap, keytrace's wheel), and the agent run in it with the host's PID
namespace, by the command docs/agent.md gives, exports exact keys for a leaky process on the
host and for one in another container, with its own libc, started after the agent.

podman works here as root with runc, cgroupfs and no default ulimits: a containers.conf of the
test's own (CONTAINERS_CONF) says the last, /etc is left alone."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import REQUIRE_BPF, uprobe_events
from test_agent import free_port, metrics, until, value

ROOT = Path(__file__).resolve().parent.parent
PODMAN = ["podman", "--runtime", "runc", "--cgroup-manager=cgroupfs"]
pytestmark = pytest.mark.usefixtures("bpf")


@pytest.fixture(scope="module")
def podman_env(tmp_path_factory):
    missing = [t for t in ("podman", "runc", "mmdebstrap") if not shutil.which(t)]
    if missing:
        if REQUIRE_BPF:
            pytest.fail(f"{', '.join(missing)} not installed (setup.sh installs them)")
        pytest.skip(f"{', '.join(missing)} not installed")
    conf = tmp_path_factory.mktemp("podman") / "containers.conf"
    conf.write_text("[containers]\ndefault_ulimits = []\n")
    return dict(os.environ, CONTAINERS_CONF=str(conf))


@pytest.fixture(scope="module")
def image(podman_env):
    r = subprocess.run([str(ROOT / "deploy" / "container" / "build")], env=podman_env,
                       capture_output=True, text=True, timeout=2400)
    assert r.returncode == 0, r.stderr[-3000:]
    version = next(line.split('"')[1] for line in (ROOT / "pyproject.toml").read_text().splitlines()
                   if line.startswith("version = "))
    for tag in (f"localhost/keytrace:{version}", "localhost/keytrace:latest"):
        assert subprocess.run(PODMAN + ["image", "exists", tag], env=podman_env).returncode == 0
    return "localhost/keytrace:latest"


def _gone(name: str, env) -> None:
    subprocess.run(PODMAN + ["rm", "--force", "--time", "20", name], env=env,
                   capture_output=True, timeout=120)


def test_the_agent_in_a_container_exports_exact_keys_on_the_host_and_in_another_container(
        image, podman_env, bins, tmp_path):
    env = podman_env
    before = uprobe_events()
    # a leaky process on the host, before the agent: 5 loads, 5 keys held
    host = subprocess.Popen([bins["reload_host"], bins["libleaky"], "5", "0", "600"])
    # the other container's programs, the same fixtures, run on the image's own libc
    shared = tmp_path / "w"
    shared.mkdir()
    for name in ("reload_host", "libleaky"):
        shutil.copy(bins[name], shared / Path(bins[name]).name)
    port = free_port()
    agent_name, other_name = f"keytrace-agent-{port}", f"keytrace-other-{port}"
    agent = subprocess.Popen(PODMAN + ["run", "--name", agent_name, "--privileged", "--pid",
                                       "host", "--network", "host", image, "agent", "--listen",
                                       f"127.0.0.1:{port}", "--refresh", "0.5"],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        said = []  # (a first start checks how this host single-steps: a line before)
        while not any("serving" in line for line in said) and len(said) < 5:
            said.append(agent.stderr.readline())
        assert f"serving http://127.0.0.1:{port}/metrics" in said[-1], "".join(said)
        # started after the agent, in a container of its own: 7 loads, 7 keys held
        subprocess.run(PODMAN + ["run", "--detach", "--name", other_name, "-v",
                                 f"{shared}:/w:ro", "localhost/keytrace-base:latest",
                                 "/w/reload_host", "/w/libleaky.so", "7", "50000", "600"],
                       env=env, check=True, capture_output=True, timeout=120)
        other = int(subprocess.run(PODMAN + ["inspect", "--format", "{{.State.Pid}}", other_name],
                                   env=env, capture_output=True, text=True, check=True).stdout)
        mine = os.stat("/lib/x86_64-linux-gnu/libc.so.6")
        theirs = os.stat(f"/proc/{other}/root/lib/x86_64-linux-gnu/libc.so.6")
        assert (theirs.st_dev, theirs.st_ino) != (mine.st_dev, mine.st_ino)  # its own libc

        def both():
            text = metrics(port)
            got = (value(text, "keytrace_process_pthread_keys", pid=str(host.pid)),
                   value(text, "keytrace_process_pthread_keys", pid=str(other)))
            return text if got == (5, 7) else None
        text = until(both, timeout=90)
        assert text, metrics(port)
        for pid in (host.pid, other):
            assert value(text, "keytrace_process_pthread_keys_leaking", pid=str(pid)) == 1
            assert value(text, "keytrace_process_pthread_keys_limit", pid=str(pid)) == 1024
    finally:
        _gone(other_name, env)
        host.kill()
        host.wait()
        subprocess.run(PODMAN + ["stop", "--time", "30", agent_name], env=env,
                       capture_output=True, timeout=120)
        try:
            agent.wait(60)
        finally:
            agent.kill()  # (ended already, unless podman stop failed)
            agent.wait()
            _gone(agent_name, env)
    # The per-test check (conftest) then looks host-wide for anything left attached; this one
    # says which run left it.
    assert uprobe_events() == before  # the container's agent detached everything it attached
