"""A real Prometheus (Debian's) scrapes a real agent every second on loopback: the series are
there, and the exhaustion alert goes pending or firing for a leaky reloader (a test copy of the
rules, with `for:` cut to a second)."""
import json
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import require_tool, terminate, told
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
    binary = require_tool("prometheus", "setup.sh installs Debian's package")
    running = []

    def start(target_port, scrape=None, alertmanager=None):
        """scrape: more of the scrape config (scheme, tls_config, basic_auth); alertmanager:
        the port of one to send alerts to."""
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
            **({"alerting": {"alertmanagers": [{"static_configs": [
                {"targets": [f"127.0.0.1:{alertmanager}"]}]}]}} if alertmanager else {}),
            "scrape_configs": [{"job_name": "keytrace", **(scrape or {}),
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


@pytest.fixture
def alertmanager(tmp_path):
    """(port, received): Debian's Alertmanager, routing every alert at once to a webhook
    receiver in this process; received collects the alerts it is sent."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    binary = require_tool("prometheus-alertmanager", "setup.sh installs it")
    received = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.extend(json.loads(body)["alerts"])
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    hook = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    (tmp_path / "alertmanager.yml").write_text(yaml.safe_dump({
        "route": {"receiver": "hook", "group_by": ["alertname", "instance", "pid"],
                  "group_wait": "1s", "group_interval": "1s", "repeat_interval": "1h"},
        "receivers": [{"name": "hook", "webhook_configs": [
            {"url": f"http://127.0.0.1:{hook.server_port}/", "send_resolved": False}]}]}))
    port = free_port()
    p = subprocess.Popen([binary, f"--config.file={tmp_path / 'alertmanager.yml'}",
                          f"--storage.path={tmp_path / 'am'}",
                          f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield port, received
    finally:
        terminate(p)
        hook.shutdown()
        hook.server_close()


def test_a_leaking_process_alert_reaches_alertmanager_with_its_library(
        agent, prometheus, alertmanager, bins):  # noqa: F811
    am_port, received = alertmanager
    a, agent_port = agent()
    assert "serving" in told(a.stderr)
    prometheus(agent_port, alertmanager=am_port)
    host = subprocess.Popen([bins["reload_host"], bins["libleaky"], "0", "200000"],
                            stderr=subprocess.DEVNULL)
    try:
        def delivered():
            return [x for x in received if x["labels"].get("alertname") ==
                    "KeytracePthreadKeysExhaustionSoon" and x["labels"].get("pid") == str(host.pid)]
        alerts = until(delivered, timeout=120)
        assert alerts, f"no alert reached the receiver; it got {received}"
        labels, notes = alerts[0]["labels"], alerts[0]["annotations"]
        assert labels["instance"] == f"127.0.0.1:{agent_port}" and labels["job"] == "keytrace"
        assert labels["exe"] == bins["reload_host"] and labels["resource"] == "keys"
        assert labels["library"] == bins["libleaky"] and labels["severity"] == "warning"
        assert alerts[0]["status"] == "firing"
        assert f"(pid {host.pid}, {bins['reload_host']}" in notes["description"]
        assert f"leaking pthread keys made by {bins['libleaky']}" in notes["description"]
        assert "predicted to run out of them in" in notes["description"]
    finally:
        terminate(host)


def test_prometheus_sees_the_series_and_the_exhaustion_alert(agent, prometheus, bins):  # noqa: F811
    a, agent_port = agent()
    assert "serving" in told(a.stderr)
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


def test_prometheus_scrapes_over_tls_with_a_client_certificate_and_basic_auth(
        agent, prometheus, tmp_path):  # noqa: F811
    from test_web import PASSWORD, _hash, _openssl, _signed
    d = tmp_path / "pki"
    d.mkdir()
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
             "ca.crt", "-days", "2", "-subj", "/CN=ca", cwd=d)
    _signed(d, "server", "ca", san="IP:127.0.0.1")
    _signed(d, "client", "ca")
    (d / "web.yml").write_text(
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
        "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.crt\n"
        f"basic_auth_users:\n  prometheus: {_hash()}\n")
    (d / "password").write_text(PASSWORD)
    a, agent_port = agent("--web-config", str(d / "web.yml"))
    line = told(a.stderr)
    assert f"serving https://127.0.0.1:{agent_port}/metrics (basic auth)" in line, line
    prom = prometheus(agent_port, scrape={
        "scheme": "https",
        "tls_config": {"ca_file": str(d / "ca.crt"), "cert_file": str(d / "client.crt"),
                       "key_file": str(d / "client.key")},
        "basic_auth": {"username": "prometheus", "password_file": str(d / "password")}})
    up = until(lambda: [r for r in query(prom, 'up{job="keytrace"}') if r["value"][1] == "1"],
               timeout=60)
    assert up, query(prom, 'up{job="keytrace"}')
    assert until(lambda: query(prom, "keytrace_build_info"), timeout=30)
