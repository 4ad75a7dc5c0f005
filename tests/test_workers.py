"""The multi-process Gloo test harness itself: results, failures and hangs."""
import time

import pytest
import torch
import torch.distributed as dist

from .workers import WorkerError


def _rank_and_sum():
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    return dist.get_rank(), dist.get_world_size(), t.item()


def _fail_on_rank(bad):
    if dist.get_rank() == bad:
        raise AssertionError(f"planted failure on rank {bad}")
    return "fine"


def _hang_unless_rank0():
    # Rank 0 returns; the others wait in a collective rank 0 never joins.
    if dist.get_rank() != 0:
        dist.barrier()
    return "done"


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_runs_on_k_ranks(run_workers, k):
    results = run_workers(k, _rank_and_sum)
    assert results == [(r, k, k * (k + 1) / 2) for r in range(k)]


def test_failing_rank_traceback_is_reported(run_workers):
    with pytest.raises(WorkerError, match=r"(?s)rank 1 ---.*planted failure on rank 1"):
        run_workers(2, _fail_on_rank, 1)
    # The pool survives a symmetric, completed call.
    assert run_workers(2, _fail_on_rank, 5) == ["fine", "fine"]


def test_hang_ends_in_error_and_pool_restarts(run_workers):
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match=r"ranks \[1\] did not finish"):
        run_workers(2, _hang_unless_rank0, timeout=5)
    assert time.monotonic() - t0 < 30
    assert run_workers(2, _rank_and_sum)[0] == (0, 2, 3.0)


def test_idle_pools_close_when_memory_runs_low(monkeypatch):
    from . import workers

    cache = workers.PoolCache()
    try:
        assert cache.run(1, _rank_and_sum) == [(0, 1, 1.0)]
        one = cache.get(1)
        procs = list(one.procs)
        monkeypatch.setattr(workers, "available_memory", lambda: workers.LOW_MEMORY_BYTES + 1)
        cache.run(2, _rank_and_sum)
        assert cache.get(1) is one and one.alive  # enough memory: the K=1 pool stays
        monkeypatch.setattr(workers, "available_memory", lambda: workers.LOW_MEMORY_BYTES - 1)
        assert cache.run(2, _rank_and_sum) == [(0, 2, 3.0), (1, 2, 3.0)]
        assert 1 not in cache._pools and not any(p.is_alive() for p in procs)  # low memory: it went
    finally:
        cache.close()
    assert workers.available_memory() is None or workers.available_memory() > 0
