"""File descriptors: the table is /proc/PID/fd, the limit that binds the RLIMIT_NOFILE soft
limit (/proc/PID/limits). What grows is what the fds are open to: a file's path, or the kind of
a socket, pipe or anonymous inode. Read only (keytrace scan --resource fds): the calls that make
fds are too many for one acquire/release pair.

A table alone shows a leak when SAME_FILE fds are open to one file: a reload that reopens a
log or config file and never closes the old one. Sockets and pipes come and go with load, so
no count of them is judged."""
from __future__ import annotations

from collections import Counter

from .. import resource
from ..host import tables

SAME_FILE = 30


def census(pid: int, cache: dict) -> resource.Census:
    owners = Counter(tables.fd_kind(t) for t in tables.fd_targets(pid))
    limit = tables.soft_limit(pid, "nofile", cache)
    n = sum(owners.values())
    files = Counter({k: v for k, v in owners.items() if k.startswith("/")})
    return resource.Census(n, limit, None if limit is None else limit - n, "RLIMIT_NOFILE",
                           owners, judged=files)


FDS = resource.register(resource.Resource(
    name="fds", census=census, same_owner=SAME_FILE,
    words={"unit": "fd", "units": "fds", "owner": "file", "full": "too many open files (EMFILE)"}))
