"""What a fleet installs is a wheel, not a checkout: build it, install it into a fresh virtual
environment, and trace with it from another directory (the probes must ship inside)."""
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import json_rows

ROOT = Path(__file__).resolve().parent.parent


def test_the_wheel_traces_from_anywhere(bpf, bins, tmp_path):
    # Built from a clean copy: setuptools' build/ directory in a checkout can hold stale modules.
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info",
                                                             "__pycache__", "results"))
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(src)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = dist.glob("keytrace-*.whl")
    venv = tmp_path / "venv"
    # Debian's bcc is importable from /usr/bin/python3 only: the venv sees it through
    # --system-site-packages, as README's set-up does.
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--system-site-packages", str(venv)], check=True)
    subprocess.run([venv / "bin/python", "-m", "pip", "install", "-q", str(wheel)], check=True,
                   capture_output=True, timeout=600)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run([venv / "bin/python", "-c", "import tracer; print(tracer.__file__)"],
                           capture_output=True, text=True, cwd=elsewhere, check=True).stdout
    assert where.startswith(str(venv)), where
    res = subprocess.run([venv / "bin/keytrace", "watch", "--json", "--", bins["reload_host"],
                          bins["libleaky"], "3"], capture_output=True, text=True, cwd=elsewhere,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    (row,) = json_rows(res.stdout)
    assert (row["creates"], row["live_keys"], row["leaking"]) == (3, 3, True)
    # every command's modules and probe units are in the wheel
    res = subprocess.run([venv / "bin/keytrace", "calls", "-c", "--json", "-e", "pthread_key_create",
                          "--", bins["reload_host"], bins["libleaky"], "3"], capture_output=True,
                         text=True, cwd=elsewhere, timeout=120)
    assert res.returncode == 0, res.stderr
    assert [r["calls"] for r in json_rows(res.stdout) if "calls" in r] == [3]
    res = subprocess.run([venv / "bin/python", "-c", "import tracer.agent.exporter, tracer.calls"],
                         capture_output=True, text=True, cwd=elsewhere, timeout=60)
    assert res.returncode == 0, res.stderr


def test_every_package_of_the_tree_is_in_the_wheel():
    import tomllib
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    tree = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "tracer").rglob("__init__.py")}
    assert tree <= listed, f"packages missing from pyproject.toml: {sorted(tree - listed)}"
