"""pyowt.launch.spawn: results by rank, failures reported, unclean exits named."""
import atexit
import ctypes
import multiprocessing
import os
import signal
import threading
import time
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from pyowt.launch import WorkerFailed, _warn_unclean_exits, spawn


def _rank_sum():
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    return dist.get_rank(), t.item()


def _abort_at_exit_on_rank1():
    if dist.get_rank() == 1:
        atexit.register(os.abort)  # a Python exit handler that dies, after the result is sent
    return dist.get_rank()


def _abort_in_c_teardown_on_rank1():
    # Stands in for torch's C++ teardown crashes: abort() registered the way C++ registers
    # its static destructors, to run at exit().
    if dist.get_rank() == 1:
        libc = ctypes.CDLL(None)
        libc.__cxa_atexit.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        libc.__cxa_atexit(ctypes.cast(libc.abort, ctypes.c_void_p), None, None)
    return dist.get_rank()


def _write_at_exit(path):
    # A Python exit handler of the user's (buffered output, say) still runs.
    out = open(f"{path}.{dist.get_rank()}", "w")
    out.write("flushed")  # buffered until the handler closes the file
    atexit.register(out.close)
    return dist.get_rank()


def _sleep_long():
    time.sleep(120)
    return dist.get_rank()


def _raise_on_rank0():
    if dist.get_rank() == 0:
        raise ValueError("rank 0 refuses")
    return dist.get_rank()


def test_results_by_rank_and_a_clean_exit_warns_nothing():
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert spawn(_rank_sum, 2, threads=1) == [(0, 3.0), (1, 3.0)]


def test_workers_skip_the_c_level_teardown_after_their_result():
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert spawn(_abort_in_c_teardown_on_rank1, 2, threads=1) == [0, 1]


def test_workers_run_their_python_exit_handlers(tmp_path):
    path = str(tmp_path / "exit")
    assert spawn(_write_at_exit, 2, args=(path,), threads=1) == [0, 1]
    assert [open(f"{path}.{r}").read() for r in range(2)] == ["flushed", "flushed"]


def test_a_rank_dying_after_its_result_is_named():
    with pytest.warns(RuntimeWarning, match=r"rank 1 \(pid \d+\) returned its result, then exited with "
                                            r"signal SIGABRT"):
        assert spawn(_abort_at_exit_on_rank1, 2, threads=1) == [0, 1]


def test_unclean_exit_wording():
    procs = [SimpleNamespace(exitcode=0, pid=10), SimpleNamespace(exitcode=-6, pid=11),
             SimpleNamespace(exitcode=3, pid=12)]
    with pytest.warns(RuntimeWarning) as record:
        _warn_unclean_exits(procs)
    assert [str(w.message) for w in record] == [
        "pyowt.launch.spawn: rank 1 (pid 11) returned its result, then exited with signal SIGABRT "
        "while shutting down; the result is kept",
        "pyowt.launch.spawn: rank 2 (pid 12) returned its result, then exited with exit code 3 "
        "while shutting down; the result is kept"]


def test_a_failing_rank_raises_with_its_traceback():
    with pytest.raises(WorkerFailed, match="(?s)rank 0.*ValueError: rank 0 refuses"):
        spawn(_raise_on_rank0, 2, threads=1, timeout_s=60)


@pytest.mark.parametrize("delay_s", [0.05, 8.0])  # while starting the workers / while they run
def test_an_interrupted_spawn_leaves_no_worker(delay_s):
    # A real SIGINT (what Ctrl-C sends): it interrupts the parent's blocking wait.
    timer = threading.Timer(delay_s, os.kill, (os.getpid(), signal.SIGINT))
    others = set(multiprocessing.active_children())  # e.g. the test session's worker pools
    timer.start()
    start = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            spawn(_sleep_long, 2, threads=1)
    finally:
        timer.cancel()
    assert time.monotonic() - start < 60
    assert set(multiprocessing.active_children()) - others == set()


def _wait_for_sigint(ready_dir, mode, signum=signal.SIGINT):
    """Install a ``signum`` handler per ``mode``, say so with a file, then wait (at most 60 s).
    ``"stop"``: the first signal ends the wait; ``"ignore"``: signals do nothing; ``"default"``:
    Python's own (KeyboardInterrupt for SIGINT, the end of the process for SIGTERM)."""
    stopped = threading.Event()
    if mode == "stop":
        signal.signal(signum, lambda *_: stopped.set())
    elif mode == "ignore":
        signal.signal(signum, lambda *_: None)
    open(os.path.join(ready_dir, str(dist.get_rank())), "w").close()
    stopped.wait(60)
    t = torch.tensor([1.0])
    dist.all_reduce(t)  # the group still works after the interruption
    return dist.get_rank(), stopped.is_set(), t.item()


def _interrupt_parent_when_ready(ready_dir, world_size, times, gap_s=1.5, signum=signal.SIGINT):
    def send():
        deadline = time.monotonic() + 60
        while len(os.listdir(ready_dir)) < world_size and time.monotonic() < deadline:
            time.sleep(0.05)
        for i in range(times):
            if i:
                time.sleep(gap_s)
            os.kill(os.getpid(), signum)  # the parent only, as `kill -INT <pid>` would
    t = threading.Thread(target=send, daemon=True)
    t.start()
    return t


def test_graceful_interrupt_passes_ctrl_c_on_and_keeps_the_results(tmp_path):
    sender = _interrupt_parent_when_ready(str(tmp_path), 2, times=1)
    start = time.monotonic()
    out = spawn(_wait_for_sigint, 2, args=(str(tmp_path), "stop"), threads=1, graceful_interrupt=True)
    sender.join()
    assert out == [(0, True, 2.0), (1, True, 2.0)]
    assert time.monotonic() - start < 50  # they stopped on the forwarded signal, not at 60 s


def test_graceful_interrupt_a_second_ctrl_c_kills(tmp_path):
    others = set(multiprocessing.active_children())
    sender = _interrupt_parent_when_ready(str(tmp_path), 2, times=2)
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        spawn(_wait_for_sigint, 2, args=(str(tmp_path), "ignore"), threads=1, graceful_interrupt=True)
    sender.join()
    assert time.monotonic() - start < 50
    assert set(multiprocessing.active_children()) - others == set()


def test_graceful_interrupt_of_workers_that_quit_is_an_interrupt_not_a_failure(tmp_path):
    sender = _interrupt_parent_when_ready(str(tmp_path), 2, times=1)
    with pytest.raises(KeyboardInterrupt):
        spawn(_wait_for_sigint, 2, args=(str(tmp_path), "default"), threads=1, graceful_interrupt=True)
    sender.join()


def test_the_rendezvous_port_is_held_from_the_start():
    # The workers join a store the parent already listens on: no window in which another
    # process could take the port (the old pick-a-free-port-then-let-rank-0-bind-it did).
    import socket
    from datetime import timedelta

    from pyowt.launch import loopback_store

    store = loopback_store(10.0)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        with pytest.raises(OSError):
            s.bind(("127.0.0.1", store.port))
    client = dist.TCPStore("127.0.0.1", store.port, None, False, timeout=timedelta(seconds=10))
    client.set("k", "v")
    assert store.get("k") == b"v"


def test_a_ctrl_c_passed_on_does_not_interrupt_recording_a_result():
    # With graceful_interrupt the first Ctrl-C is a handler call, not an exception, so it
    # cannot cut a rank's message short; the second one raises.
    from pyowt.launch import _Collected, _signals_passed_on

    state, recorded = _Collected(1), []
    with pytest.raises(KeyboardInterrupt):
        with _signals_passed_on([], state, [signal.SIGINT]):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)  # Python runs handlers between bytecodes: it had its chance here
            recorded.append("result")
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert recorded == ["result"] and state.passed_on == {signal.SIGINT}
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def _write_pid_then_sleep(folder):
    with open(os.path.join(folder, f"{dist.get_rank()}.pid"), "w") as f:
        f.write(str(os.getpid()))
    time.sleep(120)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead, only not reaped yet
        return f.read().split(")")[-1].split()[0] != "Z"


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_workers_do_not_outlive_a_killed_parent(tmp_path, sig):
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import sys; from pyowt.launch import spawn; from tests.test_launch import _write_pid_then_sleep; "
            "spawn(_write_pid_then_sleep, 2, args=(sys.argv[1],), threads=1)")
    parent = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=repo)
    try:
        deadline = time.monotonic() + 60
        while len(list(tmp_path.glob("*.pid"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        pids = [int(p.read_text()) for p in tmp_path.glob("*.pid")]
        assert len(pids) == 2
        parent.send_signal(sig)  # `kill <pid>`: nothing of spawn's own cleanup runs
        parent.wait(timeout=30)
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in pids if _alive(p)]
    finally:
        if parent.poll() is None:
            parent.kill()
        for p in tmp_path.glob("*.pid"):
            try:
                os.kill(int(p.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_forward_sigterm_passes_it_on_and_keeps_the_results(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    sender = _interrupt_parent_when_ready(str(tmp_path), 2, times=1, signum=signal.SIGTERM)
    out = spawn(_wait_for_sigint, 2, args=(str(tmp_path), "stop", signal.SIGTERM), threads=1,
                forward_sigterm=True)
    sender.join()
    assert out == [(0, True, 2.0), (1, True, 2.0)]
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
def test_forward_sigterm_to_workers_that_die_of_it_ends_the_parent_too(tmp_path):
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import signal, sys; from pyowt.launch import spawn; from tests.test_launch import _wait_for_sigint; "
            "spawn(_wait_for_sigint, 2, args=(sys.argv[1], 'default', signal.SIGTERM), threads=1, "
            "forward_sigterm=True); print('spawn returned')")
    parent = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=repo, stdout=subprocess.PIPE,
                              text=True)
    try:
        deadline = time.monotonic() + 60
        while len(os.listdir(tmp_path)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        parent.send_signal(signal.SIGTERM)
        out, _ = parent.communicate(timeout=60)
    finally:
        if parent.poll() is None:
            parent.kill()
    assert parent.returncode == -signal.SIGTERM and "spawn returned" not in out


def test_a_handler_installed_outside_python_is_put_back_as_the_default():
    from pyowt.launch import restore_handler

    before = signal.signal(signal.SIGUSR1, lambda *_: None)
    try:
        restore_handler(signal.SIGUSR1, None)  # what signal.signal returns for a C-level handler
        assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
    finally:
        restore_handler(signal.SIGUSR1, before)
