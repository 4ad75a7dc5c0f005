"""Forward values and gradients of every transition against single-process math (Gloo, K = 1..4).

One worker call per K runs every case: dims 0 and 1, even, uneven and empty pieces, fp32 and
bf16, contiguous / transposed / strided / channels-last inputs. Every loss is a weighted sum
whose weights all ranks know, so each rank can compute the exact reference gradient.
"""
import pytest
import torch
import torch.distributed as dist

import pyowt.distributed as pd

from ._reference import check_close, check_exact, pieces, rand, shape_with

BASE3 = (4, 5, 3)
BASE4 = (3, 4, 2, 3)
DTYPES = (torch.float32, torch.bfloat16)


def _cases(k, dtype):
    """(dim, total size along dim, base shape, layout) tuples; layouts are dtype-blind, so
    bf16 runs the contiguous ones only (the suite must stay fast on 2 CPU cores)."""
    totals = sorted({2 * k, 7, max(k - 1, 1)})
    layouts = ("contig", "transposed", "strided") if dtype == torch.float32 else ("contig",)
    out = []
    for dim in (0, 1):
        for total in totals:
            for layout in layouts:
                out.append((dim, total, BASE3, layout))
        if dtype == torch.float32:
            out.append((dim, 7, BASE4, "channels_last"))
    return out


def _leaf(t):
    return t.detach().clone(memory_format=torch.preserve_format).requires_grad_(True)


def _check_gather(k, r, dtype, dim, total, base, layout, seed):
    sizes = pieces(total, k)
    xs = [rand(shape_with(base, dim, sizes[q]), seed + q, dtype, layout) for q in range(k)]
    full_shape = shape_with(base, dim, total)
    ws = [rand(full_shape, seed + 100 + q, dtype) for q in range(k)]
    ref = torch.cat(xs, dim)
    off = sum(sizes[:r])
    tag = f"K={k} rank {r} {dtype} dim {dim} sizes {sizes} {layout}"
    # grad="reduce_scatter": the consumer's gradient is Partial, rank q's summand is ws[q].
    for kw in ({}, {"sizes": sizes}):
        x = _leaf(xs[r])
        y = pd.all_gather(x, dim, grad="reduce_scatter", **kw)
        check_exact(y, ref, f"all_gather {tag} {kw}")
        if layout == "channels_last" and not xs[r].is_contiguous():  # C = 1 is both layouts
            assert y.is_contiguous(memory_format=torch.channels_last), f"layout lost: {tag}"
        (y * ws[r]).sum().backward()
        gref = sum(w.double() for w in ws).narrow(dim, off, sizes[r])
        check_close(x.grad, gref, dtype, f"all_gather grad=reduce_scatter {tag}")
    # grad="split": the consumer's gradient is Replicate (every rank uses ws[0]).
    x = _leaf(xs[r])
    y = pd.all_gather(x, dim, grad="split")
    (y * ws[0]).sum().backward()
    check_exact(x.grad, ws[0].narrow(dim, off, sizes[r]), f"all_gather grad=split {tag}")
    # Async twin: same values, same gradients.
    x = _leaf(xs[r])
    pending = pd.all_gather_async(x, dim, grad="reduce_scatter")
    y = pending.wait()
    assert pending.is_completed()
    check_exact(y, ref, f"all_gather_async {tag}")
    (y * ws[r]).sum().backward()
    check_close(x.grad, sum(w.double() for w in ws).narrow(dim, off, sizes[r]), dtype,
                f"all_gather_async grad {tag}")
    return 4


def _check_scatter_split(k, r, dtype, dim, total, base, layout, seed):
    sizes = pieces(total, k)
    full_shape = shape_with(base, dim, total)
    xs = [rand(full_shape, seed + q, dtype, layout) for q in range(k)]
    ws = [rand(shape_with(base, dim, sizes[q]), seed + 100 + q, dtype) for q in range(k)]
    off = sum(sizes[:r])
    tag = f"K={k} rank {r} {dtype} dim {dim} sizes {sizes} {layout}"
    gref = torch.cat([w.double() for w in ws], dim)  # every rank's input gets all pieces' weights
    total_ref = sum(x.double() for x in xs)
    for name, call in (("reduce_scatter", lambda x: pd.reduce_scatter(x, dim)),
                       ("reduce_scatter_async", lambda x: pd.reduce_scatter_async(x, dim).wait())):
        x = _leaf(xs[r])
        y = call(x)
        check_close(y, total_ref.narrow(dim, off, sizes[r]), dtype, f"{name} {tag}")
        if layout == "channels_last":
            assert y.is_contiguous(memory_format=torch.channels_last), f"layout lost: {tag}"
        (y * ws[r]).sum().backward()
        check_exact(x.grad, gref.to(dtype), f"{name} grad {tag}")
    # split: a replicated input (xs[0] on every rank); each rank's piece feeds its own loss.
    x = _leaf(xs[0])
    y = pd.split(x, dim)
    check_exact(y, xs[0].narrow(dim, off, sizes[r]), f"split {tag}")
    (y * ws[r]).sum().backward()
    check_exact(x.grad, gref.to(dtype), f"split grad {tag}")
    return 3


def _check_whole(k, r, dtype, shape, layout, seed):
    xs = [rand(shape, seed + q, dtype, layout) for q in range(k)]
    ws = [rand(shape, seed + 100 + q, dtype) for q in range(k)]
    tag = f"K={k} rank {r} {dtype} shape {shape} {layout}"
    wsum = sum(w.double() for w in ws)
    # all_reduce: consumer gradient Replicate (ws[0] everywhere) -> identity backward.
    for name, call in (("all_reduce", pd.all_reduce), ("all_reduce_async", lambda x: pd.all_reduce_async(x).wait())):
        x = _leaf(xs[r])
        y = call(x)
        check_close(y, sum(v.double() for v in xs), dtype, f"{name} {tag}")
        (y * ws[0]).sum().backward()
        check_exact(x.grad, ws[0], f"{name} grad {tag}")
    # copy_to_group: identity forward; each rank's loss is a summand -> gradients summed.
    x = _leaf(xs[0])
    y = pd.copy_to_group(x)
    check_exact(y, xs[0], f"copy_to_group {tag}")
    (y * ws[r]).sum().backward()
    check_close(x.grad, wsum, dtype, f"copy_to_group grad {tag}")
    # broadcast from every src; gradients of all ranks' losses summed into src only.
    for src in range(k):
        for name, call in (("broadcast", lambda x: pd.broadcast(x, src)),
                           ("broadcast_async", lambda x: pd.broadcast_async(x, src).wait())):
            x = _leaf(xs[r])
            y = call(x)
            check_exact(y, xs[src], f"{name} src={src} {tag}")
            (y * ws[r]).sum().backward()
            if r == src:
                check_close(x.grad, wsum, dtype, f"{name} grad src={src} {tag}")
            else:
                assert x.grad is None, f"{name} src={src}: non-src rank got a gradient {tag}"
    # reduce_to: only dst's output is defined; the others' losses must not leak into grads.
    for dst in range(k):
        x = _leaf(xs[r])
        y = pd.reduce_to(x, dst)
        if r == dst:
            check_close(y, sum(v.double() for v in xs), dtype, f"reduce_to dst={dst} {tag}")
        (y * ws[r]).sum().backward()
        check_exact(x.grad, ws[dst], f"reduce_to grad dst={dst} {tag}")
    return 4 + 3 * k


def _all_cases(seed):
    k, r = dist.get_world_size(), dist.get_rank()
    torch.manual_seed(seed + r)  # only to show results do not depend on the global RNG
    done = 0
    for dtype in DTYPES:
        for i, (dim, total, base, layout) in enumerate(_cases(k, dtype)):
            s = seed + 1000 * i
            done += _check_gather(k, r, dtype, dim, total, base, layout, s)
            done += _check_scatter_split(k, r, dtype, dim, total, base, layout, s + 500)
        for j, (shape, layout) in enumerate(((BASE3, "contig"), (BASE3, "strided"), (BASE4, "channels_last"))):
            done += _check_whole(k, r, dtype, shape, layout, seed + 77 * j)
    return done


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_values_and_gradients_match_single_process(run_workers, k):
    counts = run_workers(k, _all_cases, 12345)
    assert len(counts) == k and all(c == counts[0] and c > 60 for c in counts), counts


def _fallback_and_groups():
    """Reduce-scatter fallback (all-reduce + slice), subgroups, a 1-D DeviceMesh, no warnings."""
    import warnings

    from pyowt.distributed import _compat

    k, r = dist.get_world_size(), dist.get_rank()
    sizes = pieces(7, k)
    xs = [rand((7, 3), 10 + q) for q in range(k)]
    ws = [rand((sizes[q], 3), 20 + q) for q in range(k)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any deprecation warning from the raw calls fails
        native = pd.reduce_scatter(xs[r], 0)
        x = _leaf(xs[r])
        _compat._force_reduce_scatter_fallback("gloo")
        try:
            y = pd.reduce_scatter(x, 0)
            g = pd.all_gather(_leaf(ws[r]), 0)  # backward is a reduce-scatter too
        finally:
            _compat._force_reduce_scatter_fallback("gloo", on=False)
    assert torch.allclose(y, native, rtol=1e-6, atol=1e-6), "fallback reduce_scatter differs"
    (y * ws[r]).sum().backward()
    check_exact(x.grad, torch.cat(ws), "fallback reduce_scatter grad")
    assert g.shape == (7, 3)
    # A subgroup of the last two ranks: src/dst are ranks *within* the group.
    members = [k - 2, k - 1]
    sub = dist.new_group(members)
    if r in members:
        gr = members.index(r)
        assert pd.get_rank(sub) == gr and pd.get_world_size(sub) == 2
        y = pd.broadcast(torch.full((2,), float(r)), src=0, group=sub)
        check_exact(y, torch.full((2,), float(members[0])), "subgroup broadcast src=0")
        y = pd.all_gather(torch.full((gr + 1,), float(r)), 0, group=sub)
        check_exact(y, torch.tensor([float(members[0])] + [float(members[1])] * 2), "subgroup all_gather")
    else:
        try:
            pd.all_reduce(torch.ones(2), group=sub)
        except ValueError as err:
            assert "not a member" in str(err), err
        else:
            raise AssertionError("non-member rank did not raise")
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (k,))
    y = pd.all_reduce(torch.full((3,), float(r + 1)), group=mesh)
    check_exact(y, torch.full((3,), k * (k + 1) / 2), "all_reduce over a DeviceMesh")
    return "ok"


def test_reduce_scatter_fallback_subgroups_and_mesh(run_workers):
    assert run_workers(3, _fallback_and_groups) == ["ok"] * 3
