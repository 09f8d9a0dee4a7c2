"""The agent's HTTP server, and its web config file in the format of Prometheus'
exporter-toolkit (`--web.config.file`): TLS, client certificates, and basic auth with bcrypt
hashes.

    tls_server_config:
      cert_file: server.crt          # relative paths: from the config file's directory
      key_file: server.key
      client_auth_type: RequireAndVerifyClientCert   # or VerifyClientCertIfGiven, NoClientCert
      client_ca_file: ca.crt
      min_version: TLS12             # TLS10..TLS13
    http_server_config:
      headers: {X-Frame-Options: deny}
    basic_auth_users:
      prometheus: $2b$12$...         # htpasswd -nBC 12 "" | tr -d ':\n', or python3 -c bcrypt

A file that does not parse, names a key the toolkit does not know, or points at a certificate
that does not load is a UsageError, found before anything is attached. Two client_auth_type
values of the toolkit ask for a certificate without verifying it; Python's ssl verifies every
certificate it asks for, so those are refused by name rather than served differently.

Checking a bcrypt hash takes tens of milliseconds by design; a scrape every 15 s would pay it
each time, so a credential once checked is remembered (by its SHA-256) for the agent's life,
as exporter-toolkit does. An unknown user is checked against a dummy hash, so a wrong user
and a wrong password take the same time.
"""
from __future__ import annotations

import base64
import hashlib
import os
import socket
import ssl
import sys
import threading
from dataclasses import dataclass, field
from typing import Optional
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from ..errors import UsageError

_TOP = {"tls_server_config", "http_server_config", "basic_auth_users"}
_TLS = {"cert_file", "key_file", "client_auth_type", "client_ca_file", "min_version",
        "max_version", "cipher_suites", "curve_preferences", "prefer_server_cipher_suites",
        "client_allowed_sans", "cert", "key"}
_TLS_SUPPORTED = {"cert_file", "key_file", "client_auth_type", "client_ca_file", "min_version",
                  "max_version"}
_HTTP = {"http2", "headers"}
_AUTH_TYPES = {"NoClientCert": ssl.CERT_NONE, "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
               "RequireAndVerifyClientCert": ssl.CERT_REQUIRED}
_UNVERIFIED = {"RequestClientCert", "RequireAnyClientCert"}
_VERSIONS = {"TLS10": ssl.TLSVersion.TLSv1, "TLS11": ssl.TLSVersion.TLSv1_1,
             "TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
_REALM = 'Basic realm="keytrace"'


@dataclass
class WebConfig:
    tls: Optional[ssl.SSLContext] = None
    users: dict = field(default_factory=dict)     # user -> bcrypt hash (bytes)
    headers: dict = field(default_factory=dict)   # added to every response
    source: str = ""

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"


def _fail(path: str, what: str) -> UsageError:
    return UsageError(f"--web-config {path}: {what}")


def _mapping(value, path: str, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _fail(path, f"{where} must be a mapping")
    return value


def _unknown(given: dict, known: set, path: str, where: str) -> None:
    extra = sorted(set(given) - known)
    if extra:
        raise _fail(path, f"unknown field {extra[0]!r} in {where} (known: {', '.join(sorted(known))})")


def load(path: str) -> WebConfig:
    """The web config at path, checked whole: certificates and keys loaded, hashes parsed.
    Raises UsageError (one line) for anything wrong."""
    import yaml
    try:
        with open(path, encoding="utf-8") as fh:
            doc = yaml.safe_load(fh)
    except OSError as e:
        raise _fail(path, e.strerror or str(e)) from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise _fail(path, "not YAML: " + " ".join(str(e).split())) from None
    doc = _mapping(doc, path, "the file")
    _unknown(doc, _TOP, path, "the file")
    base = os.path.dirname(os.path.abspath(path))
    config = WebConfig(source=path)

    tls = _mapping(doc.get("tls_server_config"), path, "tls_server_config")
    _unknown(tls, _TLS, path, "tls_server_config")
    unsupported = sorted(set(tls) - _TLS_SUPPORTED)
    if unsupported:
        raise _fail(path, f"tls_server_config.{unsupported[0]} is not supported by keytrace")
    if tls:
        config.tls = _context(tls, base, path)

    http = _mapping(doc.get("http_server_config"), path, "http_server_config")
    _unknown(http, _HTTP, path, "http_server_config")
    headers = _mapping(http.get("headers"), path, "http_server_config.headers")
    config.headers = {str(k): str(v) for k, v in headers.items()}

    users = _mapping(doc.get("basic_auth_users"), path, "basic_auth_users")
    for user, hashed in users.items():
        raw = str(hashed).encode()
        if not raw.startswith((b"$2a$", b"$2b$", b"$2y$")) or len(raw) != 60:
            raise _fail(path, f"basic_auth_users.{user}: not a bcrypt hash ($2b$... 60 "
                              "characters)")
        config.users[str(user)] = raw
    return config


def _file(tls: dict, key: str, base: str, path: str) -> str:
    name = tls.get(key)
    if not name:
        raise _fail(path, f"tls_server_config.{key} is required")
    full = os.path.join(base, str(name))
    if not os.path.isfile(full):
        raise _fail(path, f"tls_server_config.{key}: no file {full}")
    return full


def _context(tls: dict, base: str, path: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert, key = _file(tls, "cert_file", base, path), _file(tls, "key_file", base, path)
    try:
        ctx.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as e:
        raise _fail(path, f"cert_file and key_file do not load: {e.strerror or e}") from None
    kind = tls.get("client_auth_type", "NoClientCert")
    if kind in _UNVERIFIED:
        raise _fail(path, f"client_auth_type {kind} asks for a certificate without verifying "
                          "it, which Python's ssl cannot do: use VerifyClientCertIfGiven or "
                          "RequireAndVerifyClientCert")
    if kind not in _AUTH_TYPES:
        raise _fail(path, f"client_auth_type {kind!r} is not one of "
                          f"{', '.join(sorted(_AUTH_TYPES | _UNVERIFIED))}")
    ctx.verify_mode = _AUTH_TYPES[kind]
    if kind != "NoClientCert":
        ca = _file(tls, "client_ca_file", base, path)
        try:
            ctx.load_verify_locations(cafile=ca)
        except (ssl.SSLError, OSError) as e:
            raise _fail(path, f"client_ca_file does not load: {e.strerror or e}") from None
    elif tls.get("client_ca_file"):
        raise _fail(path, "client_ca_file is given but client_auth_type is NoClientCert")
    for name, attr in (("min_version", "minimum_version"), ("max_version", "maximum_version")):
        if name in tls:
            if tls[name] not in _VERSIONS:
                raise _fail(path, f"{name} {tls[name]!r} is not one of {', '.join(_VERSIONS)}")
            setattr(ctx, attr, _VERSIONS[tls[name]])
    return ctx


class Auth:
    """Basic auth against bcrypt hashes, each credential checked once (then remembered)."""

    def __init__(self, users: dict):
        import bcrypt
        self.users, self._bcrypt = users, bcrypt
        self._dummy = next(iter(users.values()), None)
        self._good: set = set()
        self._lock = threading.Lock()

    def allows(self, header: str) -> bool:
        if not self.users:
            return True
        scheme, _, value = (header or "").partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, sep, password = base64.b64decode(value, validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        if not sep:
            return False
        seen = hashlib.sha256(f"{user}\0{password}".encode()).digest()
        with self._lock:
            if seen in self._good:
                return True
        hashed = self.users.get(user)
        ok = self._bcrypt.checkpw(password.encode(), hashed or self._dummy) and hashed is not None
        if ok:
            with self._lock:
                self._good.add(seen)
        return ok


def app(inner, config: WebConfig):
    """The WSGI app serving inner (prometheus_client's) behind the config's basic auth and
    headers."""
    auth = Auth(config.users)
    extra = list(config.headers.items())

    def serve(environ, start_response):
        if not auth.allows(environ.get("HTTP_AUTHORIZATION", "")):
            start_response("401 Unauthorized", [("WWW-Authenticate", _REALM),
                                                ("Content-Type", "text/plain")] + extra)
            return [b"Unauthorized\n"]

        def start(status, headers, exc_info=None):
            return start_response(status, list(headers) + extra, exc_info)
        return inner(environ, start)
    return serve


class _Quiet(WSGIRequestHandler):
    def log_message(self, *args):  # a scrape every few seconds is no news
        pass


class _Server(WSGIServer):
    daemon_threads = True
    tls: Optional[ssl.SSLContext] = None

    def get_request(self):
        sock, addr = super().get_request()
        sock.settimeout(10.0)  # a client that stalls holds a thread for no longer
        if self.tls is not None:
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr

    def finish_request(self, request, client_address):
        if self.tls is not None:
            # In the request's own thread: a slow or refused handshake holds up no other.
            request.do_handshake()
        super().finish_request(request, client_address)

    def handle_error(self, request, client_address):
        # A plain-HTTP client at a TLS port, a refused certificate, a reset: the client's
        # problem, told to the client by the handshake; no traceback on the agent's stderr.
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


def _family(host: str) -> int:
    infos = socket.getaddrinfo(host or None, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    return infos[0][0]


def serve(registry, host: str, port: int, config: Optional[WebConfig] = None):
    """Serve registry's metrics at http(s)://host:port/metrics in a daemon thread; returns the
    server (server.shutdown() ends it). Raises OSError when it cannot listen."""
    from socketserver import ThreadingMixIn

    from prometheus_client import make_wsgi_app
    config = config or WebConfig()

    class Server(ThreadingMixIn, _Server):
        address_family = _family(host)
    Server.tls = config.tls
    httpd = make_server(host, port, app(make_wsgi_app(registry), config), Server,
                        handler_class=_Quiet)
    threading.Thread(target=httpd.serve_forever, name="keytrace-http", daemon=True).start()
    return httpd
