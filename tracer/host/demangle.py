"""C++ and Rust symbol names as people write them (ltrace's -C): `_Znwm` is
`operator new(unsigned long)`. Through libstdc++'s own demangler (__cxa_demangle), which every
host with C++ programs has; Rust's legacy names are Itanium names with a hash segment, dropped
as rustc-demangle does. Rust v0 names (`_R...`) are left as they are."""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import re
from typing import Optional

_RUST_HASH = re.compile(r"::h[0-9a-f]{16}$")


@functools.lru_cache(maxsize=1)
def _demangler():
    """__cxa_demangle and free, or None when no libstdc++ can be loaded."""
    for name in ("libstdc++.so.6", ctypes.util.find_library("stdc++")):
        if not name:
            continue
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        fn = lib.__cxa_demangle
        fn.restype = ctypes.c_void_p
        fn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_size_t),
                       ctypes.POINTER(ctypes.c_int)]
        free = ctypes.CDLL(None).free
        free.argtypes = [ctypes.c_void_p]
        return fn, free
    return None


@functools.lru_cache(maxsize=65536)
def demangle(name: str) -> str:
    """The name as written in the source, or name itself when it is not a mangled one."""
    if not name.startswith("_Z"):
        return name
    found = _demangler()
    if found is None:
        return name
    fn, free = found
    status = ctypes.c_int(0)
    out: Optional[int] = fn(name.encode(), None, None, ctypes.byref(status))
    if status.value != 0 or not out:
        return name
    try:
        text = ctypes.string_at(out).decode("utf-8", "replace")
    finally:
        free(out)
    return _RUST_HASH.sub("", text) if name.startswith("_ZN") else text
