"""Pure: the exit status keytrace gives for a launched command (the README's table)."""

from tracer.cli.console import command_status


def test_a_commands_status_is_keytraces_unless_keytrace_ended_it():
    assert command_status(7, "exited") == 7
    assert command_status(-11, "exited") == 139       # SIGSEGV, as a shell says
    assert command_status(-2, "exited") == 0          # Ctrl-C: the user's, not a failure
    assert command_status(0, "exited") == 0
    assert command_status(-15, "duration") == 0       # keytrace ended it
    assert command_status(None, "stopped") == 0
