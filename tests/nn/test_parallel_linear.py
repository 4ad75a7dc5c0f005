"""Column/row-parallel linear layers against a single-process nn.Linear (Gloo, K = 1..4).

One worker call per K runs every case. Feature counts are chosen so that K never divides
them (in = 13K+1, out = 17K+2), batch 7. Each rank rebuilds the single-process reference in
float64 from the same values, and compares outputs and every gradient (input and each
parameter, gathered over ranks).
"""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import pyowt.distributed as pd
from pyowt.nn import ColumnParallelLinear, RowParallelLinear

from ..utils import assert_close_rel

BATCH = 7


def _rand(shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


def _shard(t, dim, k, r):
    return t.tensor_split(k, dim=dim)[r]


def _gather(t, dim, sizes):
    return pd.all_gather(t.detach(), dim=dim, grad="split", sizes=sizes)


def _ref_linear(lin: nn.Linear) -> nn.Linear:
    ref = nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None, dtype=torch.float64)
    with torch.no_grad():
        ref.weight.copy_(lin.weight)
        if lin.bias is not None:
            ref.bias.copy_(lin.bias)
    return ref


def _check_grads(tag, pairs, dtype):
    for name, got, ref in pairs:
        assert got is not None, f"{tag}: {name} has no gradient"
        assert_close_rel(got, ref, dtype, f"{tag}: {name}")


def _column_cases(k, r, dtype, checks):
    fin, fout = 13 * k + 1, 17 * k + 2
    out_sizes = [len(c) for c in torch.arange(fout).tensor_split(k)]
    for shape, bias, act, gather in [((BATCH, fin), True, "relu", False), ((BATCH, fin), False, None, True),
                                     ((2, 3, fin), True, "relu", True)]:
        tag = f"column K={k} rank {r} {dtype} x{shape} bias={bias} act={act} gather={gather}"
        torch.manual_seed(1234)
        col = ColumnParallelLinear(fin, fout, bias=bias, activation=act, gather_output=gather, dtype=dtype)
        torch.manual_seed(1234)
        single = nn.Linear(fin, fout, bias=bias, dtype=dtype)
        full = col.to_linear()
        assert torch.equal(full.weight, single.weight), f"{tag}: init differs from nn.Linear"
        assert bias is False or torch.equal(full.bias, single.bias), f"{tag}: bias init differs"

        x = _rand(shape, 7, dtype).requires_grad_(True)
        wout = _rand(shape[:-1] + (fout,), 8)
        y = col(x)
        # With gather_output the loss is the same on every rank (Replicate); without, rank r
        # holds the summand of its own features (the total is the sum over ranks).
        w_mine = wout if gather else _shard(wout, -1, k, r)
        (y.double() * w_mine).sum().backward()

        ref = _ref_linear(single)
        x64 = x.detach().double().requires_grad_(True)
        y64 = ref(x64)
        y64 = F.relu(y64) if act == "relu" else y64
        (y64 * wout).sum().backward()
        assert_close_rel(y, y64 if gather else _shard(y64, -1, k, r), dtype, f"{tag}: output")
        pairs = [("grad x", x.grad, x64.grad),
                 ("grad weight", _gather(col.weight.grad, 0, out_sizes), ref.weight.grad)]
        if bias:
            pairs.append(("grad bias", _gather(col.bias.grad, 0, out_sizes), ref.bias.grad))
        _check_grads(tag, pairs, dtype)
        checks.append(tag)


def _row_cases(k, r, dtype, checks):
    fin, fout = 13 * k + 1, 17 * k + 2
    in_sizes = [len(c) for c in torch.arange(fin).tensor_split(k)]
    out_sizes = [len(c) for c in torch.arange(fout).tensor_split(k)]
    for bias, parallel_in, reduce in [(True, True, "all_reduce"), (False, False, "all_reduce"),
                                      (True, True, "reduce_scatter"), (True, False, "reduce_scatter")]:
        tag = f"row K={k} rank {r} {dtype} bias={bias} input_is_parallel={parallel_in} {reduce}"
        torch.manual_seed(99)
        row = RowParallelLinear(fin, fout, bias=bias, input_is_parallel=parallel_in, reduce_output=reduce, dtype=dtype)
        torch.manual_seed(99)
        single = nn.Linear(fin, fout, bias=bias, dtype=dtype)
        full = row.to_linear()
        assert torch.equal(full.weight, single.weight), f"{tag}: init differs from nn.Linear"
        assert bias is False or torch.equal(full.bias, single.bias), f"{tag}: bias init differs"

        x_full = _rand((BATCH, fin), 17, dtype)
        x = (_shard(x_full, -1, k, r) if parallel_in else x_full).clone().requires_grad_(True)
        wout = _rand((BATCH, fout), 18)
        y = row(x)
        scattered = reduce == "reduce_scatter"
        (y.double() * (_shard(wout, -1, k, r) if scattered else wout)).sum().backward()

        ref = _ref_linear(single)
        x64 = x_full.double().requires_grad_(True)
        y64 = ref(x64)
        (y64 * wout).sum().backward()
        assert_close_rel(y, _shard(y64, -1, k, r) if scattered else y64, dtype, f"{tag}: output")
        gx_ref = _shard(x64.grad, -1, k, r) if parallel_in else x64.grad
        pairs = [("grad x", x.grad, gx_ref), ("grad weight", _gather(row.weight.grad, 1, in_sizes), ref.weight.grad)]
        if bias:
            gb = _gather(row.bias.grad, 0, out_sizes) if scattered else row.bias.grad
            pairs.append(("grad bias", gb, ref.bias.grad))
        _check_grads(tag, pairs, dtype)
        checks.append(tag)


def _stack_case(k, r, dtype, checks):
    """Column (ReLU, sharded output) -> row (all-reduce): the two-layer model-parallel head."""
    fin, hidden, fout = 13 * k + 1, 17 * k + 2, 11
    hid_sizes = [len(c) for c in torch.arange(hidden).tensor_split(k)]
    torch.manual_seed(5)
    col = ColumnParallelLinear(fin, hidden, activation="relu", dtype=dtype)
    row = RowParallelLinear(hidden, fout, dtype=dtype)
    torch.manual_seed(5)
    l1, l2 = nn.Linear(fin, hidden, dtype=dtype), nn.Linear(hidden, fout, dtype=dtype)
    x = _rand((BATCH, fin), 21, dtype).requires_grad_(True)
    wout = _rand((BATCH, fout), 22)
    y = row(col(x))
    (y.double() * wout).sum().backward()

    r1, r2 = _ref_linear(l1), _ref_linear(l2)
    x64 = x.detach().double().requires_grad_(True)
    y64 = r2(F.relu(r1(x64)))
    (y64 * wout).sum().backward()
    tag = f"column->row K={k} rank {r} {dtype}"
    assert_close_rel(y, y64, dtype, f"{tag}: output")
    _check_grads(tag, [
        ("grad x", x.grad, x64.grad),
        ("grad w1", _gather(col.weight.grad, 0, hid_sizes), r1.weight.grad),
        ("grad b1", _gather(col.bias.grad, 0, hid_sizes), r1.bias.grad),
        ("grad w2", _gather(row.weight.grad, 1, hid_sizes), r2.weight.grad),
        ("grad b2", row.bias.grad, r2.bias.grad),
    ], dtype)
    checks.append(tag)


def _conversion_cases(k, r, checks):
    torch.manual_seed(3)
    lin = nn.Linear(13 * k + 1, 17 * k + 2)
    for conv in (lambda m: ColumnParallelLinear.from_linear(m, activation="relu"),
                 lambda m: RowParallelLinear.from_linear(m),
                 lambda m: RowParallelLinear.from_linear(m, reduce_output="reduce_scatter")):
        back = conv(lin).to_linear()
        assert type(back) is nn.Linear
        assert torch.equal(back.weight, lin.weight) and torch.equal(back.bias, lin.bias), "round trip not exact"
    nobias = nn.Linear(13 * k + 1, 17 * k + 2, bias=False)
    assert ColumnParallelLinear.from_linear(nobias).to_linear().bias is None
    checks.append(f"conversions K={k}")


def _expect(exc, match, fn):
    with pytest.raises(exc, match=match):
        fn()


def _error_cases(k, r, checks):
    fin, fout = 13 * k + 1, 17 * k + 2
    col = ColumnParallelLinear(fin, fout)
    row = RowParallelLinear(fin, fout)
    n_in = [len(c) for c in torch.arange(fin).tensor_split(k)][r]
    _expect(ValueError, rf"ColumnParallelLinear: expected input with last dim {fin} .* got shape \(7, {fin + 1}\)",
            lambda: col(torch.randn(BATCH, fin + 1)))
    bad = fin if n_in != fin else fin + 1
    _expect(ValueError, rf"RowParallelLinear: expected input with last dim {n_in} \(this rank's shard of "
                        rf"in_features={fin} over {k} ranks\), got shape \(7, {bad}\)",
            lambda: row(torch.randn(BATCH, bad)))
    _expect(TypeError, "weight dtype torch.float32 differs from x dtype torch.bfloat16",
            lambda: col(torch.randn(BATCH, fin, dtype=torch.bfloat16)))
    _expect(ValueError, "weight is on cpu but x is on meta", lambda: col(torch.randn(BATCH, fin, device="meta")))
    _expect(ValueError, "reduce_output must be 'all_reduce' or 'reduce_scatter', got 'sum'",
            lambda: RowParallelLinear(fin, fout, reduce_output="sum"))
    _expect(ValueError, "activation must be 'relu' or None, got 'tanh'",
            lambda: ColumnParallelLinear(fin, fout, activation="tanh"))
    _expect(ValueError, "out_features must be >= 1, got 0", lambda: ColumnParallelLinear(fin, 0))
    if k > 1:
        _expect(ValueError, rf"ColumnParallelLinear: cannot split out_features={k - 1} over {k} ranks",
                lambda: ColumnParallelLinear(fin, k - 1))
        _expect(ValueError, rf"RowParallelLinear: cannot split in_features={k - 1} over {k} ranks",
                lambda: RowParallelLinear(k - 1, fout))
    checks.append(f"errors K={k}")


def _all_linear_checks():
    k, r = dist.get_world_size(), dist.get_rank()
    checks = []
    _column_cases(k, r, torch.float32, checks)
    _row_cases(k, r, torch.float32, checks)
    _stack_case(k, r, torch.float32, checks)
    _stack_case(k, r, torch.bfloat16, checks)
    _conversion_cases(k, r, checks)
    _error_cases(k, r, checks)
    return checks


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_parallel_linear_matches_single_process(run_workers, k):
    results = run_workers(k, _all_linear_checks)
    # 3 column + 4 row + 2 stack cases + conversions + errors, all run on every rank.
    assert all(len(checks) == 11 for checks in results), results
