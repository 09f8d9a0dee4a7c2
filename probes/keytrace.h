// keytrace: what every probe unit shares. Compiled by tracer/bpf/loader.py through bcc, after the
// definitions generated from tracer/wire.py (op codes, limits, struct event): no number is
// spelled here that Python also spells. Only user memory and tracepoint fields are read, never
// kernel structs, so headers from another kernel version (tracer/bpf/headers.py) serve.
//
// Records are submitted without a wake-up and drained on a short timer: a wake-up per record
// costs microseconds per traced call.
//
// Compile-time knobs (set by the loader):
//   KT_FILTER      trace only tgids in `traced` (and their forked children)
//   KT_RING_PAGES  ring buffer size in pages (power of two)
//   KT_GROUP_DEAD  sched_process_exit has the group_dead field
//   KT_SELF        the tracer's own tgid, never traced (its own forks would feed back)

#include <uapi/linux/ptrace.h>

#define KT_RESERVE_TRIES 3

BPF_RINGBUF_OUTPUT(events, KT_RING_PAGES);
BPF_PERCPU_ARRAY(lost, u64, 1);                  // reservations that failed
// tgid filter, used with KT_FILTER: 1 traced; 1 + n: traced once n more execs are done (a
// launched command's gate and setpriv, whose own work is not the command's)
BPF_HASH(traced, u32, u8, KT_MAX_ENTRIES);

static __always_inline int wanted(u32 tgid)
{
    if (tgid == KT_SELF)
        return 0;
#ifdef KT_FILTER
    u8 *v = traced.lookup(&tgid);
    return v && *v == 1;
#else
    return 1;
#endif
}

static __always_inline struct event *new_event(u32 op, u64 pid_tgid)
{
    struct event *e = NULL;
    // Kernels 6.15+ guard the ring with a resilient spinlock whose acquisition can fail
    // spuriously, with the ring nearly empty (seen here on 6.18): retries recover most.
    for (int i = 0; i < KT_RESERVE_TRIES && !e; i++)  // a bounded loop: the verifier allows it
        e = events.ringbuf_reserve(sizeof(struct event));
    if (!e) {
        u32 zero = 0;
        u64 *n = lost.lookup(&zero);
        if (n)
            (*n)++;
        return NULL;
    }
    __builtin_memset(e, 0, sizeof(*e) - KT_PATH_LEN);
    e->ts = bpf_ktime_get_boot_ns();
    e->pid = pid_tgid >> 32;
    e->tid = (u32)pid_tgid;
    e->op = op;
    e->stack = -1;
    bpf_get_current_comm(&e->comm, sizeof(e->comm));
    e->path[0] = 0;
    return e;
}

static __always_inline void submit(struct event *e)
{
    events.ringbuf_submit(e, BPF_RB_NO_WAKEUP);
}
