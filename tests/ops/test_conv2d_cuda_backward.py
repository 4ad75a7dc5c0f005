"""The CUDA backend's backward of conv2d_bias_act (csrc/cuda/conv2d_backward.cu).

Two parts:
* the CPU emulation of the fp32 kernels' index arithmetic (conv2d_cuda_emulation.py: the
  data gradient as conv2d_simt_kernel with kDgrad, the split-M weight-gradient kernel with
  its slices and the host's sum over them) must equal autograd's gradients of F.conv2d in
  float64, every shared slot and partial element written exactly once;
* GPU tests (``@pytest.mark.gpu``) of ``torch.ops.pyowt.conv2d_bias_act_backward`` against a
  float64 CPU reference, by relative L2 error.
"""
import pytest
import torch
import torch.nn.functional as F

from ..utils import REL_TOL, assert_close_rel, rel_err
from .conv2d_cuda_emulation import WGRAD_ROWS, cdiv, emulate_dgrad, emulate_wgrad, wgrad_slicing
from .test_conv2d_cuda import ALEXNET, CONFIGS, DTYPE_IDS, DTYPES, EMU_CASES, GROUPED, _inputs


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
    m_per_split = {"one slice": cdiv(M, WGRAD_ROWS) * WGRAD_ROWS, "16 rows": WGRAD_ROWS, "24 rows": 24,
                   "host rule, 132 SMs": wgrad_slicing(M, K, w.shape[0], 132)[1]}[slicing]
    got = emulate_wgrad(x, grad_pre, tuple(w.shape), stride, padding, dilation, m_per_split)
    assert got.shape == gw.shape
    assert rel_err(got, gw) < 1e-12, f"relative error {rel_err(got, gw):.3g}"


def test_wgrad_slicing_covers_m_without_empty_slices():
    # AlexNet conv2 at batch 2 (the GPU test's shape) and batch 128, a tiny and a huge M.
    for M, K, cout in [(1458, 1600, 192), (93312, 1600, 192), (5, 27, 3), (1 << 24, 4608, 512)]:
        splits, rows = wgrad_slicing(M, K, cout, 132)
        assert rows % WGRAD_ROWS == 0 and 1 <= splits <= 64
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
