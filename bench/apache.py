"""The agent's cost on real work: Apache (prefork) with mod_php serving a PHP page on loopback,
driven by ab, agent off and on in interleaved rounds: `sudo .venv/bin/python bench/apache.py`.

Needs Debian's apache2, libapache2-mod-php and apache2-utils (ab); it runs its own Apache on
127.0.0.1 with a private configuration and document root, and ends it (and the agent) on every
exit path. Reports requests per second, medians and the loss; writes bench/results/APACHE.md.
"""
from __future__ import annotations

import argparse
import glob
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.agent import free_port, settle, spawn, _children  # noqa: E402

RESULTS = ROOT / "bench" / "results"
MODULES = "/usr/lib/apache2/modules"
PAGE = """<?php
// a page with some PHP work: what a graceful-restarted mod_php host serves all day
$words = [];
for ($i = 0; $i < 200; $i++) { $words[] = md5((string)$i); }
sort($words);
echo count($words), " ", $words[0], "\\n";
"""


def config(work: Path, port: int) -> Path:
    php = sorted(glob.glob(f"{MODULES}/libphp*.so"))
    if not php or not shutil.which("ab"):
        sys.exit("bench/apache.py needs: apt-get install apache2 libapache2-mod-php apache2-utils")
    (work / "htdocs").mkdir()
    (work / "htdocs" / "index.php").write_text(PAGE)
    conf = work / "httpd.conf"
    conf.write_text(f"""ServerRoot {work}
ServerName 127.0.0.1
Listen 127.0.0.1:{port}
PidFile {work}/httpd.pid
ErrorLog {work}/error.log
User www-data
Group www-data
LoadModule mpm_prefork_module {MODULES}/mod_mpm_prefork.so
LoadModule authz_core_module {MODULES}/mod_authz_core.so
LoadModule mime_module {MODULES}/mod_mime.so
TypesConfig /etc/mime.types
LoadModule dir_module {MODULES}/mod_dir.so
LoadModule php_module {php[-1]}
StartServers 4
MinSpareServers 4
MaxRequestWorkers 16
DocumentRoot {work}/htdocs
<Directory {work}/htdocs>
    Require all granted
</Directory>
DirectoryIndex index.php
<FilesMatch "\\.php$">
    SetHandler application/x-httpd-php
</FilesMatch>
""")
    return conf


def ab(port: int, n: int, c: int) -> float:
    out = subprocess.run(["ab", "-q", "-n", str(n), "-c", str(c), f"http://127.0.0.1:{port}/index.php"],
                         capture_output=True, text=True, timeout=600)
    m = re.search(r"Requests per second:\s+([\d.]+)", out.stdout)
    failed = re.search(r"Failed requests:\s+(\d+)", out.stdout)
    if not m or (failed and int(failed.group(1))):
        raise RuntimeError(f"ab failed: {out.stdout[-400:]} {out.stderr[-400:]}")
    return float(m.group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("-n", type=int, default=20000, help="requests per ab run")
    ap.add_argument("-c", type=int, default=8, help="ab concurrency")
    ap.add_argument("--tables-interval", type=float, default=60.0, help="the agent's reads of "
                    "every other table (fds, threads, maps, timers), as its own option; its "
                    "default, 60 s, reads them once per ab run")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="keytrace-apache-bench-"))
    work.chmod(0o755)
    port, agent_port = free_port(), free_port()
    httpd = agent = None
    off, on = [], []
    try:
        # its own session: prefork ends by signalling its whole process group
        httpd = spawn(["apache2", "-f", str(config(work, port)), "-DFOREGROUND"],
                      start_new_session=True)
        time.sleep(2)
        ab(port, 2000, args.c)  # warm up: workers forked, PHP's opcache-less compile cached
        for r in range(args.rounds):
            off.append(ab(port, args.n, args.c))
            agent = spawn([sys.executable, "-m", "tracer.cli", "agent", "--listen",
                           f"127.0.0.1:{agent_port}", "--state-dir", str(work / "state"),
                           "--tables-interval", str(args.tables_interval)],
                          stderr=subprocess.PIPE, text=True, cwd=ROOT)
            line = agent.stderr.readline()
            while line.startswith("keytrace: compiling the probes"):  # a first run's note
                line = agent.stderr.readline()
            if "serving" not in line:
                raise RuntimeError("the agent did not start")
            settle(agent_port, 6)
            on.append(ab(port, args.n, args.c))
            agent.send_signal(signal.SIGTERM)
            agent.wait(60)
            print(f"  round {r + 1}: agent off {off[-1]:.0f} req/s, on {on[-1]:.0f} req/s", flush=True)
    finally:
        for p in _children:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in _children:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(work, ignore_errors=True)
    m_off, m_on = statistics.median(off), statistics.median(on)
    text = (f"# The agent on Apache + mod_php\n\nMeasured {time.strftime('%Y-%m-%d')} by "
            f"`bench/apache.py`: ab -n {args.n} -c {args.c} on a PHP page, Apache prefork with "
            f"mod_php on loopback, {args.rounds} interleaved rounds.\n\n"
            "| agent | requests/s, median (range) |\n|---|---|\n"
            f"| off | {m_off:.0f} ({min(off):.0f}-{max(off):.0f}) |\n"
            f"| on | {m_on:.0f} ({min(on):.0f}-{max(on):.0f}) |\n\n"
            f"Throughput loss with the agent on: {100 * (1 - m_on / m_off):.1f} % (target <= 2 %).\n")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "APACHE.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
