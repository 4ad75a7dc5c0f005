"""The CUDA backend's backward of conv2d_bias_act (csrc/cuda/conv2d_backward.cu).

Two parts:
* a CPU emulation (no GPU needed) of the fp32 kernels' exact index arithmetic, against
  autograd's gradients of F.conv2d in float64: the data gradient as conv2d_simt_kernel with
  kDgrad (the forward's GEMM emulation of test_conv2d_cuda.py, driven by the data-gradient
  row decoder and A offset of conv2d_common.cuh) and the split-M weight-gradient kernel of
  conv2d_simt_wgrad.cuh (every thread's loads, the M slices, the partial tiles and the
  host's sum over them). Unwritten shared slots are NaN; every partial element must be
  written exactly once. Keep these functions in step with the CUDA sources (same names).
* GPU tests (``@pytest.mark.gpu``) of ``torch.ops.pyowt.conv2d_bias_act_backward`` against a
  float64 CPU reference, by relative L2 error.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

from ..utils import REL_TOL, assert_close_rel, rel_err
from .test_conv2d_cuda import (ALEXNET, CONFIGS, DTYPE_IDS, DTYPES, EMU_CASES, GROUPED, _gather, _inputs,
                               _Params, _put, a_offset, decode_k, decode_row, emulate_simt_gemm)


def _cdiv(a, b):
    return -(-a // b)


# ---------------------------------------------------------------------------------------
# The data gradient: conv2d_simt_kernel<kNhwcOut, /*kDgrad=*/true>
# ---------------------------------------------------------------------------------------
def dgrad_params(x_shape, w_shape, stride, padding, dilation):
    """ConvParams of the data-gradient GEMM (make_params(dgrad_geometry(g)))."""
    f = _Params(x_shape, w_shape, stride, padding, dilation, 0)
    t = copy.copy(f)
    t.C, t.H, t.W, t.Cout, t.Ho, t.Wo = f.Cout, f.Ho, f.Wo, f.C, f.H, f.W
    t.HoWo, t.HWC = f.H * f.W, f.Ho * f.Wo * f.Cout
    t.M, t.K = f.N * f.H * f.W, f.R * f.S * f.Cout
    t.ldw = t.K
    return t


def decode_row_dgrad(p, m):
    ok = m < p.M
    mm = torch.where(ok, m, 0)
    n = mm // p.HoWo
    pix = mm - n * p.HoWo
    ih = pix // p.Wo
    iw = pix - ih * p.Wo
    return (n * p.HWC, ih + p.ph, iw + p.pw, ok)


def a_offset_dgrad(p, row, r, s, c):
    base, ih0, iw0, row_ok = row
    th, tw = ih0 - r * p.dh, iw0 - s * p.dw
    # C's integer division truncates toward zero (th, tw may be negative here).
    oh = th if p.sh == 1 else torch.div(th, p.sh, rounding_mode="trunc")
    ow = tw if p.sw == 1 else torch.div(tw, p.sw, rounding_mode="trunc")
    ok = (row_ok & (th >= 0) & (tw >= 0) & (oh * p.sh == th) & (ow * p.sw == tw)
          & (oh < p.H) & (ow < p.W))
    return ok, torch.where(ok, base + (oh * p.W + ow) * p.C + c, 0)


def emulate_dgrad(grad_pre, w, x_shape, stride, padding, dilation, nhwc_out):
    """grad_x as dgrad_simt launches it: grad_pre NHWC, the weight stored (C_in, R, S, C_out)."""
    p = dgrad_params(x_shape, tuple(w.shape), stride, padding, dilation)
    gf = grad_pre.permute(0, 2, 3, 1).reshape(-1)
    wt = w.permute(1, 2, 3, 0).reshape(-1)
    return emulate_simt_gemm(p, gf, wt, None, False, nhwc_out, decode_row_dgrad, a_offset_dgrad)


# ---------------------------------------------------------------------------------------
# The weight gradient: conv2d_wgrad_simt_kernel and its host (wgrad_simt)
# ---------------------------------------------------------------------------------------
BCO, BK, ROWS, NT, LD = 64, 64, 16, 256, 68


def wgrad_slicing(M, K, cout, sms):
    """(slices, rows per slice) as wgrad_splits / wgrad_simt choose them."""
    tiles = _cdiv(K, BK) * _cdiv(cout, BCO)
    wanted = _cdiv(4 * sms, tiles)
    splits = max(1, min(wanted, max(1, M // 256), max(1, ((1 << 30) - 1) // (cout * K)), 64))
    m_per_split = _cdiv(_cdiv(M, splits), ROWS) * ROWS
    return _cdiv(M, m_per_split), m_per_split


def emulate_wgrad(x, grad_pre, w_shape, stride, padding, dilation, m_per_split):
    """grad_weight (C_out, C_in, R, S) from conv2d_wgrad_simt_kernel's slices, summed."""
    K = x.shape[1] * w_shape[2] * w_shape[3]
    p = _Params(tuple(x.shape), tuple(w_shape), stride, padding, dilation, K)
    xf = x.permute(0, 2, 3, 1).reshape(-1)
    gf = grad_pre.permute(0, 2, 3, 1).reshape(-1)
    splits = _cdiv(p.M, m_per_split)
    gk, gc = _cdiv(p.K, BK), _cdiv(p.Cout, BCO)
    tid = torch.arange(NT)
    ld_row, ld_col = tid // 16, (tid % 16) * 4
    tm, tn = tid // (BK // 4), tid % (BK // 4)
    partial = torch.full((splits * p.Cout * p.K,), float("nan"), dtype=x.dtype)
    written = torch.zeros(partial.shape, dtype=torch.int32)
    for z in range(splits):
        m_begin = z * m_per_split
        m_end = min(p.M, m_begin + m_per_split)
        num_steps = _cdiv(m_end - m_begin, ROWS) if m_end > m_begin else 0
        # blocks (k block bx, co block by) flattened to blk = by * gk + bx
        bx = torch.arange(gk).repeat(gc)[:, None]
        by = torch.arange(gc).repeat_interleave(gk)[:, None]
        acc = torch.zeros(gc * gk, 16, 16, 4, 4, dtype=x.dtype)  # [blk][tm][tn][i][j]
        for step in range(num_steps):
            As = torch.full((gc * gk, ROWS, LD), float("nan"), dtype=x.dtype)
            Gs = torch.full((gc * gk, ROWS, LD), float("nan"), dtype=x.dtype)
            a_cnt, g_cnt = torch.zeros(As.shape, dtype=torch.int32), torch.zeros(Gs.shape, dtype=torch.int32)
            blk = torch.arange(gc * gk)[:, None]
            m = m_begin + step * ROWS + ld_row
            row = decode_row(p, torch.where(m < m_end, m, p.M))
            for j in range(4):
                k = bx * BK + ld_col + j
                k_ok = k < p.K
                r, s, c = decode_k(p, torch.where(k_ok, k, 0))
                ok, off = a_offset(p, row, r, s, c)
                ok = ok & k_ok
                _put(As, a_cnt, blk, ld_row, ld_col + j, _gather(xf, ok, off, 1)[..., 0])
                co = by * BCO + ld_col + j
                g_ok = row[3] & (co < p.Cout)
                _put(Gs, g_cnt, blk, ld_row, ld_col + j,
                     _gather(gf, g_ok, torch.where(g_ok, m * p.Cout + co, 0), 1)[..., 0])
            assert bool((a_cnt[..., :BK] == 1).all() and (a_cnt[..., BK:] == 0).all())
            assert bool((g_cnt[..., :BCO] == 1).all() and (g_cnt[..., BCO:] == 0).all())
            g4 = Gs[:, :, :BCO].reshape(-1, ROWS, 16, 4)  # [kk][tm][i] = Gs[kk][tm*4 + i]
            a4 = As[:, :, :BK].reshape(-1, ROWS, 16, 4)
            acc += torch.einsum("bksi,bktj->bstij", g4, a4)
        for i in range(4):
            for j in range(4):
                co = by * BCO + tm * 4 + i
                k = bx * BK + tn * 4 + j
                ok = (co < p.Cout) & (k < p.K)
                dst = (z * p.Cout * p.K + co * p.K + k)[ok]
                partial[dst] = acc[:, tm, tn, i, j][ok]
                written.index_put_((dst,), torch.ones_like(dst, dtype=torch.int32), accumulate=True)
    assert bool((written == 1).all()), "a partial element was written zero or several times"
    grad_w = partial.view(splits, p.Cout, p.K).sum(0)  # the host's at::sum_out over slices
    return grad_w.view(p.Cout, p.R, p.S, p.C).permute(0, 3, 1, 2)


# Strides with taps between output pixels, padding past the dilated kernel's reach, a
# 1x1 kernel with stride (rows of x no output pixel reads), odd sizes.
DGRAD_CASES = EMU_CASES + [
    (2, 5, 11, 10, 7, 3, 2, (3, 2), (1, 3), (2, 1)),
    (1, 4, 9, 8, 6, 1, 1, (3, 2), (2, 1), (1, 1)),
]


def _case_tensors(case):
    n, c, h, w_, co, r, s, stride, padding, dilation = case
    g = torch.Generator().manual_seed(hash(case) % 1000)
    x = torch.randn(n, c, h, w_, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(co, c, r, s, generator=g, dtype=torch.float64, requires_grad=True)
    y = F.conv2d(x, w, None, stride, padding, dilation)
    grad_pre = torch.randn(y.shape, generator=g, dtype=torch.float64)
    gx, gw = torch.autograd.grad(y, (x, w), grad_pre)
    return x.detach(), w.detach(), grad_pre, gx, gw, (stride, padding, dilation)


@pytest.mark.parametrize("nhwc_out", [False, True])
@pytest.mark.parametrize("case", DGRAD_CASES)
def test_emulated_dgrad_matches_autograd(case, nhwc_out, one_thread):
    x, w, grad_pre, gx, _, (stride, padding, dilation) = _case_tensors(case)
    got = emulate_dgrad(grad_pre, w, tuple(x.shape), stride, padding, dilation, nhwc_out)
    assert got.shape == gx.shape
    assert rel_err(got, gx) < 1e-12, f"relative error {rel_err(got, gx):.3g}"


# The host's slices are multiples of 16 rows; the kernel takes any (24: steps cross slices).
@pytest.mark.parametrize("slicing", ["one slice", "host rule, 132 SMs", "16 rows", "24 rows"])
@pytest.mark.parametrize("case", DGRAD_CASES)
def test_emulated_wgrad_matches_autograd(case, slicing, one_thread):
    x, w, grad_pre, _, gw, (stride, padding, dilation) = _case_tensors(case)
    M = grad_pre.shape[0] * grad_pre.shape[2] * grad_pre.shape[3]
    K = w.shape[1] * w.shape[2] * w.shape[3]
    m_per_split = {"one slice": _cdiv(M, ROWS) * ROWS, "16 rows": ROWS, "24 rows": 24,
                   "host rule, 132 SMs": wgrad_slicing(M, K, w.shape[0], 132)[1]}[slicing]
    got = emulate_wgrad(x, grad_pre, tuple(w.shape), stride, padding, dilation, m_per_split)
    assert got.shape == gw.shape
    assert rel_err(got, gw) < 1e-12, f"relative error {rel_err(got, gw):.3g}"


def test_wgrad_slicing_covers_m_without_empty_slices():
    # AlexNet conv2 at batch 2 (the GPU test's shape) and batch 128, a tiny and a huge M.
    for M, K, cout in [(1458, 1600, 192), (93312, 1600, 192), (5, 27, 3), (1 << 24, 4608, 512)]:
        splits, rows = wgrad_slicing(M, K, cout, 132)
        assert rows % ROWS == 0 and 1 <= splits <= 64
        assert (splits - 1) * rows < M <= splits * rows, (M, splits, rows)
        assert splits * cout * K < (1 << 30)
    assert wgrad_slicing(1458, 1600, 192, 132)[0] > 1  # the GPU test runs several slices


# ---------------------------------------------------------------------------------------
# GPU tests
# ---------------------------------------------------------------------------------------
# cuDNN (the fallback for groups > 1) may pick Winograd/FFT algorithms whose fp32 error
# exceeds 1e-5 even with TF32 off; our fp32 kernels are held to REL_TOL (1e-5).
CUDNN_FP32_TOL = 1e-4


def _check_backward(conv_cuda_ops, cfg, dtype, tol):
    fwd, bwd = conv_cuda_ops
    x, w, b, args = _inputs(cfg, dtype)
    stride, padding, dilation, groups, activation = args
    out = fwd(x, w, b, *args)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    grad_dev = grad.to(device="cuda", dtype=dtype)
    gx, gw, gb = bwd(grad_dev, x, w, out, *args, b is not None, [True, True, True])
    # Reference: the mask from the op's own output, as the schema defines it.
    pre = grad_dev.double().cpu() * ((out > 0).cpu() if activation == "relu" else 1)
    x64 = x.double().cpu().requires_grad_(True)
    w64 = w.double().cpu().requires_grad_(True)
    y = F.conv2d(x64, w64, None, stride, padding, dilation, groups)
    rgx, rgw = torch.autograd.grad(y, (x64, w64), pre)
    assert gx.shape == x.shape and gw.shape == w.shape and gx.dtype == dtype and gw.dtype == dtype
    assert_close_rel(gx, rgx, dtype, "grad x", tol=tol)
    assert_close_rel(gw, rgw, dtype, "grad weight", tol=tol)
    if b is None:
        assert gb.shape == (0,)
    else:
        assert gb.shape == b.shape and gb.dtype == dtype
        assert_close_rel(gb, pre.sum((0, 2, 3)), dtype, "grad bias", tol=tol)
    return gx, gw, gb


# TF32 on: our fp32 kernels must ignore it (fp16/bf16 run cuDNN, which TF32 does not touch).
@pytest.mark.gpu
@pytest.mark.parametrize("tf32", [True], indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("index", range(0, len(CONFIGS), 3))
def test_backward_random_configs(conv_cuda_ops, tf32, dtype, index):
    _check_backward(conv_cuda_ops, CONFIGS[index], dtype, REL_TOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("tf32", [True], indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("layer", range(len(ALEXNET)))
def test_backward_alexnet_layers(conv_cuda_ops, tf32, dtype, layer):
    _check_backward(conv_cuda_ops, {**ALEXNET[layer], "channels_last": layer % 2 == 1}, dtype, REL_TOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("tf32", [False], indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("cfg", GROUPED)
def test_backward_grouped_fallback(conv_cuda_ops, tf32, dtype, cfg):
    tol = CUDNN_FP32_TOL if dtype == torch.float32 else REL_TOL[dtype]
    _check_backward(conv_cuda_ops, cfg, dtype, tol)


@pytest.mark.gpu
@pytest.mark.parametrize("tf32", [True], indirect=True)
def test_fp32_backward_is_deterministic(conv_cuda_ops, tf32):
    # AlexNet conv2's weight gradient runs in several M slices (wgrad_slicing): summed in a
    # fixed order, so two calls agree bit for bit.
    cfg = {**ALEXNET[1], "channels_last": True}
    first = _check_backward(conv_cuda_ops, cfg, torch.float32, REL_TOL[torch.float32])
    second = _check_backward(conv_cuda_ops, cfg, torch.float32, REL_TOL[torch.float32])
    for name, a, b in zip(("grad x", "grad weight", "grad bias"), first, second):
        assert torch.equal(a, b), name


MASKS = [[a, b, c] for a in (False, True) for b in (False, True) for c in (False, True)]


@pytest.mark.gpu
@pytest.mark.parametrize("tf32", [False], indirect=True)
@pytest.mark.parametrize("cfg", [ALEXNET[0], GROUPED[0], {**CONFIGS[1], "bias": False}])
def test_backward_output_mask(conv_cuda_ops, tf32, cfg):
    """Each gradient the mask asks for equals the full backward's; the others are (0,)."""
    fwd, bwd = conv_cuda_ops
    x, w, b, args = _inputs(cfg, torch.float32)
    out = fwd(x, w, b, *args)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to("cuda")
    full = bwd(grad, x, w, out, *args, b is not None, [True, True, True])
    ours = cfg.get("groups", 1) == 1
    for mask in MASKS:
        got = bwd(grad, x, w, out, *args, b is not None, mask)
        for name, asked, g, f in zip(("grad x", "grad weight", "grad bias"), mask, got, full):
            if asked and not (name == "grad bias" and b is None):
                assert g.shape == f.shape and g.stride() == f.stride(), (name, mask)
                if ours:  # each gradient's kernel is independent of the others
                    assert torch.equal(g, f), (name, mask)
                else:  # cuDNN may pick another algorithm for a masked call
                    assert_close_rel(g, f, torch.float32, f"{name} {mask}", tol=CUDNN_FP32_TOL)
            else:
                assert g.shape == (0,), (name, mask, tuple(g.shape))


@pytest.mark.gpu
def test_fp32_backward_degenerate_shapes(conv_cuda_ops):
    fwd, bwd = conv_cuda_ops
    b = torch.randn(4, device="cuda")
    # H = 0 with padding: every tap reads padding. No rows for the data gradient (no
    # launch), a zero weight gradient.
    x = torch.randn(2, 3, 0, 5, device="cuda")
    w = torch.randn(4, 3, 1, 1, device="cuda")
    args = ((1, 1), (1, 1), (1, 1), 1, "none")
    out = fwd(x, w, b, *args)
    assert out.shape == (2, 4, 2, 7)
    grad = torch.randn(out.shape, device="cuda")
    gx, gw, gb = bwd(grad, x, w, out, *args, True, [True, True, True])
    assert gx.shape == x.shape and gw.shape == w.shape and bool((gw == 0).all())
    torch.testing.assert_close(gb, grad.sum((0, 2, 3)))
    # C_in = 0: no reduction columns (K = 0); the output is the bias alone.
    x = torch.randn(2, 0, 5, 5, device="cuda")
    w = torch.randn(4, 0, 3, 3, device="cuda")
    args = ((1, 1), (0, 0), (1, 1), 1, "none")
    out = fwd(x, w, b, *args)
    torch.testing.assert_close(out, b.view(1, 4, 1, 1).expand(2, 4, 3, 3))
    gx, gw, gb = bwd(torch.ones_like(out), x, w, out, *args, True, [True, True, True])
    assert gx.shape == x.shape and gw.shape == w.shape
    torch.testing.assert_close(gb, torch.full((4,), 18.0, device="cuda"))
