"""conv2d_bias_act on every backend that runs here, against a float64 reference.

The configurations come from a seeded RNG (``make_grid``) and ``test_grid_covers_ranges``
checks that they span what the op promises: stride 1-4, padding 0-3, dilation 1-2, kernels
1x1 to 11x11, odd H and W, batch 1-3, groups 1 and 2, bias or not, ReLU or identity,
NCHW and channels_last, and the three k walks of the Triton forward (flat, blocked, and
packed for RGB-like inputs of at most 4 channels). Shapes stay tiny so the
Triton interpreter gets through them in well under a minute.
"""
import random

import pytest
import torch
import torch.nn.functional as F

from pyowt import _extension
from pyowt.kernels import HAS_TRITON
from pyowt.ops import conv2d_bias_act
from pyowt.ops.conv2d import conv2d_bias_act_reference

from ..utils import assert_close_rel, fp32_precision

needs_ext = pytest.mark.skipif(not _extension.STATUS.loaded, reason="extension not built")

N_CONFIGS = 56


def _spread(rng, values, n):
    """``n`` draws that contain every value (shuffled repeats), so coverage is certain."""
    out = (list(values) * (n // len(values) + 1))[:n]
    rng.shuffle(out)
    return out


# The Triton forward's k walk a config forces (the k_walk fixture); "packed" applies to
# groups = 1 and at most 4 input channels, other configs fall back to the automatic choice.
WALKS = ("flat", "blocked", "packed")


def make_grid(seed=2024, n=N_CONFIGS):
    rng = random.Random(seed)
    strides = _spread(rng, [1, 2, 3, 4], n)
    pads = _spread(rng, [0, 1, 2, 3], n)
    dils = _spread(rng, [1, 2], n)
    # Large kernels are rare: each one costs the interpreter R*S loop iterations per tile.
    kernels = _spread(rng, [1, 1, 2, 3, 3, 3, 4, 5, 5, 7, 11, 1, 3, 2], n)
    groups = _spread(rng, [1, 1, 1, 2], n)
    grid = []
    for i in range(n):
        g = groups[i]
        k = kernels[i]
        r, s = (k, k) if rng.random() < 0.7 else (k, rng.randint(1, 5))
        p = pads[i]
        d = dils[i]
        ph, pw = p, rng.choice([p, rng.randint(0, 3)])
        dh, dw = d, rng.choice([d, 1])
        # The dilated kernel must fit in the padded input (H, W <= 13).
        if dh * (r - 1) + 1 > 13 + 2 * ph:
            dh = 1
        if dw * (s - 1) + 1 > 13 + 2 * pw:
            dw = 1
        h_min = max(1, dh * (r - 1) + 1 - 2 * ph)
        w_min = max(1, dw * (s - 1) + 1 - 2 * pw)
        big = r * s > 25
        h = rng.choice([v for v in range(h_min, 14) if v % 2 == 1 or v == h_min][: 3 if big else 8])
        w = rng.choice([v for v in range(w_min, 14) if v % 2 == 1 or v == w_min][: 3 if big else 8])
        grid.append(dict(
            batch=1 if big else rng.randint(1, 3),
            c_in=g * rng.randint(1, 5 // g), c_out=g * rng.randint(1, 5 // g), groups=g,
            h=h, w=w, kernel=(r, s), stride=(strides[i], rng.choice([strides[i], rng.randint(1, 4)])),
            padding=(ph, pw), dilation=(dh, dw), bias=rng.random() < 0.6,
            activation=rng.choice(["relu", "relu", None]),
            layout=rng.choice(["nchw", "channels_last"]), walk=WALKS[i % 3], seed=1000 + i,
        ))
    return grid


GRID = make_grid()
IDS = [f"c{i}" for i in range(len(GRID))]


def test_grid_covers_ranges():
    def seen(key):
        return {v for c in GRID for v in (c[key] if isinstance(c[key], tuple) else (c[key],))}

    assert len(GRID) >= 50
    assert seen("stride") == {1, 2, 3, 4}
    assert seen("padding") == {0, 1, 2, 3}
    assert seen("dilation") == {1, 2}
    assert {1, 11} <= seen("kernel") and len(seen("kernel")) >= 6
    assert seen("batch") == {1, 2, 3}
    assert seen("groups") == {1, 2}
    assert seen("bias") == {True, False}
    assert seen("activation") == {"relu", None}
    assert seen("layout") == {"nchw", "channels_last"}
    assert seen("walk") == set(WALKS)
    packed = [c for c in GRID if c["walk"] == "packed" and c["groups"] == 1 and c["c_in"] <= 4]
    assert len(packed) >= 8 and {c["c_in"] for c in packed} == {1, 2, 3, 4}
    assert any(c["h"] % 2 and c["w"] % 2 for c in GRID) and any(c["h"] != c["w"] for c in GRID)
    assert any(c["kernel"][0] != c["kernel"][1] for c in GRID)
    # Channel counts are never multiples of the 16-wide blocks: every tile is partial.
    assert max(c["c_in"] for c in GRID) <= 5 and len({c["c_out"] for c in GRID}) >= 4


def _make(cfg, dtype, device):
    g = torch.Generator().manual_seed(cfg["seed"])
    x = torch.randn(cfg["batch"], cfg["c_in"], cfg["h"], cfg["w"], generator=g, dtype=torch.float64)
    w = torch.randn(cfg["c_out"], cfg["c_in"] // cfg["groups"], *cfg["kernel"], generator=g,
                    dtype=torch.float64)
    b = torch.randn(cfg["c_out"], generator=g, dtype=torch.float64) if cfg["bias"] else None
    # Round to the tested dtype once, so the reference sees exactly the kernel's inputs.
    x, w = x.to(dtype).double(), w.to(dtype).double()
    b = None if b is None else b.to(dtype).double()
    xd = x.to(dtype).to(device)
    if cfg["layout"] == "channels_last":
        xd = xd.contiguous(memory_format=torch.channels_last)
    wd = w.to(dtype).to(device)
    bd = None if b is None else b.to(dtype).to(device)
    return (x, w, b), (xd, wd, bd)


def check_config(cfg, backend, dtype, device):
    (x64, w64, b64), (x, w, b) = _make(cfg, dtype, device)
    kw = dict(stride=cfg["stride"], padding=cfg["padding"], dilation=cfg["dilation"],
              groups=cfg["groups"], activation=cfg["activation"])
    leaves = [x64, w64] + ([b64] if b64 is not None else [])
    for t in leaves:
        t.requires_grad_(True)
    ref = F.conv2d(x64, w64, b64, kw["stride"], kw["padding"], kw["dilation"], kw["groups"])
    ref = F.relu(ref) if kw["activation"] == "relu" else ref
    gen = torch.Generator().manual_seed(cfg["seed"] + 7)
    weight_out = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    ref_grads = torch.autograd.grad((ref * weight_out).sum(), leaves)

    ours = [x, w] + ([b] if b is not None else [])
    for t in ours:
        t.requires_grad_(True)
    out = conv2d_bias_act(x, w, b, backend=backend, **kw)
    assert out.shape == ref.shape and out.dtype == dtype and out.device == x.device
    if cfg["layout"] == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last), "channels_last not kept"
    else:
        assert out.is_contiguous(), "NCHW output expected"
    grads = torch.autograd.grad((out.double() * weight_out.to(device)).sum(), ours)
    assert_close_rel(out, ref, dtype, "output")
    for name, got, want in zip(("grad x", "grad weight", "grad bias"), grads, ref_grads):
        assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
        assert_close_rel(got, want, dtype, name)


@pytest.fixture
def k_walk(monkeypatch, request):
    """Force the Triton forward's k walk of a config (flat, blocked or packed)."""
    def force(cfg):
        if HAS_TRITON:
            from pyowt.kernels import conv2d as kconv
            walk = cfg["walk"]
            monkeypatch.setattr(kconv, "FLAT_K_BELOW", 10**9 if walk == "flat" else 0)
            monkeypatch.setattr(kconv, "PACK_CHANNELS_AT_MOST", 4 if walk == "packed" else 0)
    return force


@pytest.mark.parametrize("cfg", GRID, ids=IDS)
@pytest.mark.parametrize("backend", ["cpu", "aten"])
def test_cpu_backends_fp32(backend, cfg):
    if backend == "cpu" and not _extension.STATUS.loaded:
        pytest.skip("extension not built")
    check_config(cfg, backend, torch.float32, "cpu")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cfg", GRID[::4], ids=IDS[::4])
@needs_ext
def test_cpu_backend_half(cfg, dtype):
    check_config(cfg, "cpu", dtype, "cpu")


@pytest.mark.parametrize("cfg", GRID, ids=IDS)
def test_triton_fp32(triton_device, k_walk, cfg):
    k_walk(cfg)
    check_config(cfg, "triton", torch.float32, triton_device)


@pytest.mark.parametrize("cfg", GRID[1::5], ids=IDS[1::5])
def test_triton_fp16(triton_device, k_walk, cfg):
    k_walk(cfg)
    check_config(cfg, "triton", torch.float16, triton_device)


# RGB first layers in the packed walk: AlexNet's 11x11 stride 4 and ResNet's 7x7 stride 2
# (scaled down), a dilated one with 4*S a multiple of the block (the row change lands exactly
# on a block edge), and channel counts 1-4 in one image layout or the other.
PACKED_CASES = [
    dict(batch=2, c_in=3, c_out=9, groups=1, h=27, w=23, kernel=(11, 11), stride=(4, 4),
         padding=(2, 2), dilation=(1, 1), bias=True, activation="relu", layout="channels_last"),
    dict(batch=1, c_in=3, c_out=5, groups=1, h=17, w=15, kernel=(7, 7), stride=(2, 2),
         padding=(3, 3), dilation=(1, 1), bias=False, activation="relu", layout="nchw"),
    dict(batch=2, c_in=4, c_out=6, groups=1, h=13, w=12, kernel=(3, 4), stride=(1, 2),
         padding=(2, 1), dilation=(2, 2), bias=True, activation=None, layout="channels_last"),
    dict(batch=3, c_in=1, c_out=7, groups=1, h=9, w=11, kernel=(5, 3), stride=(3, 1),
         padding=(0, 1), dilation=(1, 2), bias=True, activation="relu", layout="nchw"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("cfg", PACKED_CASES, ids=[f"p{i}" for i in range(len(PACKED_CASES))])
def test_triton_packed_walk(triton_device, k_walk, cfg, dtype):
    cfg = dict(cfg, walk="packed", seed=7000 + PACKED_CASES.index(cfg))
    k_walk(cfg)
    check_config(cfg, "triton", dtype, triton_device)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_packed_walk_refuses_what_it_cannot_pack():
    from pyowt.kernels import conv2d as kconv
    from pyowt.ops.conv2d import conv_shape

    x = torch.zeros(1, 6, 5, 5)
    w = torch.zeros(4, 6, 3, 3).contiguous(memory_format=torch.channels_last)
    shape = conv_shape(x.shape, w.shape, (1, 1), (0, 0), (1, 1), 1)
    with pytest.raises(ValueError, match="packed walk needs groups=1 and at most 4 input channels"):
        kconv.launch_conv2d_fwd(lambda k: k, x, w, None, torch.empty(1, 4, 3, 3), shape, True,
                                packed=True)


# Larger shapes for the GPU: many tiles, partial tiles, channel counts off the block sizes,
# the split-K reduction of the weight gradient, AlexNet-like first layers.
GPU_EXTRA = [
    dict(batch=3, c_in=3, c_out=64, groups=1, h=63, w=67, kernel=(11, 11), stride=(4, 4),
         padding=(2, 2), dilation=(1, 1), bias=True, activation="relu", layout="channels_last"),
    dict(batch=2, c_in=67, c_out=129, groups=1, h=27, w=25, kernel=(5, 5), stride=(1, 1),
         padding=(2, 2), dilation=(1, 1), bias=True, activation="relu", layout="channels_last"),
    dict(batch=4, c_in=96, c_out=130, groups=2, h=13, w=15, kernel=(3, 3), stride=(1, 2),
         padding=(1, 1), dilation=(2, 1), bias=False, activation=None, layout="nchw"),
    dict(batch=8, c_in=256, c_out=64, groups=1, h=14, w=14, kernel=(1, 1), stride=(1, 1),
         padding=(0, 0), dilation=(1, 1), bias=True, activation="relu", layout="channels_last"),
    # Channel counts that are multiples of 16: the Triton kernels' 16-byte vector loads
    # (alignment hints of 16) in the blocked and flat walks, unit and larger strides.
    dict(batch=2, c_in=64, c_out=96, groups=1, h=13, w=11, kernel=(3, 3), stride=(1, 1),
         padding=(1, 1), dilation=(1, 1), bias=True, activation="relu", layout="channels_last"),
    dict(batch=3, c_in=32, c_out=48, groups=1, h=15, w=14, kernel=(3, 3), stride=(2, 2),
         padding=(2, 2), dilation=(2, 2), bias=True, activation="relu", layout="nchw"),
    dict(batch=2, c_in=48, c_out=64, groups=1, h=12, w=13, kernel=(3, 3), stride=(2, 1),
         padding=(1, 1), dilation=(1, 1), bias=False, activation="relu", layout="channels_last"),
]
# (i + 2) % 3: the AlexNet-like first layer (GPU_EXTRA[0]) runs the packed walk.
GPU_GRID = GRID + [dict(c, walk=WALKS[(i + 2) % 3], seed=9000 + i) for i, c in enumerate(GPU_EXTRA)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cfg", GPU_GRID, ids=[f"g{i}" for i in range(len(GPU_GRID))])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_backends(backend, cfg, dtype, k_walk):
    k_walk(cfg)
    # The CUDA backend's cuDNN parts (its backward, grouped forwards) follow torch's TF32
    # settings for float32, which default to TF32 for convolutions: test them in IEEE.
    with fp32_precision(tf32=False):
        check_config(cfg, backend, dtype, "cuda")


def test_wgrad_split_k_matches_single_chunk(triton_device):
    """The split-K partial sums of the weight/bias gradients equal the one-chunk result."""
    from pyowt.ops.conv2d import conv_shape

    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 9, 7, generator=g).to(triton_device).contiguous(memory_format=torch.channels_last)
    w = torch.randn(5, 3, 3, 2, generator=g).to(triton_device)
    out = F.relu(F.conv2d(x, w, None, 1, 1)).contiguous(memory_format=torch.channels_last)
    dy = torch.randn(out.shape, generator=g).to(triton_device).contiguous(memory_format=torch.channels_last)
    shape = conv_shape(x.shape, w.shape, (1, 1), (1, 1), (1, 1), 1)
    results = [_wgrad(dy, out, x, w, shape, split=s) for s in (1, 4, 7)]
    for dw, db in results[1:]:
        torch.testing.assert_close(dw, results[0][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(db, results[0][1], rtol=1e-5, atol=1e-5)
    masked = torch.where(out > 0, dy, 0)
    torch.testing.assert_close(results[0][1], masked.sum(dim=(0, 2, 3)), rtol=1e-5, atol=1e-5)
    ref = torch.nn.grad.conv2d_weight(x.double(), w.shape, masked.double(), 1, 1)
    torch.testing.assert_close(results[1][0].double(), ref, rtol=1e-5, atol=1e-5)


def _wgrad(dy, out, x, w, shape, split, weight_format=torch.contiguous_format, dtype=None):
    """(grad_weight, grad_bias) from the Triton weight gradient, ``split`` M chunks, grad_weight
    in ``weight_format`` and ``dtype`` (x's by default), through a stand-in launch."""
    from pyowt.kernels.conv2d_backward import launch_conv2d_wgrad

    dtype = dtype or x.dtype
    grad_w = torch.full(w.shape, float("nan"), dtype=dtype, device=x.device).contiguous(memory_format=weight_format)
    grad_b = torch.full((w.shape[0],), float("nan"), dtype=dtype, device=x.device)
    launch_conv2d_wgrad(lambda k: k, dy, out, x, grad_w, grad_b, shape, True, split=split)
    return grad_w, grad_b


def test_wgrad_strided_dy_matches_dense(triton_device):
    """dy/out that are not dense NHWC (a view of wider rows) take the kernel's general
    pixel offsets (Y_DENSE off) and give the dense path's gradients."""
    from pyowt.kernels.conv2d_backward import nhwc_dense
    from pyowt.ops.conv2d import conv_shape

    g = torch.Generator().manual_seed(6)
    x = torch.randn(3, 4, 8, 6, generator=g).to(triton_device).contiguous(memory_format=torch.channels_last)
    w = torch.randn(5, 4, 3, 3, generator=g).to(triton_device)
    out = F.relu(F.conv2d(x, w, None, 1, 1)).contiguous(memory_format=torch.channels_last)
    dy = torch.randn(out.shape, generator=g).to(triton_device).contiguous(memory_format=torch.channels_last)

    def wider_rows(t):  # the same values in rows of 9 pixels, of which the view shows 6
        view = torch.zeros(3, 5, 8, 9, device=triton_device).contiguous(memory_format=torch.channels_last)[..., :6]
        return view.copy_(t)

    dy_strided, out_strided = wider_rows(dy), wider_rows(out)
    assert nhwc_dense(dy) and not nhwc_dense(dy_strided) and dy_strided.stride() == out_strided.stride()
    # One pixel per image: NCHW strides (3, 1, 1, 1), which torch also calls channels_last
    # contiguous, put image n at 3n, not at n * stride(3); NHWC strides (3, 1, 3, 3) do.
    one_pixel = torch.empty(2, 3, 1, 1)
    assert one_pixel.is_contiguous(memory_format=torch.channels_last) and not nhwc_dense(one_pixel)
    assert nhwc_dense(torch.empty_strided((2, 3, 1, 1), (3, 1, 3, 3))) and nhwc_dense(dy[:1, :, :1])
    shape = conv_shape(x.shape, w.shape, (1, 1), (1, 1), (1, 1), 1)
    dense = _wgrad(dy, out, x, w, shape, split=2)
    strided = _wgrad(dy_strided, out_strided, x, w, shape, split=2)
    torch.testing.assert_close(strided[0], dense[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(strided[1], dense[1], rtol=1e-6, atol=1e-6)
    ref = torch.nn.grad.conv2d_weight(x.double(), w.shape, torch.where(out > 0, dy, 0).double(), 1, 1)
    torch.testing.assert_close(dense[0].double(), ref, rtol=1e-5, atol=1e-5)


def test_triton_backward_skips_unneeded_gradients(triton_device):
    x = torch.randn(1, 3, 7, 7, device=triton_device)  # no grad, like a network's input
    w = torch.randn(4, 3, 3, 3, device=triton_device, requires_grad=True)
    b = torch.randn(4, device=triton_device, requires_grad=True)
    out = conv2d_bias_act(x, w, b, padding=1, backend="triton")
    gw, gb = torch.autograd.grad(out.sum(), [w, b])
    x64, w64, b64 = x.double(), w.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    ref = F.relu(F.conv2d(x64, w64, b64, padding=1))
    rw, rb = torch.autograd.grad(ref.sum(), [w64, b64])
    assert_close_rel(gw, rw, torch.float32, "grad weight")
    assert_close_rel(gb, rb, torch.float32, "grad bias")
    gx, gw, gb = torch.ops.pyowt.conv2d_bias_act_backward_triton(
        torch.ones_like(out), x, w.detach(), out.detach(), [1, 1], [1, 1], [1, 1], 1, "relu", True,
        [False, False, True])
    assert gx.shape == (0,) and gw.shape == (0,)
    assert_close_rel(gb, rb, torch.float32, "grad bias only")
    with pytest.raises(RuntimeError, match="output_mask must have 3 elements .*, got 4"):
        torch.ops.pyowt.conv2d_bias_act_backward_triton(
            torch.ones_like(out), x, w.detach(), out.detach(), [1, 1], [1, 1], [1, 1], 1, "relu",
            True, [False, False, True, True])


@pytest.mark.parametrize("backend", ["cpu", "aten", "triton"])
def test_empty_batch(backend):
    if backend == "cpu" and not _extension.STATUS.loaded:
        pytest.skip("extension not built")
    if backend == "triton":
        pytest.importorskip("triton")
        from pyowt.ops.backend import unavailable_reason
        if unavailable_reason("triton", torch.device("cpu")) is not None:
            pytest.skip("triton cannot run on CPU here")
    x = torch.randn(0, 3, 5, 5, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    out = conv2d_bias_act(x, w, b, backend=backend)
    assert out.shape == (0, 4, 3, 3)
    out.sum().backward()
    assert x.grad.shape == x.shape and torch.all(w.grad == 0) and torch.all(b.grad == 0)


def _samples(device, n=4):
    samples = []
    for cfg in GRID[:n]:
        _, (x, w, b) = _make(cfg, torch.float32, device)
        args = (x.requires_grad_(True), w.requires_grad_(True),
                None if b is None else b.requires_grad_(True),
                list(cfg["stride"]), list(cfg["padding"]), list(cfg["dilation"]), cfg["groups"],
                cfg["activation"] or "none")
        samples.append(args)
    return samples


@needs_ext
def test_opcheck_cpp_op():
    for args in _samples("cpu"):
        torch.library.opcheck(torch.ops.pyowt.conv2d_bias_act.default, args)
        out = torch.ops.pyowt.conv2d_bias_act(*args).detach()
        bwd = (torch.randn_like(out), args[0].detach(), args[1].detach(), out, *args[3:],
               args[2] is not None)
        # The full mask, and partial ones whose placeholders the fake kernel must match.
        for mask in ([True, True, True], [False, True, True], [True, False, False]):
            torch.library.opcheck(torch.ops.pyowt.conv2d_bias_act_backward.default, (*bwd, mask))


MASKS = [[a, b, c] for a in (False, True) for b in (False, True) for c in (False, True)]
MASK_IDS = ["".join("xwb"[i] if m[i] else "-" for i in range(3)) for m in MASKS]


@needs_ext
@pytest.mark.parametrize("mask", MASKS, ids=MASK_IDS)
@pytest.mark.parametrize("cfg", GRID[:6], ids=IDS[:6])
def test_cpp_backward_output_mask(cfg, mask):
    """Each gradient the mask asks for equals the full backward's; the others are (0,)."""
    _, (x, w, b) = _make(cfg, torch.float32, "cpu")
    args = (list(cfg["stride"]), list(cfg["padding"]), list(cfg["dilation"]), cfg["groups"],
            cfg["activation"] or "none", b is not None)
    out = torch.ops.pyowt.conv2d_bias_act(x, w, b, *args[:5])
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(cfg["seed"]))
    full = torch.ops.pyowt.conv2d_bias_act_backward(grad, x, w, out, *args, [True, True, True])
    got = torch.ops.pyowt.conv2d_bias_act_backward(grad, x, w, out, *args, mask)
    for name, asked, g, f in zip(("grad x", "grad weight", "grad bias"), mask, got, full):
        if asked and not (name == "grad bias" and b is None):
            assert g.shape == f.shape and g.stride() == f.stride(), name
            torch.testing.assert_close(g, f, rtol=1e-5, atol=1e-6, msg=name)
        else:
            assert g.shape == (0,), f"{name}: not asked for, got shape {tuple(g.shape)}"


@needs_ext
@pytest.mark.parametrize("mask", MASKS, ids=MASK_IDS)
def test_cpp_backward_output_mask_empty_batch(mask):
    x, w = torch.randn(0, 3, 5, 5), torch.randn(4, 3, 3, 3)
    out = torch.ops.pyowt.conv2d_bias_act(x, w, None, [1, 1], [0, 0], [1, 1], 1, "relu")
    gx, gw, gb = torch.ops.pyowt.conv2d_bias_act_backward(
        out, x, w, out, [1, 1], [0, 0], [1, 1], 1, "relu", True, mask)
    assert gx.shape == (x.shape if mask[0] else (0,))
    assert gw.shape == (w.shape if mask[1] else (0,)) and torch.all(gw == 0)
    assert gb.shape == ((4,) if mask[2] else (0,)) and torch.all(gb == 0)


@needs_ext
def test_cpp_autograd_input_gradient_only():
    """Frozen weight and bias: the backward asks the op for grad x alone, which stays exact."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 11, 9, generator=g).requires_grad_()
    w, b = torch.randn(5, 3, 3, 3, generator=g), torch.randn(5, generator=g)
    out = conv2d_bias_act(x, w, b, stride=2, padding=1, backend="cpu")
    gout = torch.randn(out.shape, generator=g)
    (gx,) = torch.autograd.grad(out, [x], gout)
    x64 = x.detach().double().requires_grad_()
    (rx,) = torch.autograd.grad(F.relu(F.conv2d(x64, w.double(), b.double(), 2, 1)), [x64],
                                gout.double())
    assert_close_rel(gx, rx, torch.float32, "grad x")


def test_opcheck_triton_op(triton_device):
    # Under the interpreter the aot-dispatch and compile checks cannot run (Inductor does
    # not compile Triton for CPU; see DESIGN.md); they run on a GPU.
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    if triton_device.type == "cuda":
        utils = utils + ("test_aot_dispatch_dynamic",)
    for args in _samples(triton_device, n=2):
        torch.library.opcheck(torch.ops.pyowt.conv2d_bias_act_triton.default, args, test_utils=utils)
        out = torch.ops.pyowt.conv2d_bias_act_triton(*args).detach()
        bwd = (torch.randn_like(out), args[0].detach(), args[1].detach(), out, *args[3:],
               args[2] is not None, [True, True, True])
        torch.library.opcheck(torch.ops.pyowt.conv2d_bias_act_backward_triton.default, bwd,
                              test_utils=("test_schema", "test_faketensor"))


class _SmallNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        from pyowt.nn import FusedConv2d
        self.c1 = FusedConv2d(3, 6, 3, stride=2, padding=1)
        self.c2 = FusedConv2d(6, 5, (3, 1), padding=(1, 0), dilation=(2, 1), bias=False, activation=None)

    def forward(self, x):
        return self.c2(self.c1(x)).mean(dim=(2, 3))


def test_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    model = _SmallNet()
    x = torch.randn(2, 3, 11, 9)
    eager = model(x)
    eager.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, eager)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, g)


def test_reference_is_relu_of_conv():
    x, w, b = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3), torch.randn(4)
    torch.testing.assert_close(conv2d_bias_act_reference(x, w, b, 1, 1), F.relu(F.conv2d(x, w, b, 1, 1)))
    torch.testing.assert_close(conv2d_bias_act(x, w, b, padding=1, activation=None), F.conv2d(x, w, b, 1, 1))


X, W = torch.randn(2, 4, 9, 9), torch.randn(6, 4, 3, 3)


@pytest.mark.parametrize(
    "args,kwargs,exc,match",
    [
        ((torch.randn(4, 9, 9), W), {}, ValueError, r"x must be 4-d .*got shape \(4, 9, 9\)"),
        ((X, torch.randn(6, 4, 3)), {}, ValueError, r"weight must be 4-d .*got shape \(6, 4, 3\)"),
        ((X, torch.randn(6, 3, 3, 3)), {}, ValueError, "weight has 3 input channels per group but x has C_in=4"),
        ((X, W.double()), {}, TypeError, "weight dtype torch.float64 differs from x dtype torch.float32"),
        ((X.int(), W), {}, TypeError, "x must be float32, float16 or bfloat16, got torch.int32"),
        ((X, W, torch.randn(5)), {}, ValueError, r"bias must have shape \(6,\), got \(5,\)"),
        ((X, W, torch.randn(6).half()), {}, TypeError, "bias dtype torch.float16 differs"),
        ((X, torch.randn(6, 2, 3, 3)), {"groups": 3}, ValueError, "groups=3 must be >= 1 and divide C_in=4 and C_out=6"),
        ((X, W), {"groups": 0}, ValueError, "groups=0"),
        ((X, torch.randn(6, 4, 12, 3)), {"padding": 1}, ValueError, r"dilated kernel \(12 along H\) is larger than the padded input \(9 \+ 2\*1 = 11\)"),
        ((X, W), {"dilation": (1, 5)}, ValueError, r"dilated kernel \(11 along W\)"),
        ((X, W), {"stride": 0}, ValueError, "stride must be >= 1 in both axes, got 0"),
        ((X, W), {"dilation": (1, 0)}, ValueError, r"dilation must be >= 1 in both axes, got \(1, 0\)"),
        ((X, W), {"padding": -1}, ValueError, "padding must be >= 0 in both axes, got -1"),
        ((X, W), {"stride": (1, 2, 3)}, TypeError, r"stride must be an int or a pair of ints, got \(1, 2, 3\)"),
        ((X, W), {"padding": 1.5}, TypeError, "padding must be an int or a pair of ints, got 1.5"),
        ((X, W), {"activation": "gelu"}, ValueError, "activation must be 'relu', 'none' or None, got 'gelu'"),
        ((X, W), {"backend": "tpu"}, ValueError, "backend='tpu' is not a backend"),
        ((X, W), {"backend": "cuda"}, ValueError, "backend 'cuda' needs CUDA tensors, got device cpu"),
        (([1.0], W), {}, TypeError, "x must be a torch.Tensor, got list"),
    ],
)
def test_bad_input_errors(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        conv2d_bias_act(*args, **kwargs)


def test_device_mismatch_is_named():
    meta_w = torch.randn(6, 4, 3, 3, device="meta")
    with pytest.raises(ValueError, match="weight is on meta but x is on cpu"):
        conv2d_bias_act(X, meta_w)


@needs_ext
def test_cpp_op_checks_its_arguments():
    op = torch.ops.pyowt.conv2d_bias_act
    std = ([1, 1], [0, 0], [1, 1], 1, "relu")
    with pytest.raises(RuntimeError, match="x must be 4-d"):
        op(torch.randn(4, 9, 9), W, None, *std)
    with pytest.raises(RuntimeError, match="weight has 3 input channels per group but x has C_in=4"):
        op(X, torch.randn(6, 3, 3, 3), None, *std)
    with pytest.raises(RuntimeError, match="groups=4 must divide C_in=4 and C_out=6"):
        op(X, torch.randn(6, 1, 3, 3), None, [1, 1], [0, 0], [1, 1], 4, "relu")
    with pytest.raises(RuntimeError, match=r"bias must have shape \(6,\)"):
        op(X, W, torch.randn(5), *std)
    with pytest.raises(RuntimeError, match="weight dtype Double differs from x dtype Float"):
        op(X, W.double(), None, *std)
    with pytest.raises(RuntimeError, match="stride must be >= 1"):
        op(X, W, None, [0, 1], [0, 0], [1, 1], 1, "relu")
    with pytest.raises(RuntimeError, match="padding must be >= 0"):
        op(X, W, None, [1, 1], [-1, 0], [1, 1], 1, "relu")
    with pytest.raises(RuntimeError, match="dilated kernel 13x3 is larger than the padded input 9x9"):
        op(X, W, None, [1, 1], [0, 0], [6, 1], 1, "relu")
    with pytest.raises(RuntimeError, match='activation must be "relu" or "none", got "tanh"'):
        op(X, W, None, [1, 1], [0, 0], [1, 1], 1, "tanh")
    out = op(X, W, None, *std)
    bwd = torch.ops.pyowt.conv2d_bias_act_backward
    all3 = [True, True, True]
    with pytest.raises(RuntimeError, match="grad_out shape"):
        bwd(out[:1], X, W, out, *std, False, all3)
    with pytest.raises(RuntimeError, match="out shape"):
        bwd(out, X, W, out[:, :3], *std, False, all3)
    bad_mask = (r"conv2d_bias_act_backward: output_mask must have 3 elements \(grad x, grad "
                r"weight, grad bias\), got 2: \[False, True\]")
    with pytest.raises(RuntimeError, match=bad_mask):
        bwd(out, X, W, out, *std, False, [False, True])
    with pytest.raises(RuntimeError, match=bad_mask):  # the fake kernel says the same
        with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
            fx, fw, fo = (mode.from_tensor(t) for t in (X, W, out))
            bwd(fo, fx, fw, fo, *std, False, [False, True])


@pytest.mark.parametrize("backend", ["cpu", "triton", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_weight_gradients_without_input_gradient(backend):
    """A first layer (input without grad) still gets exact weight and bias gradients."""
    from pyowt.ops.backend import unavailable_reason
    device = torch.device("cuda" if backend == "cuda" or (backend == "triton" and torch.cuda.is_available())
                          else "cpu")
    why = unavailable_reason(backend, device)
    if why is not None:
        pytest.skip(why)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 3, 11, 9, generator=g).to(device)
    w = torch.randn(5, 3, 3, 3, generator=g).to(device).requires_grad_()
    b = torch.randn(5, generator=g).to(device).requires_grad_()
    with fp32_precision(tf32=False):
        out = conv2d_bias_act(x, w, b, stride=2, padding=1, backend=backend)
        gout = torch.randn(out.shape, generator=g).to(device)
        gw, gb = torch.autograd.grad(out, [w, b], gout)
    w64, b64 = w.detach().cpu().double().requires_grad_(), b.detach().cpu().double().requires_grad_()
    ref = F.relu(F.conv2d(x.cpu().double(), w64, b64, 2, 1))
    rw, rb = torch.autograd.grad(ref, [w64, b64], gout.cpu().double())
    assert_close_rel(gw, rw, torch.float32, "grad weight")
    assert_close_rel(gb, rb, torch.float32, "grad bias")
