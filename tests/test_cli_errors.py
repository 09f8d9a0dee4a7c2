"""Bad input gets one clear line on stderr and its documented exit status (2 for a usage
error, 1 for anything else), never a traceback."""
import os
import re
import subprocess
import sys

from conftest import keytrace


def assert_one_line_error(res, text, code=1):
    """One line on stderr, and the documented exit status: 2 for a usage error, 1 else."""
    assert res.returncode == code, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr, res.stderr
    assert res.stderr.startswith("keytrace: error: "), res.stderr
    assert text in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_a_missing_pid(bpf):
    assert_one_line_error(keytrace("watch", "--pid", "999999999"), "no process with pid 999999999")


def test_an_unknown_command(bpf):
    assert_one_line_error(keytrace("watch", "--", "/no/such/program"), "command not found")


def test_unknown_output_extension():
    for cmd in (["watch"], ["scan"]):  # (calls -o writes text unless the extension is data's)
        assert_one_line_error(keytrace(*cmd, "-o", "events.xlsx", "--", "true") if cmd[0] != "scan"
                              else keytrace("scan", "-o", "events.xlsx"),
                              "cannot tell the format", code=2)


def unprivileged() -> list:
    """A command prefix that runs as a user without tracing privileges: nobody where nobody can
    read this checkout, else uid 0 without a capability (the same check, the same message)."""
    if os.geteuid() != 0:
        return []
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"]
    probe = subprocess.run([*nobody, sys.executable, "-c", "import tracer.cli"],
                           capture_output=True, cwd="/")
    return nobody if probe.returncode == 0 else ["setpriv", "--bounding-set=-all", "--inh-caps=-all"]


def as_unprivileged(*args):
    return subprocess.run([*unprivileged(), sys.executable, "-m", "tracer.cli", *args],
                          capture_output=True, text=True, cwd="/", env={**os.environ, "HOME": "/"})


def test_usage_errors_come_before_anything_is_spawned(tmp_path):
    # (no bpf fixture: these must fail even where tracing is impossible, before trying it.) The
    # command leaves a mark if it ever runs: a usage error must come before the spawn. Without
    # privileges, the usage error still comes first (usage, then the target, then privileges).
    tmp_path.chmod(0o777)
    mark = tmp_path / "ran"
    cmd = ["--", "touch", str(mark)]
    for args, text in ((["watch", "--ring-pages", "3", *cmd], "power of two"),
                       (["calls", "-e", "libc:", *cmd], "empty function"),
                       (["watch", "-r", "nonsense", *cmd], "no resource 'nonsense'"),
                       (["watch", "--pair", "libc:fopen", *cmd], "--pair"),
                       (["calls", "-e", "getpid", "-p", "1", *cmd], "exclude each other"),
                       (["calls", "-e", "getpid", "-r", "-t", *cmd], "exclude each other"),
                       (["calls", "-e", "std::*", *cmd], "add -C"),
                       (["calls", "-e", "open", "-e", "!open64", *cmd], "open64 is another name"),
                       (["calls", "-e", "!malloc", *cmd], "nothing to trace"),
                       (["watch", "--sites", "sideways", *cmd], "planned or entry"),
                       (["watch", "-o", str(tmp_path / "out.xlsx"), *cmd], "xlsx"),
                       (["scan", "-r", "nonsense"], "no resource 'nonsense'")):
        for run in (keytrace, as_unprivileged):
            assert_one_line_error(run(*args), text, code=2)
            assert not mark.exists(), f"{args}: the command ran before the usage error"


def test_a_missing_pid_comes_before_privileges():
    for cmd in ("watch", "calls"):
        extra = ["-e", "getpid"] if cmd == "calls" else []
        assert_one_line_error(as_unprivileged(cmd, *extra, "-p", "999999999"),
                              "no process with pid 999999999")


def test_not_root():
    res = as_unprivileged("watch", "--", "true")
    assert_one_line_error(res, "privileges")
    assert "run as root" in res.stderr


def test_every_command_has_help_with_examples():
    for cmd in COMMANDS:
        res = keytrace(cmd, "--help")
        assert res.returncode == 0 and "Example" in res.stdout, res.stdout


def test_doctor_passes_here(bpf):
    res = keytrace("doctor")
    assert res.returncode == 0, res.stdout
    assert "FAIL" not in res.stdout and "kernel headers" in res.stdout
    assert "all probes detach at once" in res.stdout  # uprobe_multi links: this kernel has them
    assert re.search(r"compiled probes .* probe set\(s\) kept in /", res.stdout), res.stdout


COMMANDS = ["calls", "agent", "watch", "report", "demo", "scan", "doctor"]


def test_every_option_of_every_command_is_in_the_docs():
    """Each option a command's --help lists appears in the README or docs/: an option added
    without its documentation fails here."""
    import re
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    docs = (root / "README.md").read_text() + "".join(
        p.read_text() for p in sorted((root / "docs").glob("*.md")))
    missing = []
    for cmd in COMMANDS:
        r = keytrace(cmd, "--help", env={**__import__("os").environ, "COLUMNS": "200"})
        assert r.returncode == 0, (cmd, r.stderr)
        for opt in sorted(set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]+)", r.stdout)) - {"--help"}):
            if not re.search(rf"{re.escape(opt)}(?![a-z0-9-])", docs):
                missing.append(f"{cmd} {opt}")
    assert not missing, f"options in --help but in no doc: {missing}"
