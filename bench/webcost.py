"""What TLS and basic auth cost a scrape of the agent's /metrics, side by side in one run:

    .venv/bin/python bench/webcost.py [--series 5000] [--scrapes 200]

One registry of N gauge series (about what 1,000 at-risk processes export), served by the
agent's own server (tracer.agent.web) three ways: plain HTTP, TLS (a self-signed RSA-2048
certificate made here with openssl), and TLS with basic auth (a bcrypt hash, cost 12). Each
scrape is a new connection, as with the agent's HTTP/1.0 server: TLS pays a handshake every
time. Rounds interleave the three; medians and ratios to plain HTTP. Writes
bench/results/WEBCOST.md. Servers are shut down on
every exit path.
"""
from __future__ import annotations

import argparse
import base64
import http.client
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tracer.agent import web  # noqa: E402
from results_file import save, table  # noqa: E402

PASSWORD = "bench-password"


def scrape(port: int, ctx, auth: str) -> float:
    t = time.perf_counter()
    conn = (http.client.HTTPSConnection("127.0.0.1", port, context=ctx) if ctx
            else http.client.HTTPConnection("127.0.0.1", port))
    conn.request("GET", "/metrics", headers={"Authorization": auth} if auth else {})
    r = conn.getresponse()
    body = r.read()
    conn.close()
    assert r.status == 200 and body, r.status
    return (time.perf_counter() - t) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--series", type=int, default=5000)
    ap.add_argument("--scrapes", type=int, default=200)
    args = ap.parse_args()
    import bcrypt
    from prometheus_client import CollectorRegistry, Gauge
    registry = CollectorRegistry()
    g = Gauge("keytrace_bench", "a series per process", ["pid", "comm", "exe", "container"],
              registry=registry)
    for i in range(args.series):
        g.labels(str(i), "apache2", "/usr/sbin/apache2", "").set(i)
    servers = []
    with tempfile.TemporaryDirectory() as d:
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                        f"{d}/k.pem", "-out", f"{d}/c.pem", "-days", "1", "-subj", "/CN=bench",
                        "-addext", "subjectAltName=IP:127.0.0.1"], check=True,
                       capture_output=True)
        hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(12)).decode()
        tls = f"tls_server_config:\n  cert_file: {d}/c.pem\n  key_file: {d}/k.pem\n"
        configs = {"plain HTTP": "", "TLS": tls,
                   "TLS + basic auth": tls + f"basic_auth_users:\n  bench: {hashed}\n"}
        ctx = ssl.create_default_context(cafile=f"{d}/c.pem")
        auth = "Basic " + base64.b64encode(f"bench:{PASSWORD}".encode()).decode()
        ports = {}
        try:
            for name, text in configs.items():
                path = Path(d) / f"{len(ports)}.yml"
                path.write_text(text or "{}\n")
                import socket
                with socket.socket() as s:
                    s.bind(("127.0.0.1", 0))
                    port = s.getsockname()[1]
                servers.append(web.serve(registry, "127.0.0.1", port, web.load(str(path))))
                ports[name] = port
            times = {name: [] for name in configs}
            for name in configs:  # warm: the first bcrypt check, caches
                scrape(ports[name], ctx if "TLS" in name else None, auth if "auth" in name else "")
            for _ in range(args.scrapes):
                for name in configs:
                    times[name].append(scrape(ports[name], ctx if "TLS" in name else None,
                                              auth if "auth" in name else ""))
        finally:
            for s in servers:
                s.shutdown()
                s.server_close()
    base = statistics.median(times["plain HTTP"])
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        p90 = sorted(ts)[int(len(ts) * 0.9)]
        rows.append((name, f"{med:.1f} ({p90:.1f})", f"{med - base:.1f}", f"{med / base:.2f}"))
    save("WEBCOST", "What TLS and basic auth cost a scrape",
         f"/metrics with {args.series} series, a new connection each scrape, median of "
         f"{args.scrapes} interleaved rounds.\n\n"
         + table(["/metrics served", "ms per scrape (median, p90)", "added ms", "x plain"], rows))

if __name__ == "__main__":
    main()
