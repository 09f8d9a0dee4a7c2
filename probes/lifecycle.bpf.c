// keytrace probe unit "lifecycle": fork, exec and exit from tracepoints (never kprobes: they
// may be absent). Included last: its exit handler also frees the other units' per-thread state.

#define KT_CLONE_THREAD 0x00010000

// The launched command's whole tree (tgids), kept here so that keytrace can end all of it at the
// end, double-forked daemons included, whatever records the ring lost.
BPF_HASH(launched, u32, u8, KT_MAX_ENTRIES);

// task_newtask has clone_flags, so threads (CLONE_THREAD) are told apart from processes.
TRACEPOINT_PROBE(task, task_newtask)
{
    if (args->clone_flags & KT_CLONE_THREAD)
        return 0;
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 parent = pid_tgid >> 32;
    u32 child = args->pid;
    if (launched.lookup(&parent)) {
        u8 yes = 1;
        launched.update(&child, &yes);
    }
    if (!wanted(parent))
        return 0;
#ifdef KT_FILTER
    u8 one = 1;
    traced.update(&child, &one);
#endif
#ifdef KT_HAVE_CALLS
    calls_fork(parent, child);  // the child is the same program
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
#ifdef KT_FILTER
    u32 me = pid_tgid >> 32;
    u8 *v = traced.lookup(&me);
    if (v && *v > 1)
        (*v)--;
#endif
    if (!wanted(pid_tgid >> 32))
        return 0;
    u32 tgid = pid_tgid >> 32;
#ifdef KT_HAVE_MODULES
    walked.delete(&tgid);  // a new image has a new link_map chain
#endif
#ifdef KT_HAVE_CALLS
    calls_gone(tgid);
#endif
    counts_exec(tgid);
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
#ifdef KT_HAVE_KEYS
    keys_thread_exit(tid);
#endif
#ifdef KT_HAVE_MODULES
    modules_thread_exit(tid);
#endif
#ifdef KT_HAVE_PAIRS
    pairs_thread_exit(tid);
#endif
#ifdef KT_HAVE_CALLS
    calls_thread_exit(tid);
#endif
#ifdef KT_GROUP_DEAD
    if (!args->group_dead)
        return 0;
#else
    if (tgid != tid)
        return 0;
#endif
    launched.delete(&tgid);
#ifdef KT_HAVE_MODULES
    walked.delete(&tgid);  // a later process on this pid has its own chain to walk
#endif
#ifdef KT_HAVE_CALLS
    calls_gone(tgid);  // (a prefork server's workers would fill the map otherwise)
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
