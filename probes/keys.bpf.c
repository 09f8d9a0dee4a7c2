// keytrace probe unit "keys" (the resource tracer/resources/keys.py declares): pthread_key_create
// and pthread_key_delete, entry and return. A create is an acquire of resource KT_RES_KEYS: its
// handle is the key, its owner the destructor; it records the caller (the return address at the
// stack pointer), a user stack, and the dlopen in flight (modules unit) when there is one.

#define KT_HAVE_KEYS

struct create_args {
    u64 keyp;
    u64 destructor;
    u64 caller;
    u64 load;
    s64 stack;
};

BPF_HASH(create_inflight, u32, struct create_args, KT_MAX_ENTRIES);
BPF_HASH(delete_inflight, u32, u32, KT_MAX_ENTRIES);
BPF_STACK_TRACE(stacks, 16384);

static __always_inline void keys_thread_exit(u32 tid)
{
    create_inflight.delete(&tid);
    delete_inflight.delete(&tid);
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
#ifdef KT_HAVE_MODULES
    a.load = current_load(tid);
#endif
    // At entry the walk starts at the caller's caller (the caller's frame is not pushed yet):
    // user space puts `caller` in front.
    a.stack = stacks.get_stackid(ctx, BPF_F_USER_STACK);
    create_inflight.update(&tid, &a);
    return 0;
}

// One return program per C library flavour (the loader attaches the musl one to musl's libc),
// so a create says which limit applies even when its process is gone before user space looks.
static __always_inline int create_return_in(struct pt_regs *ctx, u64 libc)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 tid = (u32)pid_tgid;
    struct create_args *a = create_inflight.lookup(&tid);
    if (!a)
        return 0;
    int ret = PT_REGS_RC(ctx);
    kt_count(pid_tgid, KT_RES_KEYS, ret == 0 ? 0 : 1);
    struct event *e = new_event(ret == 0 ? OP_ACQUIRE : OP_ACQUIRE_FAILED, pid_tgid);
    if (e) {
        e->res = KT_RES_KEYS;
        e->ret = ret;
        e->owner = a->destructor;
        e->caller = a->caller;
        e->load = a->load;
        e->stack = a->stack;
        e->aux = libc;
        if (ret == 0)
            bpf_probe_read_user(&e->handle, sizeof(u32), (void *)a->keyp);  // a pthread_key_t
        submit(e);
    }
    create_inflight.delete(&tid);
    return 0;
}

int create_return(struct pt_regs *ctx) { return create_return_in(ctx, KT_LIBC_GLIBC); }
int create_return_musl(struct pt_regs *ctx) { return create_return_in(ctx, KT_LIBC_MUSL); }

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
    kt_count(pid_tgid, KT_RES_KEYS, ret == 0 ? 2 : 3);
    struct event *e = new_event(OP_RELEASE, pid_tgid);
    if (e) {
        e->res = KT_RES_KEYS;
        e->handle = *key;
        e->ret = ret;
        submit(e);
    }
    delete_inflight.delete(&tid);
    return 0;
}

// ---- planned sites (tracer/host/planner.py): probes on instructions inside the functions
// that the kernel emulates (a jcc), with a predicate on the flags that holds once per call.
// The loader generates one small program per site from these helpers, with the site's
// condition, registers and stack offset as constants: no entry single-step, no return probe.

static __always_inline u64 kt_caller(struct pt_regs *ctx, u64 offset)
{
    u64 caller = 0;
    bpf_probe_read_user(&caller, sizeof(caller), (void *)(PT_REGS_SP(ctx) + offset));
    return caller;
}

// Once per program image, the modules mapped now, from ld.so's link_map chain: a process that
// exits a millisecond after its first key (curl) is gone before user space could read its maps.
// rtld_delta: from the site to the GOT slot holding &_rtld_global, whose first word (_dl_ns[0].
// _ns_loaded) is the chain's head, the main program (no predecessor).
static __always_inline void walk_loaded(struct pt_regs *ctx, s64 rtld_delta, u64 pid_tgid)
{
#ifdef KT_HAVE_MODULES
    u32 tgid = pid_tgid >> 32;
    // Inside a dlopen the chain already holds the object being loaded: its dlopen reports it
    // (as that load's), and the objects before it, when it returns.
    if (!rtld_delta || walked.lookup(&tgid) || current_load((u32)pid_tgid))
        return;
    u8 one = 1;
    walked.update(&tgid, &one);
    u64 rtld = 0, lm = 0;
    struct link_map_head h = {};
    if (bpf_probe_read_user(&rtld, sizeof(rtld), (void *)(PT_REGS_IP(ctx) + rtld_delta)) || !rtld
        || bpf_probe_read_user(&lm, sizeof(lm), (void *)rtld) || !lm
        || bpf_probe_read_user(&h, sizeof(h), (void *)lm) || h.l_prev)
        return;  // not the layout expected: names come from the maps, as without the walk
    for (int i = 0; i < KT_MAX_MODULES; i++) {
        if (!lm)
            break;
        lm = report_module(lm, 0, KT_MAX_MODULES + i, pid_tgid, 1);
    }
#endif
}

static __always_inline int planned_create(struct pt_regs *ctx, u32 key, u64 destructor,
                                          u64 caller_offset, u64 libc, u32 seq, s64 rtld_delta)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    if (!wanted(pid_tgid >> 32))
        return 0;
    kt_count(pid_tgid, KT_RES_KEYS, 0);
    walk_loaded(ctx, rtld_delta, pid_tgid);
    struct event *e = new_event(OP_ACQUIRE, pid_tgid);
    if (!e)
        return 0;
    e->res = KT_RES_KEYS;
    e->handle = key;
    e->other = seq;
    e->owner = destructor;
    e->caller = kt_caller(ctx, caller_offset);
#ifdef KT_HAVE_MODULES
    e->load = current_load((u32)pid_tgid);
#endif
    // The site is in a leaf function that pushed no frame: the walk sees what an entry
    // probe sees (user space puts `caller` in front).
    e->stack = stacks.get_stackid(ctx, BPF_F_USER_STACK);
    e->aux = libc;
    submit(e);
    return 0;
}

static __always_inline int planned_create_failed(struct pt_regs *ctx, s32 err, u64 caller_offset,
                                                 u64 libc)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    if (!wanted(pid_tgid >> 32))
        return 0;
    kt_count(pid_tgid, KT_RES_KEYS, 1);
    struct event *e = new_event(OP_ACQUIRE_FAILED, pid_tgid);
    if (!e)
        return 0;
    e->res = KT_RES_KEYS;
    e->ret = err;
    e->caller = kt_caller(ctx, caller_offset);
    e->aux = libc;
    submit(e);
    return 0;
}

static __always_inline int planned_delete(struct pt_regs *ctx, u32 key, s32 ret, u32 seq)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    if (!wanted(pid_tgid >> 32))
        return 0;
    kt_count(pid_tgid, KT_RES_KEYS, ret == 0 ? 2 : 3);
    struct event *e = new_event(OP_RELEASE, pid_tgid);
    if (!e)
        return 0;
    e->res = KT_RES_KEYS;
    e->handle = key;
    e->ret = ret;
    e->other = seq;
    submit(e);
    return 0;
}
