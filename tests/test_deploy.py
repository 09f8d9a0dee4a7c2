"""The deployment files: the Prometheus alerting rules, their promtool unit tests, and the
systemd unit of `keytrace agent`.

promtool comes from Debian's `prometheus` package. Without it the promtool tests skip, except
under KEYTRACE_REQUIRE_BPF=1 (CI), where a missing promtool is a failure, so CI cannot pass by
skipping them. systemd-analyze is part of systemd; where it is missing that test skips.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "keytrace-rules.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "keytrace-rules.test.yml"
UNIT = ROOT / "deploy" / "systemd" / "keytrace-agent.service"
REQUIRED = os.environ.get("KEYTRACE_REQUIRE_BPF") == "1"

ALERTS = {"KeytracePthreadKeysNearLimit", "KeytracePthreadKeysExhaustionSoon",
          "KeytracePthreadKeyCreateFailed", "KeytracePthreadKeysOrphaned", "KeytraceEventsLost",
          "KeytraceResourceNearLimit", "KeytraceResourceExhaustionSoon", "KeytraceHandlerDangling"}
# The metric names the agent exports, as its collector declares them (the rules may use no
# others): one family per name, even with no process to report.
def _exported() -> set:
    import types

    from tracer.agent.exporter import Collector, Snapshot
    return {f.name + ("_total" if f.type == "counter" else "")
            for f in Collector(types.SimpleNamespace(snapshot=Snapshot())).collect()}


METRICS = _exported()
CAPABILITIES = {"cap_bpf", "cap_perfmon", "cap_sys_ptrace", "cap_sys_resource", "cap_sys_admin"}

import yaml  # (a dependency of keytrace: the agent's --web-config is YAML)


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        msg = f"{name} not found (apt-get install --no-install-recommends prometheus)"
        if REQUIRED:
            pytest.fail(f"{msg}; it is required under KEYTRACE_REQUIRE_BPF=1")
        pytest.skip(msg)
    return path


def _run(*cmd: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)


# --- (a) promtool ---------------------------------------------------------------------------

def test_promtool_check_rules():
    r = _run(_tool("promtool"), "check", "rules", str(RULES.relative_to(ROOT)))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in r.stdout, r.stdout


def test_promtool_test_rules():
    r = _run(_tool("promtool"), "test", "rules", str(RULE_TESTS.relative_to(ROOT)))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout and "FAILED" not in r.stdout, r.stdout


# --- (b) every rule has a firing and a quiet case ---------------------------------------------

def _rules() -> list[dict]:
    doc = yaml.safe_load(RULES.read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def _cases() -> list[tuple[str, list]]:
    """(alertname, exp_alerts) per alert_rule_test entry."""
    doc = yaml.safe_load(RULE_TESTS.read_text())
    return [(t["alertname"], t.get("exp_alerts") or [])
            for group in doc["tests"] for t in group.get("alert_rule_test") or []]


def test_every_rule_has_firing_and_quiet_cases():
    alerts = {r["alert"] for r in _rules() if "alert" in r}
    cases = [(name, bool(exp)) for name, exp in _cases()]
    assert alerts == ALERTS
    # A case naming no rule passes promtool silently when it expects nothing: catch typos.
    unknown = {name for name, _ in cases} - alerts
    assert not unknown, f"tests name alerts that no rule defines: {sorted(unknown)}"
    missing = [f"{a}: no {kind} case" for a in sorted(alerts)
               for kind, want in (("firing", True), ("non-firing", False))
               if (a, want) not in cases]
    assert not missing, "; ".join(missing)


def test_rules_are_labelled_and_annotated():
    """Each rule has a severity, and summary and description annotations, the description
    naming the series through $labels; each firing case expects those labels and annotations."""
    rules = {r["alert"]: r for r in _rules()}
    for name, rule in rules.items():
        assert rule.get("labels", {}).get("severity") in ("info", "warning", "critical"), name
        ann = rule.get("annotations", {})
        assert ann.get("summary") and ann.get("description"), name
        assert "$labels." in ann["description"], name
        used = set(re.findall(r"\bkeytrace_\w+", rule["expr"]))
        assert used <= METRICS, f"{name} uses metrics the agent does not export: {used - METRICS}"
    for name, exp in _cases():
        for alert in exp:
            assert alert["exp_labels"]["severity"] == rules[name]["labels"]["severity"], name
            assert set(alert.get("exp_annotations", {})) >= {"summary", "description"}, name


# --- (c) the systemd unit -------------------------------------------------------------------

def test_systemd_unit_verifies(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not found")
    text = UNIT.read_text()
    assert re.search(r"^ExecStart=/usr/local/bin/keytrace agent\s*$", text, re.M)
    # `systemd-analyze verify` fails when ExecStart's binary does not exist, and
    # /usr/local/bin/keytrace exists only on a host where keytrace was installed there. Verify a
    # copy whose ExecStart names an executable that does exist: the venv's keytrace, else this
    # Python. Everything else in the unit is verified as written.
    exe = Path(sys.executable).parent / "keytrace"
    exe = exe if os.access(exe, os.X_OK) else Path(sys.executable)
    unit = tmp_path / UNIT.name
    unit.write_text(re.sub(r"^ExecStart=/usr/local/bin/keytrace", f"ExecStart={exe}", text,
                           flags=re.M))
    r = _run(analyze, "verify", str(unit))
    assert r.returncode == 0, r.stdout + r.stderr
    # verify exits 0 on an unknown key or a bad value ("ignoring"): any message about the unit
    # file is a failure.
    complaints = [ln for ln in (r.stdout + r.stderr).splitlines() if UNIT.name in ln]
    assert not complaints, "\n".join(complaints)
    # An unknown capability name is dropped without a word; the debug dump of the loaded unit
    # shows what systemd parsed (where this systemd prints it).
    env = dict(os.environ, SYSTEMD_LOG_LEVEL="debug")
    dump = _run(analyze, "verify", str(unit), env=env)
    for key in ("CapabilityBoundingSet", "AmbientCapabilities"):
        m = re.search(rf"^\s*{key}:\s*(.*)$", dump.stdout + dump.stderr, re.M)
        assert m, f"systemd-analyze showed no {key}: the capabilities cannot be checked"
        assert CAPABILITIES <= set(m.group(1).split()), f"{key}: {m.group(1)}"


def test_systemd_unit_contents():
    text = UNIT.read_text()
    keys = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";")):
            k, v = line.split("=", 1)
            keys.setdefault(k.strip(), []).append(v.strip())
    assert keys["Type"] == ["simple"]
    assert keys["Restart"] == ["on-failure"]
    assert "RestartSec" in keys
    assert keys["StateDirectory"] == ["keytrace"] and keys["CacheDirectory"] == ["keytrace"]
    assert keys["WantedBy"] == ["multi-user.target"]
    assert any("agent.md" in d for d in keys["Documentation"])
    for key in ("CapabilityBoundingSet", "AmbientCapabilities"):
        assert {c.lower() for c in keys[key][0].split()} == CAPABILITIES, key
    # Hardening that would stop tracing or hide processes stays off.
    for key, bad in (("ProtectKernelTunables", "yes"), ("ProtectKernelModules", "yes"),
                     ("PrivateTmp", "yes"), ("ProtectProc", "invisible"), ("ProcSubset", "pid")):
        assert bad not in keys.get(key, []), f"{key}={bad} breaks the agent"


# --- the Kubernetes DaemonSet and its scrape config ---------------------------------------------

DAEMONSET = ROOT / "deploy" / "kubernetes" / "keytrace-agent.yaml"


def _validate(path: Path) -> subprocess.CompletedProcess:
    tool = shutil.which("kubernetes-validate") or str(Path(sys.executable).parent /
                                                       "kubernetes-validate")
    if not os.path.exists(tool):
        if REQUIRED:
            pytest.fail("kubernetes-validate is not installed (pip install -e '.[test]')")
        pytest.skip("kubernetes-validate is not installed")
    return subprocess.run([tool, "--strict", str(path)], capture_output=True, text=True)


def test_the_daemonset_passes_the_kubernetes_schema_and_a_broken_one_does_not(tmp_path):
    import yaml
    r = _validate(DAEMONSET)
    assert r.returncode == 0, r.stdout + r.stderr
    docs = list(yaml.safe_load_all(DAEMONSET.read_text()))
    (ds,) = [d for d in docs if d["kind"] == "DaemonSet"]
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostPID"] is True
    caps = pod["containers"][0]["securityContext"]["capabilities"]["add"]
    assert {"BPF", "PERFMON", "SYS_PTRACE", "SYS_RESOURCE", "SYS_ADMIN"} <= set(caps)
    # the check can fail: a field the schema does not know, a wrong type
    pod["hostPid"] = True
    pod["containers"][0]["ports"][0]["containerPort"] = "metrics"
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump_all(docs))
    assert _validate(broken).returncode != 0


def test_the_daemonset_scrape_config_is_a_valid_prometheus_config(tmp_path):
    import yaml
    (cm,) = [d for d in yaml.safe_load_all(DAEMONSET.read_text()) if d["kind"] == "ConfigMap"]
    text = cm["data"]["keytrace-scrape.yml"]
    for name in ("ca.crt", "password"):  # the files it names, made here
        (tmp_path / name).write_text("x\n")
        text = text.replace(f"/etc/prometheus/keytrace/{name}", str(tmp_path / name))
    # Debian builds Prometheus without Kubernetes discovery ("field kubernetes_sd_configs not
    # found"): promtool checks the rest (TLS, basic auth, the relabelling) with the discovery
    # swapped for a static target; the discovery block is checked for its documented shape.
    config = yaml.safe_load(text)
    (job,) = config["scrape_configs"]
    (sd,) = job.pop("kubernetes_sd_configs")
    assert sd == {"role": "pod", "namespaces": {"names": ["keytrace"]}}
    job["static_configs"] = [{"targets": ["10.0.0.1:10451"]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    r = _run(_tool("promtool"), "check", "config", str(tmp_path / "prometheus.yml"))
    assert r.returncode == 0, r.stdout + r.stderr
    sources = [tuple(rule.get("source_labels", ())) for rule in job["relabel_configs"]]
    assert ("__meta_kubernetes_pod_annotation_keytrace_io_scrape",) in sources
