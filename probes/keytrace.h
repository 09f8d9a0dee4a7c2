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

#include <uapi/linux/ptrace.h>

#define KT_RESERVE_TRIES 3

BPF_RINGBUF_OUTPUT(events, KT_RING_PAGES);
BPF_PERCPU_ARRAY(lost, u64, 1);                  // reservations that failed
// tgid filter, used with KT_FILTER: 1 traced; 1 + n: traced once n more execs are done (a
// launched command's gate and setpriv, whose own work is not the command's)
BPF_HASH(traced, u32, u8, KT_MAX_ENTRIES);
// The tracer's own tgid, never traced on a host-wide run (its own forks would feed back): written
// by the loader at load, not compiled in, so that one compiled object serves every run.
BPF_ARRAY(kt_self, u32, 1);

static __always_inline int wanted(u32 tgid)
{
#ifdef KT_FILTER
    u8 *v = traced.lookup(&tgid);  // (the tracer is never in it)
    return v && *v == 1;
#else
    u32 zero = 0;
    u32 *self = kt_self.lookup(&zero);
    return !self || tgid != *self;
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

// Per process image (tgid) and resource, since its exec or since tracing began: counted before
// any record is reserved, so a lost record may cost detail (which handle, who acquired it),
// never a count. The resources' units count here; the lifecycle unit forgets an image's counts
// at its exec.
struct kt_of {
    u32 tgid;
    u32 res;
};
struct kt_counts {
    u64 acquires;         // successful
    u64 failed_acquires;
    u64 releases;         // successful
    u64 failed_releases;
};
BPF_TABLE("lru_hash", struct kt_of, struct kt_counts, counts, KT_MAX_ENTRIES);

// Count one call: which = 0 acquire, 1 failed acquire, 2 release, 3 failed release.
static __always_inline void kt_count(u64 pid_tgid, u32 res, int which)
{
    struct kt_of of = {.tgid = pid_tgid >> 32, .res = res};
    struct kt_counts zero = {};
    struct kt_counts *c = counts.lookup_or_try_init(&of, &zero);
    if (!c)
        return;
    if (which == 0)
        __sync_fetch_and_add(&c->acquires, 1);
    else if (which == 1)
        __sync_fetch_and_add(&c->failed_acquires, 1);
    else if (which == 2)
        __sync_fetch_and_add(&c->releases, 1);
    else
        __sync_fetch_and_add(&c->failed_releases, 1);
}

static __always_inline void counts_exec(u32 tgid)
{
    for (u32 res = 0; res < KT_RESOURCES; res++) {  // a new image: its own counts, as the ledger's
        struct kt_of of = {.tgid = tgid, .res = res};
        counts.delete(&of);
    }
}
