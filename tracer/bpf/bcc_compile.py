"""Compile probe source with bcc in a process of its own, and print the object as JSON.

Run by tracer.bpf.objects as `python -I bcc_compile.py [CFLAG ...]`, the source on standard
input. The compiler lives and dies here, never in the tracer: importing bcc maps LLVM and clang
(about 65 MB resident from their relocations alone) and a compile peaks near 100 MB more. This
file imports only the standard library and bcc, so that it runs by path, outside the package.

Output: {"license", "kern_version", "maps": {name: map}, "programs": {name: {"insns": base64,
"maps": [[instruction index, map name], ...]}}}. bcc has created the maps and written their
descriptors into the instructions (ld_imm64 with src_reg BPF_PSEUDO_MAP_FD); those immediates are
zeroed here and named instead, for the loader to write its own maps' descriptors in. Any other
pseudo source (map values, BTF ids, kfuncs) is refused: the loader could not rebuild it.
"""
import base64
import ctypes as ct
import json
import os
import sys

SYS_BPF = 321                 # x86-64
BPF_OBJ_GET_INFO_BY_FD = 15
LD_IMM64 = 0x18
PSEUDO_MAP_FD = 1


class MapInfo(ct.Structure):  # struct bpf_map_info, as far as map creation needs it
    _fields_ = [("type", ct.c_uint32), ("id", ct.c_uint32), ("key_size", ct.c_uint32),
                ("value_size", ct.c_uint32), ("max_entries", ct.c_uint32),
                ("map_flags", ct.c_uint32), ("name", ct.c_char * 16), ("ifindex", ct.c_uint32),
                ("btf_vmlinux_value_type_id", ct.c_uint32), ("netns_dev", ct.c_uint64),
                ("netns_ino", ct.c_uint64), ("btf_id", ct.c_uint32),
                ("btf_key_type_id", ct.c_uint32), ("btf_value_type_id", ct.c_uint32),
                ("pad", ct.c_uint32), ("map_extra", ct.c_uint64)]


def map_info(fd: int) -> MapInfo:
    """What the kernel made of a map bcc created: the exact attributes to create it again."""
    libc = ct.CDLL(None, use_errno=True)
    info = MapInfo()
    attr = (ct.c_uint8 * 128)()
    ct.c_uint32.from_buffer(attr, 0).value = fd
    ct.c_uint32.from_buffer(attr, 4).value = ct.sizeof(info)
    ct.c_uint64.from_buffer(attr, 8).value = ct.addressof(info)
    if libc.syscall(SYS_BPF, BPF_OBJ_GET_INFO_BY_FD, ct.byref(attr), ct.sizeof(attr)) != 0:
        raise OSError(ct.get_errno(), os.strerror(ct.get_errno()))
    return info


def main() -> int:
    text = sys.stdin.buffer.read()
    cflags = [os.fsencode(a) for a in sys.argv[1:]]
    from bcc.libbcc import lib  # (loads LLVM and clang: here only)
    for fn, res, args in (("bpf_num_tables", ct.c_size_t, [ct.c_void_p]),
                          ("bpf_table_name", ct.c_char_p, [ct.c_void_p, ct.c_size_t]),
                          ("bpf_table_fd_id", ct.c_int, [ct.c_void_p, ct.c_size_t]),
                          ("bpf_table_key_desc_id", ct.c_char_p, [ct.c_void_p, ct.c_size_t]),
                          ("bpf_table_leaf_desc_id", ct.c_char_p, [ct.c_void_p, ct.c_size_t])):
        getattr(lib, fn).restype, getattr(lib, fn).argtypes = res, args
    array = (ct.c_char_p * max(len(cflags), 1))(*cflags)
    module = lib.bpf_module_create_c_from_string(text, 0, array, len(cflags), True, None)
    if not module:
        print("bcc could not compile the probes (its messages are above)", file=sys.stderr)
        return 1
    try:
        maps, by_fd = {}, {}
        for i in range(lib.bpf_num_tables(module)):
            name = lib.bpf_table_name(module, i).decode()
            fd = lib.bpf_table_fd_id(module, i)
            info = map_info(fd)
            maps[name] = {"type": info.type, "key_size": info.key_size,
                          "value_size": info.value_size, "max_entries": info.max_entries,
                          "flags": info.map_flags, "map_extra": info.map_extra,
                          "kernel_name": info.name.decode(),
                          "key": json.loads(lib.bpf_table_key_desc_id(module, i) or b"null"),
                          "leaf": json.loads(lib.bpf_table_leaf_desc_id(module, i) or b"null")}
            by_fd[fd] = name
        programs = {}
        for i in range(lib.bpf_num_functions(module)):
            name = lib.bpf_function_name(module, i)
            code = bytearray(ct.string_at(lib.bpf_function_start(module, name),
                                          lib.bpf_function_size(module, name)))
            refs, k = [], 0
            while k < len(code) // 8:
                op, src = code[8 * k], code[8 * k + 1] >> 4
                if op == LD_IMM64:
                    if src == PSEUDO_MAP_FD:
                        fd = int.from_bytes(code[8 * k + 4:8 * k + 8], "little", signed=True)
                        if fd not in by_fd:
                            raise SystemExit(f"{name.decode()}: instruction {k} refers to "
                                             f"descriptor {fd}, which is no map of the program")
                        refs.append([k, by_fd[fd]])
                        code[8 * k + 4:8 * k + 8] = bytes(4)
                    elif src != 0:
                        raise SystemExit(f"{name.decode()}: instruction {k} is a 64-bit load of "
                                         f"pseudo source {src}, which keytrace cannot relocate")
                    k += 2
                else:
                    k += 1
            programs[name.decode()] = {"insns": base64.b64encode(bytes(code)).decode(),
                                       "maps": refs}
        json.dump({"license": lib.bpf_module_license(module).decode(),
                   "kern_version": int(lib.bpf_module_kern_version(module)),
                   "maps": maps, "programs": programs}, sys.stdout)
    finally:
        lib.bpf_module_destroy(module)
    return 0


if __name__ == "__main__":
    sys.exit(main())
