"""comm_stats: calls and bytes per collective kind equal the nccl-tests formulas, to the byte.

The expected figures are written out here from the definitions (even pieces: all-gather and
reduce-scatter (K-1)/K * S each way, all-reduce 2(K-1)/K * S, broadcast/reduce S once), not
taken from the library's helpers.
"""
import threading

import pytest
import torch
import torch.distributed as dist

import pyowt.distributed as pd

from ._reference import pieces


def _run(fn):
    """Forward and backward of fn under separate recorders; returns (fwd, bwd) dicts."""
    with pd.comm_stats() as fwd:
        y = fn()
    with pd.comm_stats() as bwd:
        y.sum().backward()
    return fwd.as_dict(), bwd.as_dict()


def _entry(calls, sent, received):
    return {"calls": calls, "sent": sent, "received": received}


def _counts(dtype):
    k, r = dist.get_world_size(), dist.get_rank()
    item = torch.tensor([], dtype=dtype).element_size()
    n, c = 3, 5                     # rows per rank, row width
    S = k * n * c * item            # bytes of the full (gathered) tensor
    ev = (k - 1) * S // k           # (K-1)/K * S; exact since S is a multiple of K
    x = lambda *shape: torch.randn(*shape, dtype=dtype, requires_grad=True)  # noqa: E731
    got, want = {}, {}

    got["all_gather"] = _run(lambda: pd.all_gather(x(n, c), 0, sizes=[n] * k))
    want["all_gather"] = ({"all_gather": _entry(1, ev, ev)}, {"reduce_scatter": _entry(1, ev, ev)})
    got["all_gather split"] = _run(lambda: pd.all_gather(x(c, n), 1, grad="split", sizes=[n] * k))
    want["all_gather split"] = ({"all_gather": _entry(1, ev, ev)}, {})
    # Without sizes the ranks first exchange a 36-int64 metadata row each.
    meta = 36 * 8 * (k - 1)
    got["all_gather exchange"] = _run(lambda: pd.all_gather(x(n, c), 0))
    want["all_gather exchange"] = ({"all_gather": _entry(1, ev, ev)}, {"reduce_scatter": _entry(1, ev, ev)})
    if k > 1:  # one rank has nobody to ask
        want["all_gather exchange"][0]["shape_exchange"] = _entry(1, meta, meta)
    # Uneven: 7 rows split as tensor_split does; own = my rows, S7 = all rows.
    sizes = pieces(7, k)
    own, S7 = sizes[r] * c * item, 7 * c * item
    got["all_gather uneven"] = _run(lambda: pd.all_gather(x(sizes[r], c), 0, sizes=sizes))
    want["all_gather uneven"] = ({"all_gather": _entry(1, (k - 1) * own, S7 - own)},
                                 {"reduce_scatter": _entry(1, S7 - own, (k - 1) * own)})
    got["reduce_scatter"] = _run(lambda: pd.reduce_scatter(x(c, k * n), 1))
    want["reduce_scatter"] = ({"reduce_scatter": _entry(1, ev, ev)}, {"all_gather": _entry(1, ev, ev)})
    got["reduce_scatter uneven"] = _run(lambda: pd.reduce_scatter(x(7, c), 0))
    want["reduce_scatter uneven"] = ({"reduce_scatter": _entry(1, S7 - own, (k - 1) * own)},
                                     {"all_gather": _entry(1, (k - 1) * own, S7 - own)})
    got["split"] = _run(lambda: pd.split(x(k * n, c), 0))
    want["split"] = ({}, {"all_gather": _entry(1, ev, ev)})
    ar = 2 * (k - 1) * S // k
    got["all_reduce"] = _run(lambda: pd.all_reduce(x(k * n, c)))
    want["all_reduce"] = ({"all_reduce": _entry(1, ar, ar)}, {})
    got["copy_to_group"] = _run(lambda: pd.copy_to_group(x(k * n, c)))
    want["copy_to_group"] = ({}, {"all_reduce": _entry(1, ar, ar)})
    one = k > 1
    for src in range(k):
        me = r == src
        got[f"broadcast {src}"] = _run(lambda: pd.broadcast(x(k * n, c), src))
        want[f"broadcast {src}"] = ({"broadcast": _entry(1, S * me * one, S * (not me))},
                                    {"reduce": _entry(1, S * (not me), S * me * one)})
        got[f"reduce_to {src}"] = _run(lambda: pd.reduce_to(x(k * n, c), src))
        want[f"reduce_to {src}"] = ({"reduce": _entry(1, S * (not me), S * me * one)},
                                    {"broadcast": _entry(1, S * me * one, S * (not me))})
    # Async variants count exactly like the blocking ones.
    got["all_gather_async"] = _run(lambda: pd.all_gather_async(x(n, c), 0, sizes=[n] * k).wait())
    want["all_gather_async"] = want["all_gather"]
    got["reduce_scatter_async"] = _run(lambda: pd.reduce_scatter_async(x(c, k * n), 1).wait())
    want["reduce_scatter_async"] = want["reduce_scatter"]
    got["all_reduce_async"] = _run(lambda: pd.all_reduce_async(x(k * n, c)).wait())
    want["all_reduce_async"] = want["all_reduce"]
    got["broadcast_async"] = _run(lambda: pd.broadcast_async(x(k * n, c), 0).wait())
    want["broadcast_async"] = want["broadcast 0"]
    return got, want


def _nested_and_threads():
    k = dist.get_world_size()
    S = k * 4 * 4
    ev = (k - 1) * S // k
    with pd.comm_stats() as outer:
        with pd.comm_stats() as inner:
            pd.all_gather(torch.ones(4), 0, sizes=[4] * k)
        t = threading.Thread(target=lambda: pd.all_gather(torch.ones(4), 0, sizes=[4] * k))
        t.start()
        t.join()
    assert inner["all_gather"].calls == 1 and inner["all_gather"].sent == ev
    assert outer["all_gather"].calls == 2 and outer["all_gather"].sent == 2 * ev
    assert outer.total_received == 2 * ev and outer["broadcast"].calls == 0
    return outer.as_dict()


def _all_counts():
    return [_counts(torch.float32), _counts(torch.bfloat16), _nested_and_threads()]


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_byte_counts_equal_formulas(run_workers, k):
    """One worker call per K: fp32 and bf16 counts, then nested recorders and a thread."""
    for fp32, bf16, nested in run_workers(k, _all_counts):
        for got, want in (fp32, bf16):
            assert set(got) == set(want)
            for case in want:
                assert got[case] == want[case], f"K={k} {case}: got {got[case]}, want {want[case]}"
        assert nested["all_gather"]["calls"] == 2
