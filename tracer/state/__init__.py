"""Per-process state built from events, in three small state machines: processes (fork, exec,
exit), modules (dlopen, map, munmap) and keys (create, delete), driven by the tracker."""
