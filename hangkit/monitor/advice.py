"""What to do about each kind of hang: the troubleshooting table users already know (the hang
catalogue's ids: DL-01, TD-01, ...), in one place for every rule that names one."""

ADVICE = {
    "TD-01": ("Every rank must call the same collectives in the same order. Move rank-only work "
              "(evaluation, checkpointing, logging) out of the collective sequence, or make every "
              "rank take part; guard rank-0-only code so it never contains a collective."),
    "TD-02": ("Collectives must match in op, order and shape on every rank. Look for "
              "rank-dependent branches around these calls; TORCH_DISTRIBUTED_DEBUG=DETAIL reports "
              "mismatches on the next run."),
    "TD-04": ("One rank raised while the others wait for it in a collective, which can never "
              "complete now. Fix what it raised (its traceback is above); with "
              "hangkit.training's ErrorFlag the others raise PeerFailed at the next step "
              "instead of waiting. In a notebook, cluster.interrupt() ends the waiting ranks' "
              "work."),
    "TD-09": ("NCCL collectives run asynchronously: a rank's Python line is where it next "
              "synchronises, not where it issued the collective. The recorder's state says "
              "which ranks scheduled, started and completed it; look at the ranks that never "
              "scheduled it, or whose earlier GPU work never finished."),
    "TD-10": ("A collective of a subgroup (new_group) is waiting for a member that is elsewhere, "
              "while the default group is fine. Every member of a group must call its "
              "collectives in the same order; check rank-dependent code around this group's "
              "calls (pipeline stages, tensor-parallel groups)."),
    "MP-02": ("Every rank of the communicator must call the same MPI collectives in the same "
              "order. Look for rank-dependent branches or early returns before this call."),
    "all-in-collective": ("Every rank seen here waits in the same collective: a rank that is not "
                          "on this node, or one that died, never joined. Check the other nodes' "
                          "logs, the launcher's rank count, and the network (NCCL_DEBUG=INFO)."),
    "TD-05": ("Rendezvous did not complete. Check that MASTER_ADDR is the first host of the job "
              "(PBS_NODEFILE), that MASTER_PORT is free (a port held by an earlier run gives "
              "EADDRINUSE), and that WORLD_SIZE equals the number of ranks launched."),
    "TD-06": ("Ranks got different numbers of batches (a shard split by hand, a batch skipped "
              "on one rank, no drop_last): the rank that ran out left the training loop while "
              "the others still wait in a step's collectives. Give every rank the same number "
              "of batches (DistributedSampler with drop_last=True), or wrap the loop in DDP's "
              "model.join() (torch.distributed.algorithms.Join) for uneven inputs."),
    "WJ-01": ("A tracker or service is waiting on a network the compute node cannot reach. Set "
              "WANDB_MODE=offline (sync later with `wandb sync`), or configure the proxy, and run "
              "tracker init under a deadline so training continues without it."),
    "network-wait": ("A process waits on a network peer that does not answer. Check that the "
                     "address is reachable from the compute node and set a timeout on the call."),
    "slow-filesystem": ("I/O on a shared filesystem is stalled or very slow. Stage data to "
                        "node-local storage or /dev/shm, avoid many small files, and give "
                        "DataLoader a timeout so a stalled read fails instead of hanging."),
    "DL-01": ("A DataLoader worker is stuck in the dataset code. Fix the blocking call it "
              "shows (I/O on a hung filesystem, an endless loop); pass timeout= to DataLoader so "
              "the next stall raises instead of hanging silently."),
    "DL-04": ("A process forked while another thread held a lock, so the lock is never released "
              "in the child. Use the spawn or forkserver start method "
              "(DataLoader(multiprocessing_context='spawn')), or start threads only after "
              "workers exist; set OMP_NUM_THREADS=1."),
    "IP-04": ("The process is running, not deadlocked. If it should be advancing, it may be slow: "
              "check oversubscription (ranks x DataLoader workers vs cores), OMP_NUM_THREADS, "
              "and CPU binding (mpiexec --depth/--cpu-bind); if it loops, the stack shows where."),
    "dead-rank": ("A rank's process is gone while the others wait for it. Find why it died: its "
                  "own output and exit status, `dmesg` for the OOM killer, the node's health. "
                  "Collectives cannot complete without it; restart from the last checkpoint."),
    "fifo-wait": ("The process waits on a named pipe (FIFO) or a pipe: opening one waits until "
                  "another process opens its other end, reading waits until it writes. Nothing "
                  "is wrong with the filesystem: find the process that should be at the other "
                  "end (a checkpoint writer, a log reader) and why it never came."),
    "looping": ("The process runs but goes round the same few places without printing or "
                "reporting progress: a retry loop (a connection, a lock, a file it waits for), "
                "or a training loop that neither logs nor calls hangkit.progress(). The stacks "
                "show where it turns; give the loop a deadline, or report progress from it."),
    "unknown": ("No known hang pattern matched. The groups and the merged tree show where each "
                "rank stands; compare them with what the ranks should be doing."),
}
