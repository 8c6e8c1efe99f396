"""CPU thread counts that never oversubscribe the cores this process may use (issue 15 §6).

    from xclip.utils.threads import configure_threads
    configure_threads()            # first line of every entry point's main()
    configure_threads(4)           # explicit choice (a ``--threads`` flag), still capped by OMP_THREAD_LIMIT

Why: torch sizes its intra-op pool from the machine (``at::get_num_threads()`` = cores seen by OpenMP), not from
what is free.  Every OpenMP parallel region ends in a barrier; when any of its threads is descheduled (other
processes, DDP ranks, DataLoader workers that each start their own pool, OpenBLAS/MKL pools nested inside OpenMP)
the whole region waits for it.  On a shared 2-core machine that turned 20 VQGAN steps from 4.2 s into 131 s.

The choice (first that applies):
  1. ``threads`` argument (e.g. ``--threads N``), else ``OMP_NUM_THREADS`` / ``XCLIP_THREADS`` when set;
  2. otherwise ``usable_cores() // local_world_size()`` (cores in the affinity mask and the cgroup CPU quota,
     physical cores only, shared among the DDP ranks of this node). The count never depends on the momentary
     load of the machine: the same command gives the same thread count and so the same floating-point results
     run after run (on a machine shared with other jobs, set ``OMP_NUM_THREADS`` / ``--threads`` yourself: there
     20 VQGAN steps took 65.9 s with 2 threads against 16.5 s with 1, ``benchmarks/threads.py``);
  3. always capped by ``OMP_THREAD_LIMIT`` (torch 2.14 gave garbage conv gradients with more torch threads than
     OpenMP provides) and at least 1.
Inter-op threads are set to 1 (Lightning / our code never runs independent ops concurrently, and a second pool
only competes with the first).  An explicit count is exported as ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` /
``OPENBLAS_NUM_THREADS`` for child processes; the automatic one is not, so that Lightning's DDP launchers divide the
cores among the ranks themselves (they do so only while ``OMP_NUM_THREADS`` is unset).  DataLoader workers compute
on one thread each (torch's worker loop sets this; :func:`worker_init_fn` does the same for custom loaders).
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path

log = logging.getLogger(__name__)

THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
_configured: int | None = None


def _positive_int(value: str | None) -> int | None:
    value = (value or "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def _cgroup_quota() -> float | None:
    """CPUs allowed by the cgroup (v2 cpu.max or v1 cfs quota); None when unlimited or unknown."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            return int(quota) / int(period)
        return None
    except (OSError, ValueError):
        pass
    try:
        q = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        p = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return q / p if q > 0 and p > 0 else None
    except (OSError, ValueError):
        return None


def _physical_fraction() -> float:
    """Physical cores / logical CPUs (0.5 with SMT), from /proc/cpuinfo; 1.0 when unknown."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return 1.0
    logical, cores, phys = 0, set(), None
    for line in text.splitlines():
        key, _, val = line.partition(":")
        key = key.strip()
        if key == "processor":
            logical += 1
        elif key == "physical id":
            phys = val.strip()
        elif key == "core id":
            cores.add((phys, val.strip()))
    return min(1.0, len(cores) / logical) if logical and cores else 1.0


def usable_cores() -> int:
    """Physical cores this process may run on: affinity mask, cgroup quota, SMT siblings counted once."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        n = min(n, max(1, math.floor(quota)))
    return max(1, int(n * _physical_fraction()))


def local_world_size() -> int:
    """Processes sharing this node's cores (torchrun / Lightning DDP / SLURM); 1 when not distributed."""
    for var in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        n = _positive_int(os.environ.get(var))
        if n:
            return n
    return 1


def choose_threads(threads: int | None = None) -> tuple[int, str]:
    """(intra-op thread count, why) without changing anything."""
    limit = _positive_int(os.environ.get("OMP_THREAD_LIMIT"))
    if threads is not None and threads > 0:
        n, why = threads, "requested"
    elif _positive_int(os.environ.get("XCLIP_THREADS")):
        n, why = _positive_int(os.environ.get("XCLIP_THREADS")), "XCLIP_THREADS"
    elif _positive_int(os.environ.get("OMP_NUM_THREADS")):
        n, why = _positive_int(os.environ.get("OMP_NUM_THREADS")), "OMP_NUM_THREADS"
    else:
        cores, ranks = usable_cores(), local_world_size()
        n = max(1, cores // ranks)
        why = f"{cores} usable core(s) / {ranks} local rank(s)"
    if limit is not None and n > limit:
        n, why = limit, f"{why}; capped by OMP_THREAD_LIMIT={limit}"
    return max(1, n), why


def configure_threads(threads: int | None = None, *, quiet: bool = False) -> int:
    """Set torch's intra-op threads (see module doc), inter-op threads 1, and the thread variables of child
    processes.  Returns the intra-op thread count.  Safe to call more than once."""
    global _configured
    import torch

    n, why = choose_threads(threads)
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or inter-op work already ran: keep what is there
        pass
    if threads is not None and threads > 0:  # an explicit choice also holds for child processes (DDP ranks)
        for var in THREAD_ENV:
            os.environ[var] = str(n)
    # Automatic choice: OMP_NUM_THREADS stays unset, so Lightning's DDP launchers still give each of the N ranks
    # cpu_count // N threads (they do so only when the variable is unset).
    if not quiet and _configured != n:
        log.info("threads: %d intra-op, %d inter-op (%s); set --threads / OMP_NUM_THREADS to override",
                 n, torch.get_num_interop_threads(), why)
    _configured = n
    return n


def worker_init_fn(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: each worker process computes on one thread (workers already run in
    parallel with each other and with the main process)."""
    import torch

    torch.set_num_threads(1)
    for var in THREAD_ENV:  # for processes the worker starts itself
        os.environ[var] = "1"
