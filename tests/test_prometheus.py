"""A real Prometheus (Debian's) scrapes a real agent every second on loopback: the series are
there, and the exhaustion alert goes pending or firing for a leaky reloader (a test copy of the
rules, with `for:` cut to a second)."""
import json
import shutil
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import REQUIRE_BPF, terminate
from test_agent import agent, free_port, until  # noqa: F401  (agent is a fixture)

RULES = Path(__file__).resolve().parent.parent / "deploy" / "prometheus" / "keytrace-rules.yml"
pytestmark = pytest.mark.usefixtures("bpf")


def query(port, promql):
    """The result vector, [] while Prometheus is still starting."""
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return json.load(r)["data"]["result"]
    except (OSError, ValueError):
        return []


@pytest.fixture
def prometheus(tmp_path):
    binary = shutil.which("prometheus")
    if binary is None:
        if REQUIRE_BPF:
            pytest.fail("prometheus is not installed (setup.sh installs Debian's package)")
        pytest.skip("prometheus is not installed")
    running = []

    def start(target_port):
        rules = yaml.safe_load(RULES.read_text())
        for group in rules["groups"]:
            group["interval"] = "1s"
            for rule in group["rules"]:
                if "for" in rule:
                    rule["for"] = "1s"
        (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(tmp_path / "rules.yml")],
            "scrape_configs": [{"job_name": "keytrace",
                                "static_configs": [{"targets": [f"127.0.0.1:{target_port}"]}]}]}))
        port = free_port()
        p = subprocess.Popen([binary, f"--config.file={tmp_path / 'prometheus.yml'}",
                              f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                              f"--web.listen-address=127.0.0.1:{port}"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        running.append(p)
        return port
    yield start
    for p in running:
        terminate(p)


def test_prometheus_sees_the_series_and_the_exhaustion_alert(agent, prometheus, bins):  # noqa: F811
    a, agent_port = agent()
    assert "serving" in a.stderr.readline()
    prom = prometheus(agent_port)
    # Reloads every 200 ms until glibc refuses a key: a steady, measured rate.
    host = subprocess.Popen([bins["reload_host"], bins["libleaky"], "0", "200000"],
                            stderr=subprocess.DEVNULL)
    try:
        leaking = until(lambda: query(prom, f'keytrace_process_pthread_keys_leaking{{pid="{host.pid}"}} == 1'),
                        timeout=60)
        assert leaking, "Prometheus never saw the reloader as leaking"
        assert query(prom, f'keytrace_process_pthread_keys{{pid="{host.pid}"}}')
        assert query(prom, "keytrace_build_info")
        alert = until(lambda: query(prom, 'ALERTS{alertname="KeytracePthreadKeysExhaustionSoon",'
                                          f'pid="{host.pid}"}}'), timeout=60)
        assert alert and alert[0]["metric"]["alertstate"] in ("pending", "firing"), alert
    finally:
        host.kill()
        host.wait()
