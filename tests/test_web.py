"""The agent's web config (exporter-toolkit's format), against a real server on loopback: TLS
refuses plain HTTP, basic auth with bcrypt hashes refuses wrong or missing credentials and
serves the right ones, a required client certificate is enforced, and a bad file is one line
and exit 2 before anything is attached. The certificates are made here with openssl."""
from __future__ import annotations

import base64
import http.client
import os
import ssl
import subprocess

import bcrypt
import pytest
from prometheus_client import CollectorRegistry, Gauge

from tracer.agent import web
from tracer.errors import UsageError
from conftest import keytrace, uprobe_events
from test_agent import free_port

PASSWORD = "s3cret-scrape"


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _signed(d, name: str, ca: str, san: str = ""):
    _openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
             f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
    ext = d / f"{name}.ext"
    ext.write_text(f"subjectAltName={san}\n" if san else "basicConstraints=CA:FALSE\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", str(ext), cwd=d)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1 it signed, a client certificate it signed, and
    a client certificate of another CA."""
    d = tmp_path_factory.mktemp("pki")
    for ca in ("ca", "rogue-ca"):
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{ca}.key", "-out",
                 f"{ca}.crt", "-days", "2", "-subj", f"/CN={ca}", cwd=d)
    _signed(d, "server", "ca", san="IP:127.0.0.1,DNS:localhost")
    _signed(d, "client", "ca")
    _signed(d, "rogue", "rogue-ca")
    return d


@pytest.fixture
def served(tmp_path):
    """serve(config text) -> port: a real server of a registry with one gauge, behind the web
    config; every server is shut down at the end."""
    servers = []

    def start(text: str) -> int:
        path = tmp_path / "web.yml"
        path.write_text(text)
        registry = CollectorRegistry()
        Gauge("keytrace_web_test", "a gauge to scrape", registry=registry).set(7)
        port = free_port()
        servers.append(web.serve(registry, "127.0.0.1", port, web.load(str(path))))
        return port
    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def _tls(pki, client: str = "") -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    if client:
        ctx.load_cert_chain(str(pki / f"{client}.crt"), str(pki / f"{client}.key"))
    return ctx


def get(port: int, ctx=None, user: str = "", password: str = ""):
    """(status, headers, body) of GET /metrics."""
    conn = (http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10) if ctx
            else http.client.HTTPConnection("127.0.0.1", port, timeout=10))
    headers = {}
    if user:
        headers["Authorization"] = "Basic " + base64.b64encode(
            f"{user}:{password}".encode()).decode()
    try:
        conn.request("GET", "/metrics", headers=headers)
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read().decode()
    finally:
        conn.close()


def _hash(password: str = PASSWORD) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=10)).decode()


def tls_config(pki, extra: str = "") -> str:
    return (f"tls_server_config:\n  cert_file: {pki}/server.crt\n  key_file: {pki}/server.key\n"
            + extra)


def test_plain_http_to_a_tls_listener_fails(pki, served):
    port = served(tls_config(pki))
    with pytest.raises((http.client.HTTPException, OSError)):
        get(port)
    status, _, body = get(port, _tls(pki))
    assert status == 200 and "keytrace_web_test 7.0" in body


def test_basic_auth_refuses_wrong_or_missing_credentials_and_serves_the_right_ones(pki, served,
                                                                                   monkeypatch):
    port = served(tls_config(pki) + f"basic_auth_users:\n  prometheus: {_hash()}\n"
                  "http_server_config:\n  headers:\n    X-Frame-Options: deny\n")
    ctx = _tls(pki)
    status, headers, _ = get(port, ctx)
    assert status == 401 and headers["WWW-Authenticate"].startswith("Basic")
    assert get(port, ctx, "prometheus", "wrong")[0] == 401
    assert get(port, ctx, "nobody", PASSWORD)[0] == 401
    assert get(port, ctx, "prometheus", "")[0] == 401
    status, headers, body = get(port, ctx, "prometheus", PASSWORD)
    assert status == 200 and "keytrace_web_test 7.0" in body
    assert headers["X-Frame-Options"] == "deny"
    # once checked, a credential is remembered: the next scrape pays no bcrypt
    checks = []
    real = bcrypt.checkpw
    monkeypatch.setattr(bcrypt, "checkpw", lambda *a: checks.append(1) or real(*a))
    assert get(port, ctx, "prometheus", PASSWORD)[0] == 200
    assert checks == []
    assert get(port, ctx, "prometheus", "wrong")[0] == 401  # (a wrong one never is)
    assert checks == [1]


def test_basic_auth_over_plain_http(served):
    port = served(f"basic_auth_users:\n  prometheus: {_hash()}\n")
    assert get(port)[0] == 401
    assert get(port, None, "prometheus", PASSWORD)[0] == 200


def test_a_client_without_the_required_certificate_is_refused(pki, served):
    port = served(tls_config(pki, f"  client_auth_type: RequireAndVerifyClientCert\n"
                                  f"  client_ca_file: {pki}/ca.crt\n"))
    for client in ("", "rogue"):  # none, and one of another CA
        with pytest.raises((ssl.SSLError, OSError, http.client.HTTPException)):
            get(port, _tls(pki, client))
    status, _, body = get(port, _tls(pki, "client"))
    assert status == 200 and "keytrace_web_test" in body


def test_a_client_certificate_if_given_must_verify(pki, served):
    port = served(tls_config(pki, f"  client_auth_type: VerifyClientCertIfGiven\n"
                                  f"  client_ca_file: {pki}/ca.crt\n  min_version: TLS12\n"))
    assert get(port, _tls(pki))[0] == 200
    assert get(port, _tls(pki, "client"))[0] == 200
    with pytest.raises((ssl.SSLError, OSError, http.client.HTTPException)):
        get(port, _tls(pki, "rogue"))


BAD = {
    "missing.yml": (None, "No such file"),
    "yaml.yml": ("tls_server_config: [unclosed\n", "not YAML"),
    "unknown.yml": ("tls_config:\n  cert_file: x\n", "unknown field 'tls_config'"),
    "hash.yml": ("basic_auth_users:\n  prometheus: plaintext\n", "not a bcrypt hash"),
    "nocert.yml": ("tls_server_config:\n  key_file: server.key\n", "cert_file is required"),
    "nofile.yml": ("tls_server_config:\n  cert_file: nope.crt\n  key_file: nope.key\n",
                   "no file"),
    "unverified.yml": ("tls_server_config:\n  cert_file: {pki}/server.crt\n  key_file: "
                       "{pki}/server.key\n  client_auth_type: RequireAnyClientCert\n",
                       "RequireAnyClientCert asks for a certificate without verifying"),
    "mismatch.yml": ("tls_server_config:\n  cert_file: {pki}/server.crt\n  key_file: "
                     "{pki}/client.key\n", "do not load"),
    "noca.yml": ("tls_server_config:\n  cert_file: {pki}/server.crt\n  key_file: "
                 "{pki}/server.key\n  client_auth_type: RequireAndVerifyClientCert\n",
                 "client_ca_file is required"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_a_bad_web_config_is_one_line_and_exit_2_before_anything_is_attached(name, pki,
                                                                             tmp_path):
    text, message = BAD[name]
    path = tmp_path / name
    if text is not None:
        path.write_text(text.format(pki=pki))
    with pytest.raises(UsageError, match=message):
        web.load(str(path))
    root = os.geteuid() == 0  # (tracefs is root's to read; nothing else could attach)
    before = uprobe_events() if root else None
    r = keytrace("agent", "--web-config", str(path), "--listen", f"127.0.0.1:{free_port()}",
                 "--state-dir", str(tmp_path / "state"), timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert message in r.stderr and str(path) in r.stderr
    assert (uprobe_events() if root else None) == before
    assert not os.path.exists(tmp_path / "state")
