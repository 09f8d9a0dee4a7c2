// keytrace probe unit "keys": pthread_key_create and pthread_key_delete, entry and return.
// A create records the key, the destructor, the caller (the return address at the stack
// pointer), a user stack, and the dlopen in flight (modules unit) when there is one.

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
    struct event *e = new_event(ret == 0 ? OP_CREATE : OP_CREATE_FAILED, pid_tgid);
    if (e) {
        e->ret = ret;
        e->destructor = a->destructor;
        e->caller = a->caller;
        e->load = a->load;
        e->stack = a->stack;
        e->handle = libc;
        if (ret == 0)
            bpf_probe_read_user(&e->key, sizeof(e->key), (void *)a->keyp);
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
    struct event *e = new_event(OP_DELETE, pid_tgid);
    if (e) {
        e->key = *key;
        e->ret = ret;
        submit(e);
    }
    delete_inflight.delete(&tid);
    return 0;
}
