"""Memory mappings: the table is /proc/PID/maps, the limit vm.max_map_count (an mmap past it
fails with ENOMEM, often surfacing as a pthread_create EAGAIN). What grows is the mapped file,
a kernel name ([heap], [stack]) or [anon]. Read only (keytrace scan --resource maps); no count
of mappings is judged a leak by itself: allocators and thread stacks make many."""
from __future__ import annotations

from collections import Counter

from .. import resource
from ..host import tables


def census(pid: int, cache: dict) -> resource.Census:
    owners = Counter(tables.map_owners(pid, cache))
    if "max_map_count" not in cache:
        cache["max_map_count"] = tables.sysctl("vm.max_map_count")
    limit = cache["max_map_count"]
    n = sum(owners.values())
    return resource.Census(n, limit, limit - n, "vm.max_map_count", owners)


MAPS = resource.register(resource.Resource(
    name="maps", census=census,
    words={"unit": "mapping", "units": "mappings", "owner": "mapped file",
           "full": "vm.max_map_count reached"}))
