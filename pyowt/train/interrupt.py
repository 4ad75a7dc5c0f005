"""Ctrl-C during training: every rank stops after the same step, so a checkpoint can be written.

A terminal's Ctrl-C reaches every process of its group, and the launchers forward it too
(``--workers``' parent and torchrun's agent each send their workers a SIGINT), but not at
the same instant, and ``kill -INT`` may reach one rank only. Stopping where each rank
happens to be would leave the others waiting in a collective. So the signal only raises a
flag, and the ranks take the maximum of their flags at agreed step boundaries; all ranks
read the same value, so they stop after the same step.

That reduction is a synchronous round trip (about 0.25 ms over Gloo on a 2-core machine,
where an asynchronous one slowed the step's own collectives more). So it is not taken every
step but about every :data:`POLL_PERIOD_S` seconds: the same reduction carries each rank's
seconds per step, and every rank derives the next polling step from the maximum, so the
schedule stays the same on all of them.

A second SIGINT quits at once (``KeyboardInterrupt``), except within
:data:`REPEAT_WINDOW_S` of the first: those are the launchers' copies of the same press.
With ``on_sigterm`` a SIGTERM (a scheduler's preemption, ``kill``) stops the run the same
way; further SIGTERMs change nothing (whoever sent it kills when it stops waiting).
"""
from __future__ import annotations

import os
import signal
import threading
import time
from typing import Optional

import torch
import torch.distributed as dist

from ..launch import restore_handler

# The launchers forward a press within milliseconds; a person pressing again takes longer.
REPEAT_WINDOW_S = 1.0
# How often the ranks compare flags: the delay before a Ctrl-C takes effect, at most this
# plus a step; and at most every MAX_POLL_INTERVAL steps, however short they are.
POLL_PERIOD_S = 0.25
MAX_POLL_INTERVAL = 64


class TrainingInterrupted(Exception):
    """Raised on every rank once the ranks agreed to stop; says where, why and what was saved."""

    def __init__(self, global_step: int, checkpoint: Optional[str], signum: int = signal.SIGINT):
        self.global_step, self.checkpoint, self.signum = global_step, checkpoint, int(signum)
        super().__init__(global_step, checkpoint, self.signum)

    @property
    def exit_status(self) -> int:
        """128 + the signal's number, as a shell reports a process the signal ended."""
        return 128 + self.signum

    def describe(self, prog: str = "pyowt train") -> str:
        """The line the CLI prints: the step, and the checkpoint with how to continue from it."""
        how = "interrupted" if self.signum == signal.SIGINT else f"stopped by {signal.Signals(self.signum).name}"
        if self.checkpoint:
            return (f"{prog}: {how} after global step {self.global_step}; checkpoint written to "
                    f"{self.checkpoint} (continue with --resume)")
        return f"{prog}: {how} after global step {self.global_step}; nothing saved (no --checkpoint-dir)"


class StopRequest:
    """``with StopRequest(...) as stop:`` and call ``stop.poll()`` once per step on every rank.

    Args:
        announce: write one line to stderr at the first signal (rank 0).
        saving: whether a checkpoint will be written (the announcement says so).
        on_sigterm: handle SIGTERM too (otherwise it keeps its default: the process ends).

    The handlers are installed only from the main thread (Python delivers signals there);
    elsewhere the signals keep their default behaviour. On NCCL the flags travel over a
    small Gloo group, so polling never waits on the GPU.
    """

    def __init__(self, announce: bool = False, saving: bool = False, on_sigterm: bool = False):
        self.announce, self.saving = announce, saving
        self.signals = (signal.SIGINT, signal.SIGTERM) if on_sigterm else (signal.SIGINT,)
        self.world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self._group = None
        if self.world > 1 and dist.get_backend() != "gloo":
            self._group = dist.new_group(backend="gloo")  # collective: every rank creates it here
        self._first_at: Optional[float] = None
        self._signum = 0  # the first signal's number, 0 before one
        self._previous_handlers = {}
        self._steps = 0  # calls to poll(), the same on every rank
        self._next_poll = 1
        self._last_poll = None  # (time, steps) when the last reduction returned

    @property
    def requested(self) -> bool:
        """Whether this process saw a signal (the ranks act on it only through :meth:`poll`)."""
        return self._first_at is not None

    def request(self, signum: int = signal.SIGINT) -> None:
        """What the first signal does; callable directly (tests, embedding applications)."""
        if self._first_at is not None:
            return
        self._first_at, self._signum = time.monotonic(), int(signum)
        if self.announce:
            what = "write a checkpoint" if self.saving else "stop (no --checkpoint-dir: nothing is saved)"
            if signum == signal.SIGINT:
                line = f"Ctrl-C: finishing this step to {what}; press Ctrl-C again to quit at once"
            else:
                line = f"{signal.Signals(signum).name}: finishing this step to {what}"
            # os.write: print() from a signal handler can re-enter an interrupted print.
            os.write(2, f"\npyowt train: {line}\n".encode())

    def _on_signal(self, signum, frame):
        if self._first_at is None:
            self.request(signum)
        elif signum == signal.SIGINT and time.monotonic() - self._first_at >= REPEAT_WINDOW_S:
            raise KeyboardInterrupt

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous_handlers[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        for sig, handler in self._previous_handlers.items():
            restore_handler(sig, handler)
        self._previous_handlers.clear()

    def poll(self) -> int:
        """Call once per step on every rank (a collective on the polling steps): 0 to go on,
        or, on every rank at the same step once any rank has seen a signal, its number
        (SIGTERM over SIGINT where ranks saw different ones)."""
        self._steps += 1
        if self.world == 1:
            return self._signum
        if self._steps < self._next_poll:
            return 0
        now = time.perf_counter()
        seconds_per_step = 0.0
        if self._last_poll is not None:
            seconds_per_step = (now - self._last_poll[0]) / (self._steps - self._last_poll[1])
        both = torch.tensor([float(self._signum), seconds_per_step], dtype=torch.float64)
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self._group)
        signum, seconds_per_step = both.tolist()
        self._last_poll = (time.perf_counter(), self._steps)
        interval = int(POLL_PERIOD_S / seconds_per_step) if seconds_per_step > 0 else 1
        self._next_poll = self._steps + max(1, min(MAX_POLL_INTERVAL, interval))
        return int(signum)
