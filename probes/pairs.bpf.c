// keytrace probe unit "pairs": any acquire/release pair of library functions a user declares
// (keytrace watch --pair 'LIB:ACQUIRE=WHERE/RELEASE=WHERE'). The programs per pair are generated
// by tracer/bpf/pairs.py (one small wrapper each, with the pair's resource id and where its
// handle is as constants) and call the helpers here. Compiled after the keys unit, whose user
// stack map it shares.
//
// An acquire gets an entry probe (what its arguments are, the caller, the stack, the dlopen in
// flight) and a return probe (did it succeed, and the handle: the return value, an argument, or
// what an out-pointer argument points at now). A release gets an entry probe: its handle is an
// argument. Every call is counted in the kernel too (keytrace.h's counts, per resource).

#define KT_HAVE_PAIRS

// Where an acquire leaves its handle (KP_HANDLE_*), and what success is (KP_OK_*).
#define KP_HANDLE_RET 0     // the return value
#define KP_HANDLE_ARG 1     // an argument, as passed
#define KP_HANDLE_DEREF 2   // what an argument points at, read at return
#define KP_OK_ZERO 0        // returns 0 (a status)
#define KP_OK_POSITIVE 1    // returns a pointer (not NULL) or a positive number
#define KP_OK_NONNEG 2      // returns an int >= 0 (a descriptor)
#define KP_OK_ALWAYS 3      // returns nothing to judge by

struct pair_args {
    u64 arg;      // the argument the handle is (or points at)
    u64 caller;
    u64 load;
    s64 stack;
};

// In flight per (thread, resource): an acquire of one pair may run inside another's.
BPF_HASH(pair_inflight, u64, struct pair_args, KT_MAX_ENTRIES);

static __always_inline u64 pair_arg(struct pt_regs *ctx, int n)
{
    switch (n) {
    case 0: return PT_REGS_PARM1(ctx);
    case 1: return PT_REGS_PARM2(ctx);
    case 2: return PT_REGS_PARM3(ctx);
    case 3: return PT_REGS_PARM4(ctx);
    case 4: return PT_REGS_PARM5(ctx);
    case 5: return PT_REGS_PARM6(ctx);
    }
    return 0;
}

static __always_inline u64 pair_width(u64 v, int width)
{
    return width == 4 ? (v & 0xFFFFFFFFULL) : v;
}

static __always_inline int pair_enter(struct pt_regs *ctx, u32 res, int argn)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    if (!wanted(pid_tgid >> 32))
        return 0;
    u32 tid = (u32)pid_tgid;
    struct pair_args a = {};
    a.arg = argn >= 0 ? pair_arg(ctx, argn) : 0;
    // At the entry (or a site before anything moved the stack) the return address is at sp.
    bpf_probe_read_user(&a.caller, sizeof(a.caller), (void *)PT_REGS_SP(ctx));
#ifdef KT_HAVE_MODULES
    a.load = current_load(tid);
#endif
    a.stack = stacks.get_stackid(ctx, BPF_F_USER_STACK);
    u64 k = ((u64)tid << 8) | res;
    pair_inflight.update(&k, &a);
    return 0;
}

static __always_inline int pair_return(struct pt_regs *ctx, u32 res, int how, int width, int ok_if)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u64 k = ((u64)(u32)pid_tgid << 8) | res;
    struct pair_args *a = pair_inflight.lookup(&k);
    if (!a)
        return 0;
    u64 ret = PT_REGS_RC(ctx);
    int ok = ok_if == KP_OK_ZERO ? (u32)ret == 0
           : ok_if == KP_OK_POSITIVE ? (s64)ret > 0
           : ok_if == KP_OK_NONNEG ? (s32)ret >= 0 : 1;
    kt_count(pid_tgid, res, ok ? 0 : 1);
    struct event *e = new_event(ok ? OP_ACQUIRE : OP_ACQUIRE_FAILED, pid_tgid);
    if (e) {
        e->res = res;
        e->ret = (s32)ret;
        e->caller = a->caller;
        e->load = a->load;
        e->stack = a->stack;
        if (ok) {
            u64 h = how == KP_HANDLE_RET ? ret : a->arg;
            if (how == KP_HANDLE_DEREF) {
                h = 0;
                bpf_probe_read_user(&h, width == 4 ? 4 : 8, (void *)a->arg);
            }
            e->handle = pair_width(h, width);
        }
        submit(e);
    }
    pair_inflight.delete(&k);
    return 0;
}

static __always_inline int pair_release(struct pt_regs *ctx, u32 res, int argn, int width)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    if (!wanted(pid_tgid >> 32))
        return 0;
    kt_count(pid_tgid, res, 2);
    struct event *e = new_event(OP_RELEASE, pid_tgid);
    if (e) {
        e->res = res;
        e->handle = pair_width(pair_arg(ctx, argn), width);
        submit(e);
    }
    return 0;
}

static __always_inline void pairs_thread_exit(u32 tid)
{
    for (u32 res = 0; res < KT_RESOURCES; res++) {
        u64 k = ((u64)tid << 8) | res;
        pair_inflight.delete(&k);
    }
}
