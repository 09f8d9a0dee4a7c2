// keytrace probe unit "modules": dlopen/dlclose, the link_map entries each dlopen brought in,
// and the munmap of their load bases. Keys made while a dlopen runs on the same thread (in a
// constructor) are tagged with its id by the keys unit, through current_load().

#define KT_HAVE_MODULES

// The public head of glibc's (and musl's) struct link_map, <link.h>: stable ABI.
struct link_map_head {
    u64 l_addr;   // load bias
    u64 l_name;
    u64 l_ld;
    u64 l_next;
    u64 l_prev;
};

struct module_key {
    u32 pid;
    u32 pad;
    u64 base;
};

// The dlopens in flight on one thread, innermost last: a constructor may dlopen in turn.
struct dlopen_stack {
    u32 depth;
    u32 pad;
    u64 file[KT_DLOPEN_DEPTH];
    u64 id[KT_DLOPEN_DEPTH];
};

BPF_HASH(dlopen_inflight, u32, struct dlopen_stack, KT_MAX_ENTRIES);
// Load bases of modules dlopen reported: munmap of exactly that address is their unmapping.
BPF_TABLE("lru_hash", struct module_key, u8, modules, KT_MAX_ENTRIES);  // LRU: exits leave no debt
BPF_TABLE("lru_hash", u32, u8, walked, KT_MAX_ENTRIES);  // tgids whose earlier entries were reported

// The id of the innermost dlopen in flight on this thread, 0 when none.
static __always_inline u64 current_load(u32 tid)
{
    struct dlopen_stack *s = dlopen_inflight.lookup(&tid);
    if (!s || s->depth == 0)
        return 0;
    u32 top = s->depth - 1;
    return top < KT_DLOPEN_DEPTH ? s->id[top] : 0;
}

static __always_inline void modules_thread_exit(u32 tid)
{
    dlopen_inflight.delete(&tid);
}

// Report one link_map entry as a map record; returns the next (or previous) entry, 0 at the end.
static __always_inline u64 report_module(u64 lm, u64 id, u32 index, u64 pid_tgid, int forward)
{
    struct link_map_head m = {};
    if (bpf_probe_read_user(&m, sizeof(m), (void *)lm))
        return 0;
    struct event *e = new_event(OP_MAP, pid_tgid);
    if (e) {
        e->load = id;
        e->aux = m.l_addr;
        e->index = index;
        bpf_probe_read_user_str(&e->path, sizeof(e->path), (void *)m.l_name);
        submit(e);
    }
    struct module_key mk = {.pid = pid_tgid >> 32, .base = m.l_addr};
    u8 one = 1;
    modules.update(&mk, &one);
    return forward ? m.l_next : m.l_prev;
}

// void *dlopen(const char *file, int mode)
int dlopen_enter(struct pt_regs *ctx)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    if (!wanted(pid_tgid >> 32))
        return 0;
    u32 tid = (u32)pid_tgid;
    struct dlopen_stack fresh = {};
    struct dlopen_stack *s = dlopen_inflight.lookup(&tid);
    if (!s) {
        dlopen_inflight.update(&tid, &fresh);
        s = dlopen_inflight.lookup(&tid);
        if (!s)
            return 0;
    }
    u32 d = s->depth;
    if (d < KT_DLOPEN_DEPTH) {
        s->file[d] = PT_REGS_PARM1(ctx);
        s->id[d] = bpf_ktime_get_boot_ns();
        // Said at once: until its dlopen record, the process is mid-load (constructors run).
        struct event *e = new_event(OP_DLOPEN_BEGIN, pid_tgid);
        if (e) {
            e->load = s->id[d];
            submit(e);
        }
    }
    s->depth = d + 1;  // counted past the depth too, so returns stay paired
    return 0;
}

int dlopen_return(struct pt_regs *ctx)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 tid = (u32)pid_tgid;
    struct dlopen_stack *s = dlopen_inflight.lookup(&tid);
    if (!s || s->depth == 0)
        return 0;
    u32 d = --s->depth;
    if (d >= KT_DLOPEN_DEPTH)
        return 0;  // nested deeper than we keep: its keys carry the outer id
    u64 id = s->id[d], file = s->file[d];
    u64 handle = PT_REGS_RC(ctx);
    struct event *e = new_event(OP_DLOPEN, pid_tgid);
    if (e) {
        e->load = id;
        e->aux = handle;
        if (file)
            bpf_probe_read_user_str(&e->path, sizeof(e->path), (void *)file);
        submit(e);
    }
    // The handle is the object's link_map; the objects after it in the chain include the
    // dependencies this dlopen loaded. Report each one's base and name, and remember the base
    // so that its munmap (glibc unmaps a module from its first address) is seen.
    u64 lm = handle;
    for (int i = 0; i < KT_MAX_MODULES; i++) {
        if (!lm)
            break;
        lm = report_module(lm, id, i, pid_tgid, 1);
    }
    // Once per program image, the objects before it too: the executable, libc, the loader,
    // so that frames there can be named even after the process is gone.
    u32 tgid = pid_tgid >> 32;
    u8 one = 1;
    if (handle && !walked.lookup(&tgid)) {
        walked.update(&tgid, &one);
        struct link_map_head h = {};
        lm = bpf_probe_read_user(&h, sizeof(h), (void *)handle) ? 0 : h.l_prev;
        for (int i = 0; i < KT_MAX_MODULES; i++) {
            if (!lm)
                break;
            lm = report_module(lm, 0, KT_MAX_MODULES + i, pid_tgid, 0);
        }
    }
    return 0;
}

// int dlclose(void *handle)
int dlclose_enter(struct pt_regs *ctx)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    if (!wanted(pid_tgid >> 32))
        return 0;
    struct event *e = new_event(OP_DLCLOSE, pid_tgid);
    if (e) {
        e->aux = PT_REGS_PARM1(ctx);
        submit(e);
    }
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_munmap)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    struct module_key mk = {.pid = pid_tgid >> 32, .base = args->addr};
    if (!modules.lookup(&mk))
        return 0;
    modules.delete(&mk);
    struct event *e = new_event(OP_UNMAP, pid_tgid);
    if (e) {
        e->aux = args->addr;
        submit(e);
    }
    return 0;
}
