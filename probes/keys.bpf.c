// keytrace probe set "keys": pthread key create/delete, dlopen/dlclose and process lifecycle.
// Loaded by tracer/probes.py through bcc. Only user memory and tracepoint fields are read,
// never kernel structs, so headers from another kernel version (see tracer/headers.py) work.
//
// Every record is one fixed-size struct event, mirrored by tracer/records.py's numpy dtype,
// so user space can decode a whole batch at once. Records are submitted without a wake-up
// and drained on a short timer: a wake-up per record costs microseconds per traced call.
//
// Compile-time knobs (set by tracer/probes.py):
//   KT_FILTER      trace only tgids in `traced` (and their forked children)
//   KT_RING_PAGES  ring buffer size in pages (power of two)
//   KT_GROUP_DEAD  sched_process_exit has the group_dead field (kernel >= 6.x)
//   KT_SELF        the tracer's own tgid, never traced (its own forks would feed back)

#include <uapi/linux/ptrace.h>

#define OP_CREATE 1
#define OP_CREATE_FAILED 2
#define OP_DELETE 3
#define OP_DLOPEN 4
#define OP_DLCLOSE 5
#define OP_EXEC 6
#define OP_EXIT 7
#define OP_FORK 8
#define OP_MAP 9
#define OP_UNMAP 10

#define KT_PATH_LEN 256
#define KT_CLONE_THREAD 0x00010000
#define KT_MAX_MODULES 16   // link_map entries reported per dlopen

struct event {
    u64 ts;          // bpf_ktime_get_boot_ns()
    u64 load;        // create: id of the dlopen in flight on this thread (0: none); dlopen: its id
    u64 destructor;  // create: destructor argument
    u64 caller;      // create: return address (the call site)
    u64 handle;      // dlopen: returned handle; dlclose: argument
    u32 pid;         // tgid
    u32 tid;
    u32 other;       // fork: child pid; exec: pid before exec
    u32 op;
    s32 ret;         // create/delete: return value (a failed delete keeps op delete)
    u32 key;         // create (success) / delete: the key
    s32 stack;       // create: user stack id in `stacks` (negative: none)
    u32 index;       // map: position in the link_map chain after the dlopen'd object
    char comm[16];
    char path[KT_PATH_LEN];  // dlopen: file argument; exec: filename; map: l_name
};

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

struct create_args {
    u64 keyp;
    u64 destructor;
    u64 caller;
    u64 load;
    s64 stack;
};

struct dlopen_args {
    u64 file;
    u64 id;
};

BPF_RINGBUF_OUTPUT(events, KT_RING_PAGES);
BPF_PERCPU_ARRAY(lost, u64, 1);            // reservations that failed: the ring was full
BPF_HASH(traced, u32, u8, 65536);           // tgid filter, used with KT_FILTER
BPF_HASH(create_inflight, u32, struct create_args, 65536);
BPF_HASH(delete_inflight, u32, u32, 65536);
BPF_HASH(dlopen_inflight, u32, struct dlopen_args, 65536);
BPF_STACK_TRACE(stacks, 16384);
// Load bases of modules dlopen reported: munmap of exactly that address is their unmapping.
BPF_TABLE("lru_hash", struct module_key, u8, modules, 65536);  // LRU: exits leave no debt
BPF_TABLE("lru_hash", u32, u8, walked, 65536);  // tgids whose earlier link_map entries were reported

static __always_inline int wanted(u32 tgid)
{
    if (tgid == KT_SELF)
        return 0;
#ifdef KT_FILTER
    return traced.lookup(&tgid) != NULL;
#else
    return 1;
#endif
}

static __always_inline struct event *new_event(u32 op, u64 pid_tgid)
{
    struct event *e = events.ringbuf_reserve(sizeof(struct event));
    // Kernels 6.15+ guard the ring with a resilient spinlock whose acquisition can fail
    // spuriously, with the ring nearly empty (seen here on 6.18): retries recover most.
    if (!e)
        e = events.ringbuf_reserve(sizeof(struct event));
    if (!e)
        e = events.ringbuf_reserve(sizeof(struct event));
    if (!e) {
        u32 zero = 0;
        u64 *n = lost.lookup(&zero);
        if (n)
            (*n)++;
        return NULL;
    }
    e->ts = bpf_ktime_get_boot_ns();
    e->pid = pid_tgid >> 32;
    e->tid = (u32)pid_tgid;
    e->op = op;
    e->load = 0;
    e->destructor = 0;
    e->caller = 0;
    e->handle = 0;
    e->other = 0;
    e->ret = 0;
    e->key = 0;
    e->stack = -1;
    e->index = 0;
    bpf_get_current_comm(&e->comm, sizeof(e->comm));
    e->path[0] = 0;
    return e;
}

static __always_inline void submit(struct event *e)
{
    events.ringbuf_submit(e, BPF_RB_NO_WAKEUP);
}

// int pthread_key_create(pthread_key_t *key, void (*destructor)(void *))
int create_enter(struct pt_regs *ctx)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    if (!wanted(pid_tgid >> 32))
        return 0;
    u32 tid = (u32)pid_tgid;
    struct create_args a = {};
    a.keyp = PT_REGS_PARM1(ctx);
    a.destructor = PT_REGS_PARM2(ctx);
    // At function entry the return address is the word at the stack pointer (x86-64).
    bpf_probe_read_user(&a.caller, sizeof(a.caller), (void *)PT_REGS_SP(ctx));
    struct dlopen_args *d = dlopen_inflight.lookup(&tid);
    if (d)
        a.load = d->id;
    // At entry the walk starts at the caller's caller (the caller's frame is not pushed yet):
    // user space puts `caller` in front.
    a.stack = stacks.get_stackid(ctx, BPF_F_USER_STACK);
    create_inflight.update(&tid, &a);
    return 0;
}

int create_return(struct pt_regs *ctx)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 tid = (u32)pid_tgid;
    struct create_args *a = create_inflight.lookup(&tid);
    if (!a)
        return 0;
    int ret = PT_REGS_RC(ctx);
    struct event *e = new_event(ret == 0 ? OP_CREATE : OP_CREATE_FAILED, pid_tgid);
    if (e) {
        e->ret = ret;
        e->destructor = a->destructor;
        e->caller = a->caller;
        e->load = a->load;
        e->stack = a->stack;
        if (ret == 0)
            bpf_probe_read_user(&e->key, sizeof(e->key), (void *)a->keyp);
        submit(e);
    }
    create_inflight.delete(&tid);
    return 0;
}

// int pthread_key_delete(pthread_key_t key)
int delete_enter(struct pt_regs *ctx)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    if (!wanted(pid_tgid >> 32))
        return 0;
    u32 tid = (u32)pid_tgid;
    u32 key = (u32)PT_REGS_PARM1(ctx);
    delete_inflight.update(&tid, &key);
    return 0;
}

int delete_return(struct pt_regs *ctx)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 tid = (u32)pid_tgid;
    u32 *key = delete_inflight.lookup(&tid);
    if (!key)
        return 0;
    int ret = PT_REGS_RC(ctx);
    struct event *e = new_event(OP_DELETE, pid_tgid);
    if (e) {
        e->key = *key;
        e->ret = ret;
        submit(e);
    }
    delete_inflight.delete(&tid);
    return 0;
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
        e->handle = m.l_addr;
        e->index = index;
        bpf_probe_read_user_str(&e->path, sizeof(e->path), (void *)m.l_name);
        submit(e);
    }
    struct module_key mk = {.pid = pid_tgid >> 32, .base = m.l_addr};
    u8 one = 1;
    modules.update(&mk, &one);
    return forward ? m.l_next : m.l_prev;
}

// void *dlopen(const char *file, int mode): constructors run inside, so keys created while a
// dlopen is in flight on the same thread carry its id.
int dlopen_enter(struct pt_regs *ctx)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    if (!wanted(pid_tgid >> 32))
        return 0;
    u32 tid = (u32)pid_tgid;
    struct dlopen_args a = {};
    a.file = PT_REGS_PARM1(ctx);
    a.id = bpf_ktime_get_boot_ns();
    dlopen_inflight.update(&tid, &a);
    return 0;
}

int dlopen_return(struct pt_regs *ctx)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 tid = (u32)pid_tgid;
    struct dlopen_args *a = dlopen_inflight.lookup(&tid);
    if (!a)
        return 0;
    u64 handle = PT_REGS_RC(ctx);
    u64 id = a->id;
    struct event *e = new_event(OP_DLOPEN, pid_tgid);
    if (e) {
        e->load = id;
        e->handle = handle;
        if (a->file)
            bpf_probe_read_user_str(&e->path, sizeof(e->path), (void *)a->file);
        submit(e);
    }
    dlopen_inflight.delete(&tid);
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

TRACEPOINT_PROBE(syscalls, sys_enter_munmap)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    struct module_key mk = {.pid = pid_tgid >> 32, .base = args->addr};
    if (!modules.lookup(&mk))
        return 0;
    modules.delete(&mk);
    struct event *e = new_event(OP_UNMAP, pid_tgid);
    if (e) {
        e->handle = args->addr;
        submit(e);
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
        e->handle = PT_REGS_PARM1(ctx);
        submit(e);
    }
    return 0;
}

// task_newtask has clone_flags, so threads (CLONE_THREAD) are told apart from processes.
TRACEPOINT_PROBE(task, task_newtask)
{
    if (args->clone_flags & KT_CLONE_THREAD)
        return 0;
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 parent = pid_tgid >> 32;
    if (!wanted(parent))
        return 0;
    u32 child = args->pid;
#ifdef KT_FILTER
    u8 one = 1;
    traced.update(&child, &one);
#endif
    struct event *e = new_event(OP_FORK, pid_tgid);
    if (e) {
        e->other = child;
        submit(e);
    }
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exec)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    if (!wanted(pid_tgid >> 32))
        return 0;
    u32 tgid = pid_tgid >> 32;
    walked.delete(&tgid);  // a new image has a new link_map chain
    struct event *e = new_event(OP_EXEC, pid_tgid);
    if (e) {
        e->other = args->old_pid;
        unsigned short loc = args->data_loc_filename & 0xFFFF;
        bpf_probe_read_kernel_str(&e->path, sizeof(e->path), (char *)args + loc);
        submit(e);
    }
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 tgid = pid_tgid >> 32, tid = (u32)pid_tgid;
    // Per-thread scratch entries die with the thread, traced or not.
    create_inflight.delete(&tid);
    delete_inflight.delete(&tid);
    dlopen_inflight.delete(&tid);
#ifdef KT_GROUP_DEAD
    if (!args->group_dead)
        return 0;
#else
    if (tgid != tid)
        return 0;
#endif
    if (!wanted(tgid))
        return 0;
#ifdef KT_FILTER
    traced.delete(&tgid);
#endif
    struct event *e = new_event(OP_EXIT, pid_tgid);
    if (e)
        submit(e);
    return 0;
}
