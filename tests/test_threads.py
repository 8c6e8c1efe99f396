"""utils/threads.py: thread counts never exceed the free cores (issue 15 §6)."""
import os

import pytest
import torch

from xclip.utils import threads


@pytest.fixture
def machine(monkeypatch):
    """A fake 8-CPU machine (no cgroup quota, no SMT) with a settable load average."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "XCLIP_THREADS", "OMP_THREAD_LIMIT",
                "LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        monkeypatch.delenv(var, raising=False)
    state = {"load": 0.0, "cpus": 8, "affinity": set(range(8))}
    monkeypatch.setattr(os, "cpu_count", lambda: state["cpus"])
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: state["affinity"], raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (state["load"], 0.0, 0.0))
    monkeypatch.setattr(threads, "_cgroup_quota", lambda: None)
    monkeypatch.setattr(threads, "_physical_fraction", lambda: 1.0)
    n = torch.get_num_threads()
    yield state
    torch.set_num_threads(n)


def test_idle_machine_uses_its_cores_shared_among_local_ranks(machine, monkeypatch):
    assert threads.choose_threads()[0] == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert threads.choose_threads()[0] == 2


def test_the_choice_does_not_depend_on_the_load(machine):
    """Same command, same thread count, same floating-point results: the load average is never read."""
    for load in (0.0, 6.2, 40.0):
        machine["load"] = load
        assert threads.choose_threads()[0] == 8
    machine["affinity"] = {0, 1, 2, 3}  # a cpuset of 4 CPUs
    assert threads.choose_threads()[0] == 4


def test_explicit_and_environment_choices_win_but_omp_thread_limit_caps(machine, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.choose_threads()[0] == 3
    assert threads.choose_threads(5)[0] == 5
    monkeypatch.setenv("OMP_THREAD_LIMIT", "2")
    assert threads.choose_threads(5) == (2, "requested; capped by OMP_THREAD_LIMIT=2")


def test_configure_threads_sets_torch_and_exports_only_explicit_counts(machine, monkeypatch):
    machine["affinity"] = {0}
    assert threads.configure_threads(quiet=True) == 1 and torch.get_num_threads() == 1
    assert "OMP_NUM_THREADS" not in os.environ  # left to Lightning's DDP launchers, which divide among ranks
    monkeypatch.setattr(os, "environ", dict(os.environ))
    assert threads.configure_threads(2, quiet=True) == 2 and torch.get_num_threads() == 2
    assert os.environ["OMP_NUM_THREADS"] == "2" and os.environ["MKL_NUM_THREADS"] == "2"
