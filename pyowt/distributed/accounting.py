"""Communication accounting: how many collectives ran and how many bytes they moved.

::

    with pyowt.distributed.comm_stats() as stats:
        loss = model(x).sum(); loss.backward()
    stats["all_gather"].calls, stats["all_gather"].sent, stats.total_received

Bytes are *logical payload per rank*, the convention of nccl-tests (algorithm-independent,
so the measured figure equals an analytic formula to the byte). With K ranks, S the bytes of
the full (gathered / unreduced) tensor and ``own`` the bytes of this rank's piece
(per-rank pieces follow ``torch.tensor_split``, so S = sum of the pieces):

========================  ==============================  ==============================
kind                      sent                            received
========================  ==============================  ==============================
``all_gather``            (K-1) * own: my piece, to       S - own: every piece but mine
                          each other rank
``reduce_scatter``        S - own: my contribution to     (K-1) * own: every other rank's
                          every other rank's piece        contribution to my piece
``all_reduce``            reduce-scatter + all-gather of the tensor split into K element
                          chunks: (S - own) + (K-1)*own sent and received each; with even
                          chunks both are 2(K-1)/K * S
``broadcast``             S on the source, 0 elsewhere    S on every other rank, 0 on src
``reduce``                S on every non-destination      S on the destination, 0 elsewhere
                          rank, 0 on the destination
``shape_exchange``        the small metadata all-gather that checks shapes/sizes across
                          ranks (see :func:`pyowt.distributed.set_shape_check`),
                          counted like ``all_gather``; kept apart so plan formulas stay exact
========================  ==============================  ==============================

With even pieces all-gather and reduce-scatter move (K-1)/K * S each way, all-reduce
2(K-1)/K * S, broadcast and reduce the tensor once: the figures nccl-tests' bus bandwidth
is based on. K = 1 counts the call and zero bytes.

Backward collectives count like forward ones (the backward of ``all_gather`` is a
``reduce_scatter`` and is recorded as one). Recording is process-wide, not per thread:
CUDA's autograd engine runs backward on its own threads and those collectives must count.
Recorders nest (an outer one sees everything an inner one sees). Collectives traced by
``torch.compile`` are not counted: the Python bookkeeping cannot run inside a compiled
graph; measure volumes in eager mode (they do not depend on compilation).
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Dict, Iterator, List, Sequence

__all__ = ["CommStats", "KindStats", "comm_stats", "record",
           "all_gather_bytes", "reduce_scatter_bytes", "all_reduce_bytes",
           "broadcast_bytes", "reduce_bytes", "split_sizes"]


@dataclass
class KindStats:
    """Totals for one collective kind on this rank."""
    calls: int = 0
    sent: int = 0
    received: int = 0


class CommStats:
    """Per-kind counts; ``stats[kind]`` is a :class:`KindStats` (zeros if never seen)."""

    def __init__(self):
        self.kinds: Dict[str, KindStats] = {}

    def __getitem__(self, kind: str) -> KindStats:
        return self.kinds.get(kind, KindStats())

    def _add(self, kind: str, sent: int, received: int) -> None:
        entry = self.kinds.setdefault(kind, KindStats())
        entry.calls += 1
        entry.sent += sent
        entry.received += received

    @property
    def total_sent(self) -> int:
        """Bytes sent over all kinds except ``shape_exchange`` (metadata, not payload)."""
        return sum(v.sent for k, v in self.kinds.items() if k != "shape_exchange")

    @property
    def total_received(self) -> int:
        """Bytes received over all kinds except ``shape_exchange``."""
        return sum(v.received for k, v in self.kinds.items() if k != "shape_exchange")

    @property
    def calls(self) -> Dict[str, int]:
        return {k: v.calls for k, v in self.kinds.items()}

    def as_dict(self) -> Dict[str, Dict[str, int]]:
        return {k: {"calls": v.calls, "sent": v.sent, "received": v.received}
                for k, v in sorted(self.kinds.items())}

    def __repr__(self) -> str:
        return f"CommStats({self.as_dict()})"


_LOCK = threading.Lock()
_ACTIVE: List[CommStats] = []


@contextlib.contextmanager
def comm_stats() -> Iterator[CommStats]:
    """Record every pyowt collective issued (in any thread) while the block runs."""
    stats = CommStats()
    with _LOCK:
        _ACTIVE.append(stats)
    try:
        yield stats
    finally:
        with _LOCK:
            _ACTIVE.remove(stats)


def record(kind: str, sent: int, received: int) -> None:
    """Add one call of ``kind`` to every active recorder (cheap when none is active)."""
    if not _ACTIVE:
        return
    with _LOCK:
        for stats in _ACTIVE:
            stats._add(kind, int(sent), int(received))


def split_sizes(total: int, parts: int) -> List[int]:
    """Per-rank sizes of ``torch.tensor_split`` of ``total`` items into ``parts``."""
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    if total < 0:
        raise ValueError(f"total must be >= 0, got {total}")
    q, r = divmod(total, parts)
    return [q + (1 if i < r else 0) for i in range(parts)]


# Analytic per-rank byte counts (sent, received); ``row_bytes`` is the size of one slice
# along the split dimension, ``sizes`` the per-rank slice counts.

def all_gather_bytes(sizes: Sequence[int], rank: int, row_bytes: int):
    k, own, full = len(sizes), sizes[rank] * row_bytes, sum(sizes) * row_bytes
    return (k - 1) * own, full - own


def reduce_scatter_bytes(sizes: Sequence[int], rank: int, row_bytes: int):
    sent, received = all_gather_bytes(sizes, rank, row_bytes)
    return received, sent


def all_reduce_bytes(numel: int, k: int, rank: int, itemsize: int):
    sizes = split_sizes(numel, k)
    a, b = reduce_scatter_bytes(sizes, rank, itemsize)
    c, d = all_gather_bytes(sizes, rank, itemsize)
    return a + c, b + d


def broadcast_bytes(nbytes: int, k: int, rank: int, src: int):
    if k == 1:
        return 0, 0
    return (nbytes, 0) if rank == src else (0, nbytes)


def reduce_bytes(nbytes: int, k: int, rank: int, dst: int):
    if k == 1:
        return 0, 0
    return (0, nbytes) if rank == dst else (nbytes, 0)
