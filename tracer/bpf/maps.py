"""A loaded program's maps as Python sees them: typed keys and values over the map's descriptor,
as bcc's tables offer them (table[key], table[key] = value, del, keys(), items(), a per-CPU
array's values per CPU, a stack map's walk), without bcc.

Key and Leaf are ctypes types rebuilt from the type descriptions bcc's compiler wrote (JSON:
a C type's name, or [name, [[field, type(, [length] | bits)], ...], "struct"|"struct_packed"|
"union"]).
"""
from __future__ import annotations

import ctypes as ct
import errno
from functools import lru_cache
from typing import Iterator

from . import kernel

# map types (enum bpf_map_type) that read differently
HASH, PERCPU_ARRAY, STACK_TRACE, LRU_HASH = 1, 6, 7, 9

C_TYPES = {
    "_Bool": ct.c_bool, "char": ct.c_char, "signed char": ct.c_byte, "unsigned char": ct.c_ubyte,
    "short": ct.c_short, "unsigned short": ct.c_ushort, "int": ct.c_int,
    "unsigned int": ct.c_uint, "long": ct.c_long, "unsigned long": ct.c_ulong,
    "long long": ct.c_longlong, "unsigned long long": ct.c_ulonglong,
    "__int128": ct.c_int64 * 2, "unsigned __int128": ct.c_uint64 * 2,
}


def c_type(desc):
    """The ctypes type of a bcc type description."""
    if isinstance(desc, str):
        try:
            return C_TYPES[desc]
        except KeyError:
            raise ValueError(f"no ctypes type for C type {desc!r}") from None
    name, members = desc[0], desc[1]
    kind = desc[2] if len(desc) > 2 else "struct"
    fields, anonymous = [], []
    for m in members:
        if len(m) == 3 and m[2] in ("struct", "struct_packed", "union"):  # a nested aggregate
            field = m[0] or f"__anon{len(anonymous)}"
            if not m[0]:
                anonymous.append(field)
            fields.append((field, c_type(m)))
        elif len(m) == 3 and isinstance(m[2], list):  # an array
            fields.append((m[0], c_type(m[1]) * m[2][0]))
        elif len(m) == 3:  # a bit field
            fields.append((m[0], c_type(m[1]), m[2]))
        else:
            fields.append((m[0], c_type(m[1])))
    body = {"_fields_": fields, "_anonymous_": anonymous}
    if kind == "struct_packed":
        body["_pack_"] = 1
    return type(str(name), (ct.Union if kind == "union" else ct.Structure,), body)


@lru_cache(maxsize=1)
def possible_cpus() -> int:
    """How many values a per-CPU map holds per key: one per possible CPU."""
    with open("/sys/devices/system/cpu/possible") as fh:
        spans = fh.read().strip().split(",")
    top = 0
    for s in spans:
        top = max(top, int(s.split("-")[-1]))
    return top + 1


class Map:
    """One map: its descriptor (map_fd), Key and Leaf types, and bcc's table interface."""

    def __init__(self, name: str, fd: int, spec: dict):
        self.name, self.map_fd = name, fd
        self.map_type = spec["type"]
        self.key_size, self.value_size = spec["key_size"], spec["value_size"]
        self.Key = c_type(spec["key"]) if spec.get("key") is not None else None
        self.Leaf = c_type(spec["leaf"]) if spec.get("leaf") is not None else None
        self._batch = True  # items() by batch lookups, until the kernel refuses them

    def _key(self, key):
        return self.Key(key) if isinstance(key, int) else key

    def __getitem__(self, key):
        leaf = self.Leaf()
        if not kernel.lookup(self.map_fd, self._key(key), leaf):
            raise KeyError(key)
        return leaf

    def __setitem__(self, key, leaf) -> None:
        kernel.update(self.map_fd, self._key(key), leaf)

    def __delitem__(self, key) -> None:
        if not kernel.delete(self.map_fd, self._key(key)):
            raise KeyError(key)

    def keys(self) -> Iterator:
        """Every key (a hash map's order; an array's indexes)."""
        key, prev = self.Key(), None
        while kernel.next_key(self.map_fd, prev, key):
            yield key
            prev, key = key, self.Key()

    def items(self) -> Iterator:
        if self.map_type in (HASH, LRU_HASH) and self._batch:
            try:
                got = list(kernel.lookup_batch(self.map_fd, self.key_size, self.value_size, 1024))
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self._batch = False  # (a kernel before 5.6): one entry at a time
            else:
                yield from ((self.Key.from_buffer_copy(k), self.Leaf.from_buffer_copy(v))
                            for k, v in got)
                return
        for key in self.keys():
            try:
                yield key, self[key]
            except KeyError:  # gone between the two calls
                continue


class PerCpuArray(Map):
    """table[i]: the value on each possible CPU, as a list (ints for a scalar type)."""

    def __getitem__(self, key):
        stride = (ct.sizeof(self.Leaf) + 7) & ~7  # the kernel's per-CPU slot, 8-aligned
        n = possible_cpus()
        buf = (ct.c_uint8 * (stride * n))()
        if not kernel.lookup(self.map_fd, self._key(key), buf):
            raise KeyError(key)
        values = [self.Leaf.from_buffer(buf, i * stride) for i in range(n)]
        scalar = issubclass(self.Leaf, ct._SimpleCData)
        return [v.value for v in values] if scalar else values

    def __setitem__(self, key, leaf) -> None:
        raise TypeError(f"{self.name} is per CPU: the probes write it, keytrace only reads it")


class StackMap(Map):
    """walk(stack id): a stack's return addresses, innermost first."""

    def walk(self, stack_id: int) -> Iterator[int]:
        frames = (ct.c_uint64 * (self.value_size // 8))()
        if not kernel.lookup(self.map_fd, ct.c_int(stack_id), frames):
            raise KeyError(stack_id)
        for addr in frames:
            if not addr:
                break
            yield addr


def table(name: str, fd: int, spec: dict) -> Map:
    if spec["type"] == PERCPU_ARRAY:
        return PerCpuArray(name, fd, spec)
    if spec["type"] == STACK_TRACE:
        return StackMap(name, fd, spec)
    return Map(name, fd, spec)
