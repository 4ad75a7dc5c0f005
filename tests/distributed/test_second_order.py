"""Gradients of gradients (create_graph=True) through every transition (Gloo, K = 2, 3).

Under create_graph each backward collective is recorded as its dual transition, so the
second derivative runs the dual's backward collective. Every rank checks its first and
second derivatives against single-process float64 math that follows each transition's
placement conventions: Partial/Shard inputs are separate variables per rank (the objective
is the sum of the ranks' objectives, or counted once where the output's gradient is
Replicate: all_reduce, all_gather(grad="split")); copy_to_group and split take a Replicate
input (one variable, identical on every rank), whose Replicate gradient must then be
consumed identically on every rank (the same weights v). The gradient penalty through a
column -> row parallel stack is the end-to-end case: before all_reduce's identity backward
was recorded as a copy_to_group under create_graph, its second-order gradients were
silently 26-43% off.
"""
import pytest
import torch
import torch.distributed as dist

import pyowt.distributed as pd

NAMES = ("all_gather", "reduce_scatter", "copy_to_group", "split", "broadcast", "reduce_to",
         "all_reduce", "all_gather_split")
SHARED = ("copy_to_group", "split")  # Replicate input: one variable on every rank
# Replicate output whose gradient is Replicate: the consumers compute the same loss on
# every rank, which counts once.
ONCE = ("all_reduce", "all_gather_split")
SHAPE = (6, 3)


def _value(seed):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _x(name, rank):
    return _value(0 if name in SHARED else 100 + rank)


def _v(name, rank):
    return _value(200 if name in SHARED else 300 + rank)


def _loss(y):
    """|y|^2 plus the squared column sums: the second term mixes rows, so that second
    derivatives need the other ranks' pieces, not only this rank's."""
    return (y * y).sum() + y.sum(0).pow(2).sum()


def _outputs(name, xs, k):
    """The transition's output on every rank, as single-process math (None: unspecified)."""
    if name in ("all_gather", "all_gather_split"):
        return [torch.cat(xs)] * k
    if name == "all_reduce":
        return [sum(xs)] * k
    if name == "reduce_scatter":
        return list(sum(xs).tensor_split(k))
    if name == "copy_to_group":
        return [xs[0]] * k
    if name == "split":
        return list(xs[0].tensor_split(k))
    if name == "broadcast":  # src 0
        return [xs[0]] * k
    return [sum(xs)] + [None] * (k - 1)  # reduce_to, dst 0


def _expected(name, k):
    """(first, second) derivatives per rank: d/dx_r of sum_r loss(y_r), then of
    sum_r <first_r, v_r> (once for a Replicate gradient)."""
    if name in SHARED:
        leaves = [_x(name, 0).requires_grad_(True)]
        xs = leaves * k
    else:
        leaves = [_x(name, r).requires_grad_(True) for r in range(k)]
        xs = leaves
    ys = _outputs(name, xs, k)[:1] if name in ONCE else _outputs(name, xs, k)
    loss = sum(_loss(y) for y in ys if y is not None)
    first = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
    first = [f if f is not None else torch.zeros(SHAPE, dtype=torch.float64) for f in first]
    if name in SHARED:
        objective = (first[0] * _v(name, 0)).sum()
    else:
        objective = sum((f * _v(name, r)).sum() for r, f in enumerate(first) if f.requires_grad)
    second = torch.autograd.grad(objective, leaves, allow_unused=True)
    second = [s if s is not None else torch.zeros(SHAPE, dtype=torch.float64) for s in second]
    if name in SHARED:
        return [(first[0].detach(), second[0])] * k
    return [(f.detach(), s) for f, s in zip(first, second)]


def _second_order_worker():
    rank, k = dist.get_rank(), dist.get_world_size()
    ops = {"all_gather": lambda t: pd.all_gather(t, 0),
           "reduce_scatter": lambda t: pd.reduce_scatter(t, 0),
           "copy_to_group": pd.copy_to_group,
           "split": lambda t: pd.split(t, 0),
           "broadcast": lambda t: pd.broadcast(t, 0),
           "reduce_to": lambda t: pd.reduce_to(t, 0),
           "all_reduce": pd.all_reduce,
           "all_gather_split": lambda t: pd.all_gather(t, 0, None, "split")}
    errors, calls = {}, {}
    for name in NAMES:
        with pd.comm_stats() as stats:
            x = _x(name, rank).requires_grad_(True)
            y = ops[name](x)
            (first,) = torch.autograd.grad(_loss(y), x, create_graph=True, allow_unused=True)
            if first is None:
                first = torch.zeros(SHAPE, dtype=torch.float64)
            (second,) = (torch.autograd.grad((first * _v(name, rank)).sum(), x, allow_unused=True)
                         if first.requires_grad else (None,))
        if second is None:
            second = torch.zeros(SHAPE, dtype=torch.float64)
        want_first, want_second = _expected(name, k)[rank]
        errors[name] = (float((first.detach() - want_first).abs().max()),
                        float((second - want_second).abs().max()),
                        float(want_second.abs().max()))
        calls[name] = {kind: stats[kind].calls for kind in
                       ("all_gather", "reduce_scatter", "all_reduce", "broadcast", "reduce")}
    return errors, calls


@pytest.mark.parametrize("k", [2, 3])
def test_second_derivatives_through_every_transition(run_workers, k):
    results = run_workers(k, _second_order_worker, timeout=90)
    # Every rank ran the same collectives (one left out would leave a peer waiting, or a
    # message unread that a later collective could consume).
    for name in NAMES:
        assert len({repr(calls[name]) for _, calls in results}) == 1, (
            name, [calls[name] for _, calls in results])
    results = [errors for errors, _ in results]
    for rank, errors in enumerate(results):
        assert sorted(errors) == sorted(NAMES)
        for name, (first_err, second_err, scale) in errors.items():
            assert first_err < 1e-12, f"rank {rank} {name}: first derivative off by {first_err}"
            assert second_err < 1e-12, f"rank {rank} {name}: second derivative off by {second_err}"
    # The second derivatives are not trivially zero (except where a rank's x is unused).
    assert all(results[0][name][2] > 0 for name in NAMES)


def _gradient_penalty_worker():
    """A gradient penalty (the squared input gradient) through ColumnParallelLinear(ReLU) ->
    RowParallelLinear (float32, the fused ops), against the same two layers as nn.Linear
    in float64 in one process."""
    from pyowt.nn import ColumnParallelLinear, RowParallelLinear

    torch.manual_seed(0)  # the same full layers and input on every rank
    fc1, fc2 = torch.nn.Linear(13, 17), torch.nn.Linear(17, 5)  # float32, as the fused ops
    x = torch.randn(7, 13)

    def penalty(f1, f2, inp):
        inp = inp.clone().requires_grad_(True)
        out = f2(f1(inp))
        (g,) = torch.autograd.grad(out.pow(2).sum(), inp, create_graph=True)
        return g.pow(2).sum()

    # The reference: the same layers in float64.
    fc1_64 = torch.nn.Linear(13, 17, dtype=torch.float64)
    fc2_64 = torch.nn.Linear(17, 5, dtype=torch.float64)
    with torch.no_grad():
        for dst, src in ((fc1_64, fc1), (fc2_64, fc2)):
            dst.weight.copy_(src.weight)
            dst.bias.copy_(src.bias)
    ref = penalty(lambda t: torch.relu(fc1_64(t)), fc2_64, x.double())
    ref_grads = torch.autograd.grad(ref, [fc1_64.weight, fc1_64.bias, fc2_64.weight, fc2_64.bias])
    col = ColumnParallelLinear.from_linear(fc1, activation="relu")
    row = RowParallelLinear.from_linear(fc2)
    ours = penalty(col, row, x)
    grads = torch.autograd.grad(ours, [col.weight, col.bias, row.weight, row.bias])
    # This rank's shards of the reference gradients.
    o0, n0 = col.offset, col.weight.shape[0]
    i0, n1 = row.offset, row.weight.shape[1]
    want = [ref_grads[0][o0:o0 + n0], ref_grads[1][o0:o0 + n0], ref_grads[2][:, i0:i0 + n1], ref_grads[3]]
    return (float((ours.double() - ref).abs()), float(ref.abs()),
            [float((g.double() - w).norm() / w.norm()) for g, w in zip(grads, want)])


@pytest.mark.parametrize("k", [2, 3])
def test_gradient_penalty_through_parallel_linear_stack(run_workers, k):
    for value_err, scale, grad_errs in run_workers(k, _gradient_penalty_worker, timeout=90):
        assert scale > 0 and value_err <= 1e-5 * scale
        assert max(grad_errs) < 1e-5, grad_errs


def _loss_hessian_worker():
    """Second derivatives of parallel_cross_entropy (logits sharded by class) against
    F.cross_entropy on the full logits: a gradient penalty on the logits, per reduction."""
    import torch.nn.functional as F

    from pyowt.nn.functional import parallel_cross_entropy

    rank, k = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(5)
    full = torch.randn(6, 11, generator=g)
    target = torch.randint(0, 11, (6,), generator=g)
    target[2] = -100  # ignored
    sizes = [len(c) for c in torch.arange(11).tensor_split(k)]
    offset = sum(sizes[:rank])
    errors = []
    for reduction in ("mean", "sum", "none"):
        def penalty(logits, loss_fn):
            logits = logits.clone().requires_grad_(True)
            loss = loss_fn(logits)
            weights = torch.linspace(0.5, 1.5, loss.numel()).reshape(loss.shape)
            (grad,) = torch.autograd.grad((loss * weights).sum(), logits, create_graph=True)
            return logits, grad, grad.pow(2).sum()

        ref_in, ref_grad, ref_pen = penalty(full.double(), lambda z: F.cross_entropy(
            z, target, reduction=reduction))
        (ref_h,) = torch.autograd.grad(ref_pen, ref_in)
        shard = full[:, offset:offset + sizes[rank]]
        ours_in, ours_grad, ours_pen_local = penalty(shard, lambda z: parallel_cross_entropy(
            z, target, reduction=reduction))
        # This rank's part of the penalty: the squared gradient of its own classes.
        (ours_h,) = torch.autograd.grad(ours_pen_local, ours_in)
        want_grad = ref_grad[:, offset:offset + sizes[rank]]
        want_h = ref_h[:, offset:offset + sizes[rank]]
        errors.append((reduction,
                       float((ours_grad.double() - want_grad).norm() / want_grad.norm()),
                       float((ours_h.double() - want_h).norm() / want_h.norm())))
    return errors


@pytest.mark.parametrize("k", [2, 3])
def test_parallel_cross_entropy_second_derivatives(run_workers, k):
    for errors in run_workers(k, _loss_hessian_worker, timeout=90):
        for reduction, grad_err, hess_err in errors:
            assert grad_err < 1e-5, (reduction, grad_err)
            assert hess_err < 1e-5, (reduction, hess_err)
