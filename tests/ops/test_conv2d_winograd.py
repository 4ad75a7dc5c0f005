"""The cpu backend's Winograd kernels: the F(2x2, 3x3) / F(2x2, 5x5) forward, which also
computes the input gradient (csrc/cpu/conv2d_winograd.cpp), and the F(r x r, 2x2) weight
gradient (csrc/cpu/conv2d_winograd_wgrad.cpp).

Every numeric test first asserts that the backend really picks Winograd for its shape, so
a change of the dispatch rules cannot turn these into tests of oneDNN. They need an
AVX-512F CPU (the kernel's only target) and skip elsewhere.
"""
import random

import pytest
import torch
import torch.nn.functional as F

from pyowt import _extension
from pyowt.ops import conv2d_bias_act

from ..utils import assert_close_rel, torch_threads

if not _extension.STATUS.loaded:
    pytest.skip("extension not built", allow_module_level=True)

from pyowt import _C  # noqa: E402

needs_avx512 = pytest.mark.skipif(not _C.cpu_winograd_enabled(),
                                  reason="Winograd needs an AVX-512F CPU (or was switched off)")


@pytest.fixture
def two_threads():
    """The dispatch rule counts tile blocks per thread: fix the thread count it sees."""
    with torch_threads(2):
        yield


def algorithm(x, w, stride=1, padding=1, dilation=1, groups=1):
    pair = lambda v: [v, v] if isinstance(v, int) else list(v)  # noqa: E731
    return _C.cpu_conv2d_algorithm(x, w, pair(stride), pair(padding), pair(dilation), groups)


def _taps_inside(size, pad, r, out):
    return sum(min(o - pad + r, size) - max(o - pad, 0) for o in range(out))


def winograd_expected(batch, c_in, c_out, h, w, r, ph, pw, threads=2):
    """The dispatch rule of csrc/cpu/conv2d.cpp (winograd_pays), restated."""
    h_out, w_out = h + 2 * ph - (r - 1), w + 2 * pw - (r - 1)
    tiles = ((h_out + 1) // 2) * ((w_out + 1) // 2)
    saving = (_taps_inside(h, ph, r, h_out) * _taps_inside(w, pw, r, w_out)
              / (tiles * (r + 1) ** 2))
    return (min(c_in, c_out) >= 16 and c_in * c_out >= (1024 if r == 5 else 512)
            and batch * c_out * h_out * w_out * c_in * r * r >= 2 ** 23
            and saving >= (1.8 if r == 5 else 1.3) and batch * tiles >= 2 * 32 * threads)


def make_configs(seed=7, n=20):
    """Shapes Winograd takes, 3x3 and 5x5, with channel counts that are multiples of
    neither 8 nor 16, odd and unequal H and W, padding 0 to r - 1, several images per
    tile block; padding up to r (a border of bias-only outputs)."""
    rng = random.Random(seed)
    configs = []
    while len(configs) < n:
        r = 5 if len(configs) % 3 == 1 else 3
        c_in, c_out = rng.randint(17, 47), rng.randint(17, 53)
        h, w = rng.randint(9, 31), rng.randint(9, 31)
        if rng.random() < 0.3:
            ph, pw = rng.randint(0, r), rng.randint(0, r - 1)
        else:
            ph = pw = rng.choice([0, r // 2, r // 2, r - 1])
        batch = rng.randint(1, 4)
        while not winograd_expected(batch, c_in, c_out, h, w, r, ph, pw) and batch < 16:
            batch += 1
        if not winograd_expected(batch, c_in, c_out, h, w, r, ph, pw):
            continue  # saving or channels too small for this draw
        configs.append(dict(batch=batch, c_in=c_in, c_out=c_out, h=h, w=w, kernel=r,
                            padding=(ph, pw), bias=len(configs) % 3 != 2,
                            activation=None if len(configs) % 4 == 3 else "relu",
                            sliced=len(configs) % 5 == 4, seed=100 + len(configs)))
    return configs


CONFIGS = make_configs()


def _inputs(cfg):
    g = torch.Generator().manual_seed(cfg["seed"])
    width = cfg["w"] + (3 if cfg["sliced"] else 0)
    x = torch.randn(cfg["batch"], cfg["c_in"], cfg["h"], width, generator=g)
    if cfg["sliced"]:  # a strided view: the backend copies it to NCHW first
        x = x[..., 1:1 + cfg["w"]]
    r = cfg["kernel"]
    w = torch.randn(cfg["c_out"], cfg["c_in"], r, r, generator=g) / (r * cfg["c_in"] ** 0.5)
    b = torch.randn(cfg["c_out"], generator=g) if cfg["bias"] else None
    return x, w, b


@needs_avx512
@pytest.mark.parametrize("cfg", CONFIGS, ids=[f"w{i}" for i in range(len(CONFIGS))])
def test_matches_float64_reference(two_threads, cfg):
    x, w, b = _inputs(cfg)
    assert algorithm(x, w, padding=cfg["padding"]) == "winograd", cfg
    leaves64 = [t.double().requires_grad_(True) for t in (x, w, b) if t is not None]
    pre = F.conv2d(leaves64[0], leaves64[1], leaves64[2] if b is not None else None,
                   padding=cfg["padding"])
    ref = F.relu(pre) if cfg["activation"] == "relu" else pre
    weight_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(cfg["seed"]),
                             dtype=torch.float64)
    # The ReLU has no derivative at 0: an output within float32 rounding of 0 may take
    # either side in any float32 kernel (one such flip moves grad x by ~4e-3 relative
    # here). The gradient test leaves those outputs out; the output test keeps them.
    weight_out[pre.detach().abs() < 1e-4] = 0
    ref_grads = torch.autograd.grad((ref * weight_out).sum(), leaves64)

    leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, b) if t is not None]
    out = conv2d_bias_act(leaves[0], leaves[1], leaves[2] if b is not None else None,
                          padding=cfg["padding"], activation=cfg["activation"], backend="cpu")
    assert out.shape == ref.shape and out.dtype == torch.float32 and out.is_contiguous()
    assert_close_rel(out, ref, torch.float32, "output")
    grads = torch.autograd.grad((out.double() * weight_out).sum(), leaves)
    for name, got, want in zip(("grad x", "grad weight", "grad bias"), grads, ref_grads):
        assert_close_rel(got, want, torch.float32, name)


def test_configs_cover_the_kernel_edges():
    assert any(c["c_out"] % 8 for c in CONFIGS) and any(c["c_in"] % 16 for c in CONFIGS)
    assert any((c["h"] + 2 * c["padding"][0]) % 2 == 1 for c in CONFIGS)  # odd H_out: half tiles
    assert {c["kernel"] for c in CONFIGS} == {3, 5}
    assert {p for c in CONFIGS if c["kernel"] == 3 for p in c["padding"]} == {0, 1, 2, 3}
    assert {p for c in CONFIGS if c["kernel"] == 5 for p in c["padding"]} >= {0, 2, 4}
    assert {c["bias"] for c in CONFIGS} == {True, False}
    assert {c["activation"] for c in CONFIGS} == {"relu", None}
    assert any(c["sliced"] for c in CONFIGS)


@needs_avx512
def test_same_bits_on_one_and_two_threads():
    """Each tile block is computed the same way whichever thread runs it."""
    x, w, b = _inputs(CONFIGS[0])
    outs = []
    for threads in (2, 1):
        with torch_threads(threads):
            assert algorithm(x, w, padding=CONFIGS[0]["padding"]) == "winograd"
            outs.append(conv2d_bias_act(x, w, b, padding=CONFIGS[0]["padding"], backend="cpu"))
    assert torch.equal(outs[0], outs[1])


@needs_avx512
def test_nan_is_never_swallowed(two_threads):
    """A NaN input reaches every output the direct convolution makes NaN (and, through the
    tile transforms, some neighbours): the fused ReLU must not turn it into 0."""
    x, w, b = _inputs(CONFIGS[1])
    x = x.clone()
    x[0, 3, 4, 5] = float("nan")
    x[-1, 0, -1, -1] = float("nan")
    assert algorithm(x, w, padding=CONFIGS[1]["padding"]) == "winograd"
    out = conv2d_bias_act(x, w, b, padding=CONFIGS[1]["padding"], backend="cpu")
    ref = F.relu(F.conv2d(x, w, b, padding=CONFIGS[1]["padding"]))
    assert ref.isnan().any()
    assert out.isnan()[ref.isnan()].all()
    # Outside the NaNs' tiles every value matches.
    finite = ~out.isnan()
    assert_close_rel(out[finite], ref[finite], torch.float32)


@needs_avx512
def test_dispatch_rules(two_threads):
    x = torch.randn(8, 192, 13, 13)
    w = torch.randn(384, 192, 3, 3)
    assert algorithm(x, w) == "winograd"  # AlexNet conv3, batch 8
    assert algorithm(x[:1], w) == "onednn"  # 49 tiles: too few for the weight transform
    assert algorithm(x.contiguous(memory_format=torch.channels_last), w) == "onednn"
    assert algorithm(x, w, stride=2) == "onednn"
    assert algorithm(x, w, dilation=2, padding=2) == "onednn"
    assert algorithm(x.half(), w.half()) != "winograd"
    assert algorithm(x.bfloat16(), w.bfloat16()) != "winograd"
    assert algorithm(torch.randn(8, 16, 56, 56), torch.randn(16, 16, 3, 3)) == "onednn"
    assert algorithm(x, torch.randn(384, 192, 5, 5), padding=2) == "winograd"
    assert algorithm(x, torch.randn(384, 192, 7, 7), padding=3) == "onednn"
    assert algorithm(x, torch.randn(384, 192, 3, 5), padding=2) == "onednn"
    # 5x5 on 9x9 with padding 2: the direct convolution skips a quarter of the taps.
    assert algorithm(torch.randn(8, 64, 9, 9), torch.randn(64, 64, 5, 5), padding=2) == "onednn"
    assert algorithm(torch.randn(8, 64, 27, 27), torch.randn(192, 64, 5, 5), padding=2) == "winograd"
    assert algorithm(x[:, :, :3, :3], w, padding=0) == "aten"  # below the fused threshold
    # 3x3 and 5x5 outputs waste 44% / 31% of their 2x2 tiles' outputs; 7x7 23%.
    assert algorithm(torch.randn(32, 192, 3, 3), w) == "onednn"
    assert algorithm(torch.randn(8, 192, 5, 5), w) == "onednn"
    assert algorithm(torch.randn(8, 192, 7, 7), w) == "winograd"
    before = _C.set_cpu_winograd_enabled(False)
    try:
        assert algorithm(x, w) == "onednn"
    finally:
        _C.set_cpu_winograd_enabled(before)
    assert algorithm(x, w) == "winograd"


@needs_avx512
@pytest.mark.parametrize("kernel, padding", [(3, 1), (3, 0), (3, 2), (5, 2), (5, 1), (5, 4)])
def test_input_gradient_runs_the_winograd_forward(two_threads, kernel, padding):
    """The backward's input gradient of a stride-1 r x r layer is the convolution of the
    masked grad_out with the flipped, transposed weight (padding r - 1 - p), computed by the
    same Winograd kernel: bit for bit what that forward gives."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 40, 19, 23, generator=g, requires_grad=True)
    w = torch.randn(36, 40, kernel, kernel, generator=g) / (4 * kernel)
    b = torch.randn(36, generator=g)
    out = conv2d_bias_act(x, w, b, padding=padding, backend="cpu")
    grad_out = torch.randn(out.shape, generator=g)
    (grad_x,) = torch.autograd.grad(out, x, grad_out)
    masked = torch.where(out > 0, grad_out, torch.zeros(()))
    w_t = w.flip(2, 3).transpose(0, 1).contiguous()
    pad_t = kernel - 1 - padding
    assert algorithm(masked, w_t, padding=pad_t) == "winograd"
    expected = conv2d_bias_act(masked, w_t, None, padding=pad_t, activation=None, backend="cpu")
    assert torch.equal(grad_x, expected)
    ref = torch.nn.grad.conv2d_input(x.shape, w.double(), masked.double(), padding=padding)
    assert_close_rel(grad_x, ref, torch.float32, "grad x")


@needs_avx512
@pytest.mark.parametrize("kernel, padding, batch", [(3, 1, 4), (5, 2, 3), (3, 0, 9), (5, 4, 2)])
def test_weight_gradient_runs_winograd(two_threads, kernel, padding, batch):
    """The backward's weight gradient of a layer the forward runs by Winograd is the Winograd
    weight gradient (bit for bit), accurate against float64, across several tile chunks
    (31x29 images: 240 tiles each, chunks of ~400-1000 tiles at these channel counts)."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(batch, 45, 31, 29, generator=g)
    w = (torch.randn(51, 45, kernel, kernel, generator=g) / (kernel * 7)).requires_grad_(True)
    b = torch.randn(51, generator=g).requires_grad_(True)
    assert algorithm(x, w, padding=padding) == "winograd"
    out = conv2d_bias_act(x, w, b, padding=padding, backend="cpu")
    grad_out = torch.randn(out.shape, generator=g)
    grad_w, grad_b = torch.autograd.grad(out, (w, b), grad_out)
    masked = torch.where(out > 0, grad_out, torch.zeros(()))
    assert torch.equal(grad_w, _C.winograd_conv2d_weight_grad(x, masked, kernel, [padding, padding]))
    ref_w = torch.nn.grad.conv2d_weight(x.double(), w.shape, masked.double(), padding=padding)
    assert_close_rel(grad_w, ref_w, torch.float32, "grad weight")
    assert_close_rel(grad_b, masked.double().sum((0, 2, 3)), torch.float32, "grad bias")


@needs_avx512
@pytest.mark.parametrize("kernel", [3, 5])
def test_opcheck_on_winograd_shapes(two_threads, kernel):
    """Schema, fake kernel (strides included), autograd registration and AOT dispatch of the
    C++ ops on shapes whose forward and backward run the Winograd kernels."""
    g = torch.Generator().manual_seed(13)
    x = torch.randn(2, 33, 24, 26, generator=g, requires_grad=True)
    w = (torch.randn(40, 33, kernel, kernel, generator=g) / 30).requires_grad_(True)
    b = torch.randn(40, generator=g, requires_grad=True)
    pad = kernel // 2
    assert algorithm(x.detach(), w.detach(), padding=pad) == "winograd"
    args = (x, w, b, [1, 1], [pad, pad], [1, 1], 1, "relu")
    torch.library.opcheck(torch.ops.pyowt.conv2d_bias_act.default, args)
    out = torch.ops.pyowt.conv2d_bias_act(*args).detach()
    bwd = (torch.randn(out.shape, generator=g), x.detach(), w.detach(), out, *args[3:], True)
    for mask in ([True, True, True], [False, True, True], [True, False, False], [False, False, True]):
        torch.library.opcheck(torch.ops.pyowt.conv2d_bias_act_backward.default, (*bwd, mask))
