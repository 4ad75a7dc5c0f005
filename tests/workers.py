"""Run a test function on K Gloo worker processes on CPU.

A :class:`WorkerPool` starts K spawned processes that join one Gloo process group and then
serve tasks: ``pool.run(fn, *args)`` calls ``fn(*args)`` on every rank and returns the K
results in rank order. Pools are kept for the whole session (one per K), so a test pays for
process start-up and ``import torch`` once, not per test.

Failures are never silent and never hang: if any rank raises, the call raises
:class:`WorkerError` with every failing rank's traceback; if a rank does not answer within
the timeout (a collective that one rank never joined, say), the pool is torn down, the call
raises, and the next call starts a fresh pool.

``fn`` must be picklable (a module-level function). Inside it, ``torch.distributed`` is
initialized; rank and world size come from ``dist.get_rank()`` / ``dist.get_world_size()``.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import time
import traceback
from multiprocessing.connection import wait
from typing import Any, Callable, List, Optional

from pyowt.launch import die_with_parent, join_loopback_group, loopback_store

# Collectives that never complete surface as errors after this long, inside the workers.
PG_TIMEOUT_S = 60


class WorkerError(RuntimeError):
    """One or more ranks failed or timed out; the message holds their tracebacks."""


def _worker_main(rank: int, world_size: int, port: int, conn, threads: int, parent_pid: int) -> None:
    die_with_parent(parent_pid)  # a killed test session leaves no pool behind
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    try:
        join_loopback_group("gloo", port, rank, world_size, PG_TIMEOUT_S)  # the pool's store
    except BaseException:  # noqa: BLE001 - report, then exit
        conn.send(("err", traceback.format_exc()))
        return
    conn.send(("ok", "ready"))
    while True:
        try:
            task = conn.recv()
        except EOFError:
            break
        if task is None:
            break
        fn, args, kwargs = task
        try:
            result = fn(*args, **kwargs)
            reply = ("ok", result)
        except BaseException:  # noqa: BLE001 - everything goes back to the parent
            reply = ("err", traceback.format_exc())
        # An idle worker must not keep its last task's peak: the pools of every world size
        # stay alive for the session, and on a 24 GiB machine the torchvision-AlexNet tests
        # at K = 3 and 4 left ~1 GB available, so one more retained heap got a worker
        # OOM-killed (the "flaky" owt-b-4 parity failure: a rank exiting with -9).
        del task, fn, args, kwargs
        _release_memory()
        conn.send(reply)
    dist.destroy_process_group()


# A worker releases memory after a task only when its resident set grew by this much since
# the last release: a full gc.collect() costs ~145 ms with torch loaded, which hundreds of
# small tasks would pay for nothing.
RELEASE_GROWTH_BYTES = 256 << 20
_rss_after_release = [0]


def _rss_bytes() -> int:
    """Resident set size of this process (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc's malloc_trim), when
    the last tasks grew the process by RELEASE_GROWTH_BYTES or more."""
    import ctypes
    import gc

    if _rss_bytes() - _rss_after_release[0] < RELEASE_GROWTH_BYTES:
        return
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass
    _rss_after_release[0] = _rss_bytes()


class WorkerPool:
    """K Gloo worker processes on this machine (see the module docstring)."""

    def __init__(self, world_size: int, threads: int = 1, start_timeout: float = 120.0):
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.world_size = world_size
        ctx = mp.get_context("spawn")
        # Held for the pool's life: the ranks' subgroups rendezvous through it too.
        self._store = loopback_store(PG_TIMEOUT_S)
        self.conns, self.procs = [], []
        for rank in range(world_size):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker_main, args=(rank, world_size, self._store.port, child, threads,
                                                       os.getpid()), daemon=True)
            p.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(p)
        self._collect("start-up", start_timeout)

    def _collect(self, what: str, timeout: float) -> List[Any]:
        results: List[Any] = [None] * self.world_size
        errors = {}
        pending = {conn: rank for rank, conn in enumerate(self.conns)}
        deadline = time.monotonic() + timeout
        while pending:
            # Once a rank has failed, the others get a short grace period: they may be
            # stuck in a collective the failed rank will never join.
            left = deadline - time.monotonic()
            if errors:
                left = min(left, 5.0)
            if left <= 0:
                break
            for conn in wait(list(pending), timeout=left):
                rank = pending.pop(conn)
                try:
                    status, payload = conn.recv()
                except EOFError:
                    status, payload = "err", f"worker exited with code {self.procs[rank].exitcode}"
                if status == "ok":
                    results[rank] = payload
                else:
                    errors[rank] = payload
            if errors and not pending:
                break
        if pending or errors:
            hung = sorted(pending.values())
            if hung:
                self.close(force=True)
            parts = [f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items())]
            if hung:
                parts.append(f"ranks {hung} did not finish {what} within {timeout:.0f} s"
                             + (" (after another rank failed)" if errors else "") + "; pool restarted")
            raise WorkerError(f"{what} failed on {self.world_size} workers:\n" + "\n".join(parts))
        return results

    @property
    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def run(self, fn: Callable, *args, timeout: float = 120.0, **kwargs) -> List[Any]:
        """Call ``fn(*args, **kwargs)`` on every rank; return the results in rank order."""
        if not self.alive:
            raise WorkerError("worker pool is not alive")
        for conn in self.conns:
            conn.send((fn, args, kwargs))
        return self._collect(getattr(fn, "__name__", repr(fn)), timeout)

    def close(self, force: bool = False) -> None:
        for conn in self.conns:
            try:
                if not force:
                    conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        for p in self.procs:
            p.join(timeout=0 if force else 10)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        for conn in self.conns:
            conn.close()
        self.procs = []
        self.conns = []


# Below this much available memory the idle pools of other world sizes are closed before
# a run: worker processes keep what their last test allocated, and the slow tests over
# torchvision's AlexNet (2-4 GB per worker) OOM-killed workers on a 24 GiB machine with
# the pools of K = 1..4 (10 processes) alive together.
LOW_MEMORY_BYTES = 8 << 30


def available_memory() -> Optional[int]:
    """MemAvailable from /proc/meminfo in bytes (None where there is no such file)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class PoolCache:
    """One live pool per world size, restarted after a failure that killed it; idle pools
    are closed when memory runs low."""

    def __init__(self):
        self._pools = {}

    def _free_idle_pools(self, keep: int) -> None:
        avail = available_memory()
        if avail is None or avail >= LOW_MEMORY_BYTES:
            return
        for k in [k for k in self._pools if k != keep]:
            self._pools.pop(k).close()

    def get(self, world_size: int) -> WorkerPool:
        pool = self._pools.get(world_size)
        if pool is None or not pool.procs or not pool.alive:
            pool = WorkerPool(world_size)
            self._pools[world_size] = pool
        return pool

    def run(self, world_size: int, fn: Callable, *args, timeout: float = 120.0, **kwargs) -> List[Any]:
        self._free_idle_pools(keep=world_size)
        return self.get(world_size).run(fn, *args, timeout=timeout, **kwargs)

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
