"""The class-parallel cross-entropy against F.cross_entropy on the full logits (Gloo, K = 1..4).

One worker call per K runs every case: class counts K does not divide (17K+2), fewer
classes than ranks (empty shards), every reduction, ignored targets, bf16 logits, a
column-parallel linear feeding the loss, the traffic it records, and bad input (which must
raise the same error on every rank, never hang).
"""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import pyowt.distributed as pd
from pyowt.nn import ColumnParallelLinear, ParallelCrossEntropy
from pyowt.nn.functional import parallel_cross_entropy, parallel_cross_entropy_comm

from ..utils import assert_close_rel

BATCH = 7


def _inputs(classes, seed, dtype, ignore=False):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(BATCH, classes, generator=g)).to(dtype)
    target = torch.randint(0, classes, (BATCH,), generator=g)
    if ignore:
        target[1] = -100
        target[4] = -100
    return logits, target


def _loss_cases(k, r, checks):
    for classes in sorted({17 * k + 2, max(k - 1, 1), 1}):
        for dtype in (torch.float32, torch.bfloat16):
            for reduction in ("mean", "sum", "none"):
                for ignore in (False, True):
                    if dtype == torch.bfloat16 and (ignore or reduction != "mean"):
                        continue  # bf16: one case per class count keeps the run short
                    tag = f"K={k} rank {r} C={classes} {dtype} {reduction} ignore={ignore}"
                    logits, target = _inputs(classes, 100 + classes, dtype, ignore)
                    shard = logits.tensor_split(k, dim=1)[r].clone().requires_grad_(True)
                    loss = parallel_cross_entropy(shard, target, reduction=reduction)
                    weight = torch.rand(BATCH, generator=torch.Generator().manual_seed(5)).double()
                    (loss.double() * weight).sum().backward() if reduction == "none" else loss.backward()

                    full = logits.double().requires_grad_(True)
                    ref = F.cross_entropy(full, target, reduction=reduction)
                    (ref * weight).sum().backward() if reduction == "none" else ref.backward()
                    assert loss.dtype == dtype and loss.shape == ref.shape, tag
                    assert_close_rel(loss, ref, dtype, f"{tag}: loss")
                    assert_close_rel(shard.grad, full.grad.tensor_split(k, dim=1)[r], dtype, f"{tag}: grad")
                    checks.append(tag)


def _column_into_loss(k, r, checks):
    fin, classes = 13 * k + 1, 17 * k + 2
    sizes = [len(c) for c in torch.arange(classes).tensor_split(k)]
    torch.manual_seed(11)
    col = ColumnParallelLinear(fin, classes)
    torch.manual_seed(11)
    single = nn.Linear(fin, classes, dtype=torch.float64)
    x = torch.randn(BATCH, fin).requires_grad_(True)
    target = torch.randint(0, classes, (BATCH,))
    loss = ParallelCrossEntropy()(col(x), target)
    loss.backward()
    x64 = x.detach().double().requires_grad_(True)
    with torch.no_grad():
        single.weight.copy_(col.to_linear().weight)
        single.bias.copy_(col.to_linear().bias)
    ref = F.cross_entropy(single(x64), target)
    ref.backward()
    tag = f"column->loss K={k} rank {r}"
    dt = torch.float32
    assert_close_rel(loss, ref, dt, f"{tag}: loss")
    assert_close_rel(x.grad, x64.grad, dt, f"{tag}: grad x")
    w = pd.all_gather(col.weight.grad, dim=0, grad="split", sizes=sizes)
    b = pd.all_gather(col.bias.grad, dim=0, grad="split", sizes=sizes)
    assert_close_rel(w, single.weight.grad, dt, f"{tag}: grad weight")
    assert_close_rel(b, single.bias.grad, dt, f"{tag}: grad bias")
    checks.append(tag)


def _traffic(k, r, checks):
    logits, target = _inputs(17 * k + 2, 3, torch.float32)
    shard = logits.tensor_split(k, dim=1)[r]
    with pd.comm_stats() as stats:
        parallel_cross_entropy(shard, target)
    expected = parallel_cross_entropy_comm(BATCH, k)
    assert stats.calls == {"all_reduce": len(expected)}, stats.as_dict()
    from pyowt.distributed.accounting import all_reduce_bytes
    sent = sum(all_reduce_bytes(n, k, r, 4)[0] for _, n in expected)
    assert stats["all_reduce"].sent == sent, (stats.as_dict(), sent)
    checks.append(f"traffic K={k}")


def _expect(exc, match, fn):
    with pytest.raises(exc, match=match):
        fn()


def _errors(k, r, checks):
    classes = 17 * k + 2
    logits, target = _inputs(classes, 9, torch.float32)
    shard = logits.tensor_split(k, dim=1)[r]
    bad = target.clone()
    bad[3] = classes
    # Raised on every rank after the first all-reduce (all know C), so no rank hangs.
    _expect(ValueError, rf"target holds {classes}, outside \[0, {classes}\)",
            lambda: parallel_cross_entropy(shard, bad))
    _expect(ValueError, r"target must have shape \(7,\)", lambda: parallel_cross_entropy(shard, target[:5]))
    _expect(TypeError, "target must hold int64 class indices, got torch.float32",
            lambda: parallel_cross_entropy(shard, target.float()))
    _expect(ValueError, "reduction must be one of", lambda: parallel_cross_entropy(shard, target, reduction="avg"))
    _expect(ValueError, "logits_shard must be 2-d", lambda: parallel_cross_entropy(shard[0], target))
    if k > 1:
        # The last rank holds two classes too many: more than the first, which tensor_split
        # never does; every rank must say so.
        wrong = torch.randn(BATCH, shard.shape[1] + (2 if r == k - 1 else 0))
        _expect(ValueError, "do not split .* classes as torch.tensor_split does",
                lambda: parallel_cross_entropy(wrong, target))
    checks.append(f"errors K={k}")


def _all_loss_checks():
    k, r = dist.get_world_size(), dist.get_rank()
    checks = []
    _loss_cases(k, r, checks)
    _column_into_loss(k, r, checks)
    _traffic(k, r, checks)
    _errors(k, r, checks)
    return checks


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_parallel_cross_entropy_matches_f_cross_entropy(run_workers, k):
    results = run_workers(k, _all_loss_checks)
    n_classes = len({17 * k + 2, max(k - 1, 1), 1})
    assert all(len(c) == n_classes * 7 + 3 for c in results), results
