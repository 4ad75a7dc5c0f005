"""Spawn K local worker processes joined in one process group (the ``--workers K`` mode).

``torchrun`` is the way to run on several machines; this is the single-machine shortcut the
CLI uses. The rendezvous binds to the loopback address only, so nothing outside this machine
can join or reach it.
"""
from __future__ import annotations

import atexit
import contextlib
import ctypes
import multiprocessing as mp
import os
import signal
import sys
import threading
import traceback
import warnings
from datetime import timedelta
from multiprocessing.connection import wait
from typing import Any, Callable, List, Optional, Sequence


class WorkerFailed(RuntimeError):
    """A spawned worker raised or died; the message holds its traceback."""


def loopback_store(timeout_s: float):
    """A ``TCPStore`` server on 127.0.0.1, on a port the OS picks as it binds, for workers to
    join as clients (``store.port``); it lives as long as the returned object.

    Not "find a free port, let rank 0 bind it later": between the two, any process on the
    machine can take that port, and two jobs' ranks can meet in one store (the likely cause
    of a CI failure: a rank 0 failing in Gloo's connectFullMesh while its rank 1 returned).
    """
    import torch.distributed as dist

    return dist.TCPStore("127.0.0.1", 0, None, True, timeout=timedelta(seconds=timeout_s),
                         wait_for_workers=False)


def join_loopback_group(backend: str, port: int, rank: int, world_size: int, timeout_s: float) -> None:
    """In a worker: ``init_process_group`` through the :func:`loopback_store` on ``port``."""
    import torch.distributed as dist

    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore("127.0.0.1", port, None, False, timeout=timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)


def restore_handler(signum: int, handler) -> None:
    """Put back what ``signal.signal`` returned: ``None`` (a handler installed outside Python)
    cannot be put back, and becomes the default action."""
    signal.signal(signum, signal.SIG_DFL if handler is None else handler)


def die_with_parent(parent_pid: int) -> None:
    """Linux: have the kernel SIGKILL this worker when the parent dies. A parent killed by a
    signal (`kill <pid>` sends SIGTERM) cannot stop its workers, which would otherwise train
    on as orphans with nobody to report to. Elsewhere: nothing."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, int(signal.SIGKILL), 0, 0, 0) != 0:  # 1: PR_SET_PDEATHSIG
            return
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before the call above
        os._exit(1)


def _entry(rank, world_size, port, backend, timeout_s, threads, fn, args, conn, parent_pid):
    die_with_parent(parent_pid)
    import torch
    import torch.distributed as dist

    if threads:
        torch.set_num_threads(threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    try:
        join_loopback_group(backend, port, rank, world_size, timeout_s)
        try:
            result = fn(*args)
        finally:
            dist.destroy_process_group()
        conn.send(("ok", result))
        code = 0
    except KeyboardInterrupt:
        # Ctrl-C reaches every process of the terminal's group: the parent says so once.
        code = 130
    except BaseException:  # noqa: BLE001 - the parent reports it
        try:
            conn.send(("err", traceback.format_exc()))
        except OSError:  # the parent is gone
            pass
        code = 1
    # The result is in the pipe and the process group is gone. What is left is the
    # interpreter's teardown, where torch's C++ side (c10d/Gloo threads, static destructors)
    # now and then ends in std::terminate ("terminate called without an active exception",
    # SIGABRT: 1 of 15 `pyowt compare` runs, 60 workers, on the 2-core dev machine). Run
    # the Python atexit handlers (logging's flush, library cleanups: nothing of the user's is
    # lost), flush stdio, and leave without the C-level teardown. A Ctrl-C from here on
    # would only turn a finished exit into a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _finish_python_side()
    os._exit(code)


def _finish_python_side() -> None:
    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # closed or broken by the user's code
                pass


def _exit_description(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def _warn_unclean_exits(procs) -> None:
    """Every rank returned its result; say so if one then died while shutting down.

    The results are complete (they were sent before the exit), so this warns rather than
    raises. Workers skip the C-level teardown (``_entry``), so what is left to report is a
    Python exit handler that crashed, or a rank killed from outside in between.
    """
    for rank, p in enumerate(procs):
        if p.exitcode not in (0, None):
            warnings.warn(f"pyowt.launch.spawn: rank {rank} (pid {p.pid}) returned its result, then "
                          f"exited with {_exit_description(p.exitcode)} while shutting down; the "
                          f"result is kept", RuntimeWarning, stacklevel=3)


def spawn(fn: Callable, world_size: int, args: Sequence[Any] = (), backend: str = "gloo",
          timeout_s: float = 600.0, threads: Optional[int] = None, graceful_interrupt: bool = False,
          forward_sigterm: bool = False) -> List[Any]:
    """Run ``fn(*args)`` on ``world_size`` new processes in one process group.

    Args:
        fn: a picklable (module-level) function; inside it ``torch.distributed`` is
            initialized on a loopback rendezvous.
        world_size: number of processes, >= 1.
        backend: ``"gloo"`` (CPU) or ``"nccl"`` (one GPU per rank).
        timeout_s: process-group timeout; a collective stuck longer fails on every rank.
        threads: torch intra-op threads per worker (default: cores // world_size, >= 1).
        graceful_interrupt: on Ctrl-C, pass the SIGINT on to the workers and wait for them
            (``fn`` handles it, e.g. finishes a step and saves); a second Ctrl-C kills them.
            Default: kill them at once.
        forward_sigterm: on SIGTERM, pass it on to the workers and keep waiting for their
            results (``fn`` handles it); if a worker dies of it, this process then ends by
            the same SIGTERM. Default: SIGTERM ends this process as usual, and the workers
            with it. Either takes effect only when called from the main thread.

    Returns:
        ``fn``'s return values, by rank. Raises :class:`WorkerFailed` with the traceback of
        every rank that failed (the others are stopped), and ``KeyboardInterrupt`` when
        interrupted (with ``graceful_interrupt``: when a worker ended without a result).
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // world_size)
    ctx = mp.get_context("spawn")
    store = loopback_store(timeout_s)  # held until the workers are done (subgroups use it too)
    procs: list = []
    state = _Collected(world_size)
    passed_on = {signal.SIGINT: graceful_interrupt, signal.SIGTERM: forward_sigterm}
    with _signals_passed_on(procs, state, [sig for sig, on in passed_on.items() if on]) as replaced:
        try:
            for rank in range(world_size):
                parent, child = ctx.Pipe(duplex=False)
                p = ctx.Process(target=_entry, args=(rank, world_size, store.port, backend, timeout_s, threads, fn,
                                                     tuple(args), child, os.getpid()))
                p.start()
                child.close()
                procs.append(p)
                state.pending[parent] = rank
            _collect(procs, state)
        except BaseException:
            # Interrupted (Ctrl-C, a signal turned into an exception): no worker outlives spawn.
            _stop(procs, kill=True)
            raise
    results, errors, pending = state.results, state.errors, state.pending
    _stop(procs, kill=bool(pending or errors))
    if state.quit_on[signal.SIGINT]:
        raise KeyboardInterrupt  # a worker took the Ctrl-C as an interruption: no result to return
    if state.quit_on[signal.SIGTERM]:
        # A worker ended by the forwarded SIGTERM: this process goes the way SIGTERM takes it.
        restore_handler(signal.SIGTERM, replaced.get(signal.SIGTERM))
        signal.raise_signal(signal.SIGTERM)
        errors.update({r: f"rank {r} was ended by the SIGTERM passed on to it" for r in state.quit_on[signal.SIGTERM]})
    if errors or pending:
        msg = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
        if pending:
            msg += f"\nranks {sorted(pending.values())} were stopped after another rank failed"
        raise WorkerFailed(msg)
    _warn_unclean_exits(procs)
    return results


@contextlib.contextmanager
def _signals_passed_on(procs, state: "_Collected", signums):
    """While the block runs (on the main thread), each of ``signums`` that reaches this process
    is passed on to the live workers and noted in ``state.passed_on`` instead of acting here;
    a second SIGINT raises ``KeyboardInterrupt`` (the workers are then killed). Yields the
    handlers it replaced, by signal."""
    replaced = {}
    if threading.current_thread() is threading.main_thread():
        def pass_on(signum, frame):
            if signum == signal.SIGINT and signum in state.passed_on:
                raise KeyboardInterrupt
            state.passed_on.add(signum)
            for p in procs:  # a terminal's Ctrl-C has reached them already; a kill <pid> has not
                if p.is_alive():
                    os.kill(p.pid, signum)

        for signum in signums:
            replaced[signum] = signal.signal(signum, pass_on)
    try:
        yield replaced
    finally:
        for signum, handler in replaced.items():
            restore_handler(signum, handler)


def _stop(procs, kill: bool) -> None:
    """Join every worker, killing the live ones first when ``kill``."""
    for p in procs:
        if kill and p.is_alive():
            p.kill()
    for p in procs:
        p.join(timeout=30)


class _Collected:
    """What :func:`_collect` has gathered so far, and which signals were passed on."""

    def __init__(self, world_size: int):
        self.results: List[Any] = [None] * world_size
        self.errors = {}
        self.pending = {}  # connection -> rank, until its message is in
        self.passed_on = set()  # the signals passed on to the workers
        # Ranks that ended without a result after a signal passed on to them: a worker that
        # quit on it (KeyboardInterrupt: exit 130; SIGTERM's default: killed by it).
        self.quit_on = {signal.SIGINT: [], signal.SIGTERM: []}


def _collect(procs, state: _Collected) -> None:
    """Every rank's result or traceback into ``state``; stops waiting 5 s after a failure (the
    others may be stuck in a collective with the failed rank)."""
    while state.pending:
        quit_early = state.errors or state.quit_on[signal.SIGINT] or state.quit_on[signal.SIGTERM]
        ready = wait(list(state.pending), timeout=5.0 if quit_early else None)
        if not ready:  # a rank failed (or quit) and the others are stuck waiting for it
            break
        for c in ready:
            _receive(procs, state, c)


def _receive(procs, state: _Collected, c) -> None:
    """Record rank ``state.pending[c]``'s result, traceback, or how it ended without one."""
    rank = state.pending.pop(c)
    try:
        status, payload = c.recv()
    except EOFError:
        procs[rank].join(timeout=5)  # its exit status, for the message
        code = procs[rank].exitcode
        for signum, quit_code in ((signal.SIGINT, 130), (signal.SIGTERM, -signal.SIGTERM)):
            if signum in state.passed_on and code == quit_code:
                state.quit_on[signum].append(rank)
                return
        status, payload = "err", (f"rank {rank} exited with "
                                  f"{'an unknown status' if code is None else _exit_description(code)}"
                                  " without a result")
    if status == "ok":
        state.results[rank] = payload
    else:
        state.errors[rank] = payload
