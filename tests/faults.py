"""Planted faults: each fault below is a small change to the code behind a test that was fixed
to be able to fail; the script plants it in a scratch worktree of HEAD, runs that test, and
says whether the test caught it. Every fault must be CAUGHT. Run as root (the BPF tests):

    .venv/bin/python tests/faults.py            # every fault
    .venv/bin/python tests/faults.py 3 7        # by number

Not collected by pytest (a check of the tests, not a test). Attaches probes: run it alone."""
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAULTS = [
 ("A drain error unseen is dropped at stop()", "tracer/tracing.py",
  "        self.check()  # a drain that failed unseen", "        pass  # self.check()  # a drain that failed unseen",
  ["tests/test_safety.py::test_a_drain_failure_nobody_waited_for_is_raised_by_stop"]),
 ("Meta row trusted (no field check)", "tracer/store/files.py",
  "def _check_meta(meta: dict, path) -> None:\n", "def _check_meta(meta: dict, path) -> None:\n    return\n",
  ["tests/test_files.py::test_a_saved_ledger_whose_meta_row_is_wrong_is_one_line_naming_the_field"]),
 ("Replay columns: owner and caller swapped", "tracer/wire.py",
  'batch["owner"].tolist(), batch["caller"].tolist(), paths,', 'batch["caller"].tolist(), batch["owner"].tolist(), paths,',
  ["tests/test_wire.py"]),
 ("Unprivileged scan opens map_files only", "tracer/host/proc.py",
  "    if path and _UNPRIVILEGED and _same_files(pid):", "    if False:",
  ["tests/test_scan.py::test_an_ordinary_user_scans_its_own_processes"]),
 ("Unwritable state dir not caught", "tracer/agent/state.py",
  "            if not os.access(directory, os.W_OK):\n                raise PermissionError(errno.EACCES, \"not writable\")\n        except OSError as e:",
  "            pass\n        except ZeroDivisionError as e:",
  ["tests/test_agent.py::test_an_unwritable_state_dir_is_one_warning_and_the_agent_serves"]),
 ("--ring-pages checked only at attach (after the spawn)", "tracer/session.py",
  "self._ring_pages = check_ring_pages(ring_pages)", "self._ring_pages = ring_pages",
  ["tests/test_cli_errors.py::test_usage_errors_come_before_anything_is_spawned"]),
 ("a lost exit and a fork over its pid merge two processes", "tracer/state/processes.py",
  "        if old is not None:  # its exit was lost: close the old history\n            self.end(old, ts)\n",
  "        if old is not None:  # its exit was lost: close the old history\n            return old\n",
  ["tests/test_watch.py::test_a_reused_pid_is_two_processes_and_the_second_inherits_nothing",
   "tests/test_agent.py::test_a_reused_pid_does_not_inherit_the_first_process_keys_or_date"],
  ("    def end(self, p: Process, ts: int) -> None:\n", "    def end(self, p: Process, ts: int) -> None:\n        return\n")),
 ("fork inherits no keys", "tracer/state/processes.py",
  "        tables = {n: t.inherited() for n, t in parent.tables.items()\n                  if resource.get(n).inherit_on_fork}",
  "        tables = {}",
  ["tests/test_sites.py::test_fork_and_exec"]),
 ("ETA twice as far as the days left", "tracer/analysis/forecast.py",
  "        eta = now + timedelta(days=days)", "        eta = now + timedelta(days=2 * days)",
  ["tests/test_attribution.py::test_nested_leak_names_libb_and_forecasts_the_incident"]),

 ("a ledger written straight to its final name, nothing removed on failure", "tracer/store/files.py",
  '    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")', "    tmp = final",
  ["tests/test_files.py::test_a_full_disk_leaves_no_partial_file_under_the_final_name",
   "tests/test_watch.py::test_a_full_disk_prints_the_summary_and_leaves_no_partial_file"],
  ("        tmp.unlink(missing_ok=True)\n        raise KeytraceError", "        raise KeytraceError")),
 ("stop() detaches nothing", "tracer/bpf/loader.py",
  "                self._detach_in_parallel()\n                self.bpf.cleanup()  # detaches the rest, closes the programs",
  "                pass",
  ["tests/test_watch.py::test_stop_detaches_every_probe"]),
 ("the self-test child runs before it is in the pid filter", "tracer/resources/keys.py",
  "            os.read(go_r, 1)\n", "",
  ["tests/test_sites.py::test_the_self_test_passes_when_only_some_pids_are_traced"]),
 ("the agent's state is never saved", "tracer/agent/state.py",
  "        try:\n            with self.db:\n                self.db.execute(\"DELETE FROM process\")",
  "        return\n        try:\n            with self.db:\n                self.db.execute(\"DELETE FROM process\")",
  ["tests/test_agent.py::test_a_restart_keeps_the_measured_date"]),
 ("struct event's pid declared 64-bit on the C side", "tracer/wire.py",
  '            lines.append(f"    {_C_TYPES[dt.str]} {field};")',
  '            lines.append(f"    {_C_TYPES[dt.str] if field != \'pid\' else \'u64\'} {field};")',
  ["tests/test_wire.py::test_struct_event_as_the_c_compiler_lays_it_out_is_what_decode_reads"]),

 ("an entry followed by another record printed whole, not unfinished", "tracer/analysis/calls.py",
  '        return [self._line(item, item["ts"], self._call(item)[:-1] + " <unfinished ...>")]',
  '        return [self._line(item, item["ts"], self._call(item))]',
  ["tests/test_calls_ltrace.py::test_a_short_run_matches_the_golden_trace_line_by_line",
   "tests/test_calls_ltrace.py::test_lines_in_call_order_across_threads_with_every_time_style"]),
 ("FUNC@MAIN lets every caller through", "probes/calls.bpf.c",
  "    return ret >= r->lo && ret < r->hi;", "    return 1;",
  ["tests/test_calls_ltrace.py::test_calls_from_main_equal_ltraces_where_ltrace_can_see_them"]),
 ("-S: system calls pushed no frame (they do not nest)", "probes/calls.bpf.c",
  "    struct kc_frame *f = kc_push((u32)id, KC_SYS | nr);",
  "    struct kc_frame *f = NULL;",
  ["tests/test_calls_ltrace.py::test_system_calls_nest_under_the_library_call_that_made_them"]),
 ("-S shows the uretprobe system call", "probes/calls.bpf.c",
  "    if (!wanted(id >> 32) || nr >= KC_NR_MAX || nr == KC_NR_URETPROBE)",
  "    if (!wanted(id >> 32) || nr >= KC_NR_MAX)",
  ["tests/test_calls_ltrace.py::test_system_calls_nest_under_the_library_call_that_made_them",
   "tests/test_calls_ltrace.py::test_system_calls_counted_as_strace_counts_them"]),
 ("a counting site may follow a system call", "tracer/host/planner.py",
  "or insn.id in _TRAPS or insn.id in _SYSCALLS)", "or insn.id in _TRAPS)",
  ["tests/test_calls_ltrace.py::test_a_call_whose_syscall_never_returns_is_counted_on_planned_sites"]),
 ("-p leaves out the children a process already has", "tracer/tracing.py",
  "filter_pids = proc.with_descendants(self.pids) if self.pids else self.pids",
  "filter_pids = self.pids",
  ["tests/test_calls_ltrace.py::test_pid_covers_the_children_it_already_has"]),
 ("-C patterns match symbols only", "tracer/host/patterns.py",
  "if match(name) or (demangled and name.startswith(\"_Z\") and match(demangle(name)))",
  "if match(name)",
  ["tests/test_calls_ltrace.py::test_C_names_as_written_in_patterns_and_output"]),
 ("a stack's caller (read at the entry) left out", "tracer/analysis/calls.py",
  '            addrs = walked[:1] + ([int(r["ip"])] if int(r["ip"]) else []) + walked[1:]',
  "            addrs = walked",
  ["tests/test_calls_ltrace.py::test_stacks_are_named_and_cut_where_the_walk_stops"]),

 ("a second probe on a site replaces the first (leaked)", "tracer/bpf/loader.py",
  "                if site in self._sites_taken:", "                if False:",
  ["tests/test_calls_ltrace.py::test_a_second_probe_on_one_site_is_refused_not_leaked"]),
 ("FUNC@LIB counts every caller", "tracer/calls.py",
  "                           index.get(t.caller, -1))", "                           -1)",
  ["tests/test_calls_ltrace.py::test_calls_from_a_library_are_told_from_the_programs"]),
]


def main(only: list) -> int:
    tree = tempfile.mkdtemp(prefix="keytrace-faults-")
    subprocess.run(["git", "worktree", "add", "-q", "--detach", tree, "HEAD"], cwd=ROOT, check=True)
    try:
        return sum(plant(tree, i, *fault) for i, fault in enumerate(FAULTS)
                   if not only or str(i) in only)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", tree], cwd=ROOT)


def plant(tree, i, name, path, old, new, tests, *more) -> int:
    """Plant one fault (old -> new in path, and any more (old, new) pairs), run its tests,
    restore the file. 1 when the fault went uncaught."""
    f = os.path.join(tree, path)
    text = open(f).read()
    for o, n in [(old, new), *more]:
        assert text.count(o) == 1, (name, o)
        text = text.replace(o, n)
    open(f, "w").write(text)
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
                           cwd=tree, env=dict(os.environ, PYTHONPATH=tree, KEYTRACE_REQUIRE_BPF="1"),
                           capture_output=True, text=True, timeout=900)
    finally:
        subprocess.run(["git", "checkout", "-q", "--", path], cwd=tree)
    last = (r.stdout.strip().splitlines() or ["(no output)"])[-1]
    # caught: tests ran and failed (1); not a test id that no longer collects (2, 4, 5)
    caught = r.returncode == 1
    print(f"[{i}] {name}: {'CAUGHT' if caught else 'NOT CAUGHT'} ({last})", flush=True)
    for line in r.stdout.splitlines():
        if line.startswith(("FAILED", "ERROR")):
            print("     ", line[:200], flush=True)
    return 0 if caught else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
