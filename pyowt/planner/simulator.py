"""Simulating one training step: tasks on a compute stream and a communication stream per device.

A step is a list of :class:`Task` in issue order (the order the runtime launches them: the
forward, the loss, the backward with gradient-bucket all-reduces launched as their last
gradient is ready, the optimizer). Each device runs two FIFO streams, as a GPU runs a compute
stream and NCCL's stream (FlexFlow's model): a task starts when its dependencies are done
and its stream on its device is free. A collective occupies the communication stream of
every device and starts when all of them are ready. With ``overlap=False`` both streams are
one, and the step time is the sum of all durations.

Because a task's times depend only on tasks issued before it, re-simulating after a change
reuses the times of the unchanged prefix (:class:`Simulator`); only tasks from the first
difference on are scheduled again.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

COMPUTE, COMM = "compute", "comm"


@dataclass(frozen=True)
class Task:
    """One unit of work of a step on one device.

    Attributes:
        name: label for timelines (``"fwd features.0"``, ``"all_gather"``...).
        stream: ``"compute"`` or ``"comm"`` (a collective across the group).
        duration: seconds.
        deps: indices of earlier tasks it waits for.
        phase: ``fwd``, ``loss``, ``bwd``, ``sync`` (gradient all-reduce), ``opt``.
        kind: the collective's kind for communication tasks (for byte accounting).
        sent, received: this device's bytes (nccl-tests logical payload).
        segment: index of the weight layer the task belongs to (for the chain DP).
    """

    name: str
    stream: str
    duration: float
    deps: Tuple[int, ...] = ()
    phase: str = "fwd"
    kind: str = ""
    sent: int = 0
    received: int = 0
    segment: int = -1

    def signature(self) -> tuple:
        return (self.stream, self.duration, self.deps)


@dataclass
class SimResult:
    """Predicted step time and per-device timelines.

    ``starts[d][i]``, ``ends[d][i]``: task i on device d. ``memory``: peak bytes per device
    (filled by the caller that knows the tensors).
    """

    time: float
    starts: List[List[float]]
    ends: List[List[float]]
    tasks: List[List[Task]]
    memory: List[float] = field(default_factory=list)

    def timeline(self, device: int = 0) -> List[Tuple[str, str, float, float]]:
        """(name, stream, start, end) of every task on ``device``, in issue order."""
        return [(t.name, t.stream, s, e) for t, s, e in zip(self.tasks[device], self.starts[device], self.ends[device])]

    def busy(self, stream: str, device: int = 0) -> float:
        return sum(t.duration for t in self.tasks[device] if t.stream == stream)


def _check(lanes: Sequence[Sequence[Task]]) -> None:
    n = len(lanes[0])
    for d, tasks in enumerate(lanes):
        if len(tasks) != n:
            raise ValueError(f"every device must run the same number of tasks: device 0 has {n}, device {d} has {len(tasks)}")
        for i, t in enumerate(tasks):
            if t.stream not in (COMPUTE, COMM):
                raise ValueError(f"task {i} ({t.name!r}): stream must be 'compute' or 'comm', got {t.stream!r}")
            if t.duration < 0:
                raise ValueError(f"task {i} ({t.name!r}): duration must be >= 0, got {t.duration}")
            if any(not 0 <= j < i for j in t.deps):
                raise ValueError(f"task {i} ({t.name!r}): dependencies must be earlier tasks, got {t.deps}")


def simulate(lanes: Sequence[Sequence[Task]], overlap: bool = True, start: int = 0,
             prev: Optional[SimResult] = None) -> SimResult:
    """Schedule ``lanes`` (one task list per device, same structure) and return the times.

    ``start``/``prev``: reuse ``prev``'s times for tasks ``[0, start)`` (identical prefix).
    """
    if isinstance(lanes[0], Task):
        lanes = [lanes]
    _check(lanes)
    ndev, n = len(lanes), len(lanes[0])
    starts = [[0.0] * n for _ in range(ndev)]
    ends = [[0.0] * n for _ in range(ndev)]
    free = [{COMPUTE: 0.0, COMM: 0.0} for _ in range(ndev)]
    if start:
        for d in range(ndev):
            starts[d][:start] = prev.starts[d][:start]
            ends[d][:start] = prev.ends[d][:start]
            for i in range(start):
                s = lanes[d][i].stream if overlap else COMPUTE
                free[d][s] = max(free[d][s], ends[d][i])
    for i in range(start, n):
        stream = lanes[0][i].stream
        key = stream if overlap else COMPUTE
        ready = []
        for d in range(ndev):
            r = free[d][key]
            e = ends[d]
            for j in lanes[d][i].deps:
                if e[j] > r:
                    r = e[j]
            ready.append(r)
        if stream == COMM:  # a collective: everyone joins, everyone finishes together
            r = max(ready)
            ready = [r] * ndev
        for d in range(ndev):
            s = ready[d]
            f = s + lanes[d][i].duration
            starts[d][i], ends[d][i] = s, f
            free[d][key] = f
    total = max((max(e) if e else 0.0) for e in ends)
    return SimResult(total, starts, ends, [list(t) for t in lanes])


class Simulator:
    """Re-simulates incrementally: keeps the last run and reschedules from the first task
    that differs (a config change leaves the forward before the changed layer untouched).

    ``rescheduled`` counts the tasks scheduled over all runs (to measure the saving).
    """

    def __init__(self, overlap: bool = True):
        self.overlap = overlap
        self._last: Optional[SimResult] = None
        self._sigs: List[tuple] = []
        self.rescheduled = 0
        self.runs = 0

    def run(self, tasks: Sequence[Task]) -> SimResult:
        sigs = [t.signature() for t in tasks]
        start = 0
        if self._last is not None:
            m = min(len(sigs), len(self._sigs))
            while start < m and sigs[start] == self._sigs[start]:
                start += 1
        res = simulate([list(tasks)], self.overlap, start, self._last if start else None)
        self._last, self._sigs = res, sigs
        self.rescheduled += len(tasks) - start
        self.runs += 1
        return res


__all__ = ["COMM", "COMPUTE", "SimResult", "Simulator", "Task", "simulate"]
