"""Progress on rank 0: a live bar on a terminal, plain lines otherwise (CI logs, files).

The bar redraws at most ten times a second; the plain mode prints a line every
``every`` steps. Both show images/s (over the last interval), the loss and the time left
for the whole run. Losses arrive as tensors and are read (a device sync on GPUs) only when
something is printed.
"""
from __future__ import annotations

import sys
import time
from typing import Optional, TextIO


def format_duration(seconds: float) -> str:
    if seconds != seconds or seconds < 0:  # NaN: not known yet
        return "--:--"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """Progress of a run of ``total_steps`` steps, ``steps_per_epoch`` per epoch.

    Args:
        enabled: False on every rank but 0 (nothing is printed).
        mode: ``"auto"`` (bar on a terminal, lines otherwise), ``"bar"``, ``"lines"``, ``"none"``.
        every: steps between plain lines (default: about 5 lines per epoch).
    """

    def __init__(self, total_steps: int, steps_per_epoch: int, epochs: int, batch_size: int,
                 enabled: bool = True, mode: str = "auto", every: Optional[int] = None,
                 stream: Optional[TextIO] = None):
        self.stream = stream or sys.stdout
        if mode == "auto":
            mode = "bar" if self.stream.isatty() else "lines"
        self.mode = mode if enabled else "none"
        self.total, self.per_epoch, self.epochs, self.batch = total_steps, steps_per_epoch, epochs, batch_size
        self.every = every or max(1, steps_per_epoch // 5)
        self._last_draw = 0.0
        self._mark = None  # (time, global step) where the current rate interval began
        self._run_start = None
        self._steps_this_run = 0
        self.rate = float("nan")

    def _out(self, text: str, end: str = "\n") -> None:
        self.stream.write(text + end)
        self.stream.flush()

    def message(self, text: str) -> None:
        """A line of text (ends the bar's line first)."""
        if self.mode == "none":
            return
        self.end_line()
        self._out(text)

    def end_line(self) -> None:
        """End the bar's line (if one is drawn), so what is printed next starts on its own."""
        if self.mode == "bar" and self._last_draw:
            self._out("")
            self._last_draw = 0.0

    def start(self, global_step: int) -> None:
        now = time.perf_counter()
        self._mark = (now, global_step)
        self._run_start = (now, global_step)

    def eta(self, global_step: int) -> float:
        t0, s0 = self._run_start
        done = global_step - s0
        if done < 1:
            return float("nan")
        return (time.perf_counter() - t0) / done * (self.total - global_step)

    def step(self, epoch: int, step_in_epoch: int, global_step: int, loss) -> None:
        """Called after every optimizer step (``step_in_epoch`` counts from 1)."""
        if self.mode == "none":
            return
        now = time.perf_counter()
        due_line = self.mode == "lines" and (step_in_epoch % self.every == 0 or step_in_epoch == self.per_epoch)
        due_bar = self.mode == "bar" and (now - self._last_draw >= 0.1 or step_in_epoch == self.per_epoch)
        if not (due_line or due_bar):
            return
        t0, s0 = self._mark
        if global_step > s0 and now > t0:
            self.rate = (global_step - s0) * self.batch / (now - t0)
            self._mark = (now, global_step)
        loss_v = float(loss)
        stats = f"loss {loss_v:.4f}  {self.rate:,.0f} img/s  ETA {format_duration(self.eta(global_step))}"
        if due_line:
            self._out(f"epoch {epoch + 1}/{self.epochs}  step {step_in_epoch}/{self.per_epoch}  "
                      f"(global {global_step}/{self.total})  {stats}")
        else:
            width = 24
            filled = int(width * step_in_epoch / max(1, self.per_epoch))
            bar = "#" * filled + "." * (width - filled)
            self._out(f"\repoch {epoch + 1}/{self.epochs} [{bar}] {step_in_epoch}/{self.per_epoch}  {stats}\033[K", end="")
            self._last_draw = now

    def pause(self) -> None:
        """Validation or a checkpoint write is about to take time: do not count it as steps."""
        self._paused_at = time.perf_counter()

    def resume(self) -> None:
        gap = time.perf_counter() - getattr(self, "_paused_at", time.perf_counter())
        # Only the images/s interval skips the pause; the ETA keeps it (every epoch validates).
        if self._mark is not None:
            self._mark = (self._mark[0] + gap, self._mark[1])
