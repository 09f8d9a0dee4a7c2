"""Threads: the table is /proc/PID/task, and pthread_create fails with EAGAIN at whichever of
these has least left: the cgroup's pids.max (over the process's cgroup and its ancestors),
kernel.threads-max and kernel.pid_max (host-wide), and RLIMIT_NPROC (every thread of the uid;
root is exempt). So headroom is that limit less what its whole pool uses, not less this
process's threads alone. What grows is the thread's name (comm). Read only (keytrace scan
--resource threads); no count of threads is judged a leak by itself: a pool grows with load
to its size and stays there."""
from __future__ import annotations

from collections import Counter

from .. import resource
from ..host import tables


def _host(cache: dict) -> dict:
    if "threads" not in cache:
        tasks = tables.host_tasks()
        cache["threads"] = {"kernel.threads-max": (tables.sysctl("kernel.threads-max"), tasks),
                            "kernel.pid_max": (tables.sysctl("kernel.pid_max"), tasks)}
    return cache["threads"]


def census(pid: int, cache: dict) -> resource.Census:
    owners = Counter(tables.task_names(pid))
    bounds = dict(_host(cache))  # source -> (limit, in use in its pool)
    pids = tables.cgroup_pids(pid, cache)
    if pids is not None:
        bounds[f"pids.max of cgroup {pids[2]}"] = pids[:2]
    uid = int(tables.status(pid, cache)["Uid"].split()[0])
    nproc = tables.soft_limit(pid, "nproc", cache)
    if uid != 0 and nproc is not None:
        if "uid_tasks" not in cache:
            cache["uid_tasks"] = tables.uid_tasks()
        bounds[f"RLIMIT_NPROC of uid {uid}"] = (nproc, cache["uid_tasks"][uid])
    source, (limit, used) = min(bounds.items(), key=lambda kv: kv[1][0] - kv[1][1])
    return resource.Census(sum(owners.values()), limit, max(limit - used, 0), source, owners)


THREADS = resource.register(resource.Resource(
    name="threads", census=census,
    words={"unit": "thread", "units": "threads", "owner": "thread name",
           "full": "no more threads (pthread_create EAGAIN)"}))
