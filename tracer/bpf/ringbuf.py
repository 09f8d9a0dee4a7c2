"""A batch reader for a BPF ring buffer, mapped straight into this process.

bcc's ring buffer API calls back into Python once per record. keytrace's records all have one
fixed size, so the span between the consumer and producer positions is an array of equal
strides: it is viewed as a numpy structured array and copied out in one go, then the consumer
position is advanced once. The data pages are mapped twice in a row by the kernel, so a span
that wraps around the end is still contiguous here.

Layout (kernel/bpf/ringbuf.c): page 0 holds the consumer position (read-write), page 1 the
producer position, then the data area twice. Each record has an 8-byte header: a u32 length
whose top bits flag a record still being written (BUSY) or dropped (DISCARD), and a u32 page
offset. x86-64's memory order makes plain loads sufficient here.
"""
from __future__ import annotations

import mmap
import struct

import numpy as np

BUSY = 1 << 31
DISCARD = 1 << 30
HEADER = 8


class RingReader:
    def __init__(self, map_fd: int, data_size: int, record: np.dtype):
        if data_size & (data_size - 1):
            raise ValueError("ring buffer size must be a power of two")
        self.page = mmap.PAGESIZE
        self.size = data_size
        self.record = record
        self.stride = (record.itemsize + HEADER + 7) & ~7
        self.frame = np.dtype({"names": ["len", "rec"], "formats": ["<u4", record],
                               "offsets": [0, HEADER], "itemsize": self.stride})
        self._cons = mmap.mmap(map_fd, self.page, mmap.MAP_SHARED,
                               mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._prod = mmap.mmap(map_fd, self.page + 2 * data_size, mmap.MAP_SHARED,
                               mmap.PROT_READ, offset=self.page)

    def drain(self, limit: int = 0) -> np.ndarray:
        """Copy out every committed record (at most limit, when given) and release them."""
        cons = struct.unpack_from("<Q", self._cons, 0)[0]
        prod = struct.unpack_from("<Q", self._prod, 0)[0]
        if prod - cons > self.size:  # never more than the ring holds: a bound on every drain
            raise RuntimeError(f"ring buffer positions make no sense (consumer {cons}, producer "
                               f"{prod}, size {self.size})")
        n = (prod - cons) // self.stride
        if limit:
            n = min(n, limit)
        if n <= 0:
            return np.zeros(0, dtype=self.record)
        start = self.page + (cons & (self.size - 1))
        lens = np.frombuffer(self._prod, dtype=self.frame, count=n, offset=start)["len"].copy()
        busy = (lens & BUSY) != 0
        if busy.any():
            n = int(np.argmax(busy))  # stop at the first record still being written
            lens = lens[:n]
        sizes = lens & ~np.uint32(BUSY | DISCARD)
        if n and (sizes != self.record.itemsize).any():
            raise RuntimeError("ring buffer holds a record of unexpected size "
                               f"{int(sizes[sizes != self.record.itemsize][0])}")
        # One memcpy of the whole span, then a strided view of the records inside our copy.
        out = np.frombuffer(self._prod[start:start + n * self.stride], dtype=self.frame)["rec"]
        keep = (lens & DISCARD) == 0
        if not keep.all():
            out = out[keep]
        struct.pack_into("<Q", self._cons, 0, cons + n * self.stride)
        return out

    def close(self) -> None:
        for m in (self._cons, self._prod):
            if not m.closed:
                m.close()
