"""The CUDA backend of conv2d_bias_act (csrc/cuda/conv2d*.cu[h]), forward.

Two parts:
* the CPU emulation of the kernels' exact index arithmetic (conv2d_cuda_emulation.py: every
  tensor-core tile and loader, the wgmma tiles' swizzled stages as their descriptors read
  them and their accumulator layout, the SIMT kernel, the cp.async pipeline's schedule)
  must equal F.conv2d in float64, every shared slot and output element written exactly once;
* GPU tests (``@pytest.mark.gpu``) of ``torch.ops.pyowt.conv2d_bias_act`` against a float64
  CPU reference, by relative L2 error.
The backward's kernels and GPU tests: test_conv2d_cuda_backward.py.
"""
import math
import random
import warnings

import pytest
import torch
import torch.nn.functional as F

from ..utils import assert_close_rel, rel_err
from .conftest import wgmma_tiles_usable
from .conv2d_cuda_emulation import emulate_simt, emulate_tc, emulate_tc_vector_pipeline


def _reference(x, weight, bias, stride, padding, dilation, groups, activation):
    out = F.conv2d(x.double().cpu(), weight.double().cpu(), None if bias is None else bias.double().cpu(),
                   stride, padding, dilation, groups)
    return F.relu(out) if activation == "relu" else out


# (N, C_in, H, W, C_out, R, S, stride, padding, dilation): K tails, several M and C_out
# blocks, image edges, 1x1, non-square kernels and strides.
EMU_CASES = [
    (2, 8, 9, 7, 70, 3, 3, (1, 1), (1, 1), (1, 1)),
    (1, 3, 13, 11, 5, 5, 3, (2, 1), (2, 0), (1, 2)),
    (3, 16, 6, 5, 9, 1, 1, (1, 2), (0, 1), (1, 1)),
    (1, 3, 15, 15, 66, 7, 7, (3, 3), (3, 2), (1, 1)),
    (2, 24, 5, 7, 130, 2, 3, (1, 1), (0, 1), (2, 1)),
    (1, 1, 12, 12, 3, 11, 11, (4, 4), (2, 2), (1, 1)),
]


@pytest.mark.parametrize("nhwc_out", [False, True])
@pytest.mark.parametrize("case", EMU_CASES)
def test_emulated_kernels_match_conv2d(case, nhwc_out, one_thread):
    n, c, h, w_, co, r, s, stride, padding, dilation = case
    g = torch.Generator().manual_seed(hash(case) % 1000)
    x = torch.randn(n, c, h, w_, generator=g, dtype=torch.float64)
    w = torch.randn(co, c, r, s, generator=g, dtype=torch.float64)
    b = torch.randn(co, generator=g, dtype=torch.float64)
    for relu, bias in ((True, b), (False, None)):
        ref = _reference(x, w, bias, stride, padding, dilation, 1, "relu" if relu else "none")
        runs = {"simt": emulate_simt(x, w, bias, stride, padding, dilation, relu, nhwc_out)}
        for bn, bk in ((64, 32), (128, 32), (128, 64), (96, 64)):
            if bk == 32:
                runs[f"tc 128x{bn}x{bk} scalar A"] = emulate_tc(x, w, bias, stride, padding, dilation, relu,
                                                                nhwc_out, False, bn, bk)
            if c % 8 == 0:
                runs[f"tc 128x{bn}x{bk} vector A"] = emulate_tc(x, w, bias, stride, padding, dilation, relu,
                                                                nhwc_out, True, bn, bk)
        if c % 8 == 0:
            for bn in (64, 96, 128):
                runs[f"wgmma 128x{bn}x64"] = emulate_tc(x, w, bias, stride, padding, dilation, relu,
                                                        nhwc_out, True, bn, 64, wgmma=True)
        for name, out in runs.items():
            assert out.shape == ref.shape, name
            assert rel_err(out, ref) < 1e-12, f"{name}: relative error {rel_err(out, ref):.3g}"


@pytest.mark.parametrize("num_kt", [0, 1, 2, 3, 4, 7, 54])
def test_tc_vector_pipeline_schedule(num_kt):
    assert emulate_tc_vector_pipeline(num_kt) == list(range(num_kt))


# ---------------------------------------------------------------------------------------
# GPU tests of torch.ops.pyowt.conv2d_bias_act{,_backward} on CUDA tensors
# ---------------------------------------------------------------------------------------
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _random_configs(count, seed):
    """count seeded configs: stride 1-4, padding 0-3, dilation 1-2, kernels 1x1..11x11."""
    rng = random.Random(seed)
    configs = []
    for _ in range(count):
        r = rng.randint(1, 11)
        s = r if rng.random() < 0.6 else rng.randint(1, 11)
        stride = (rng.randint(1, 4), rng.randint(1, 4))
        padding = (rng.randint(0, 3), rng.randint(0, 3))
        dilation = (rng.randint(1, 2), rng.randint(1, 2))
        h = max(1, dilation[0] * (r - 1) + 1 - 2 * padding[0]) + rng.randint(0, 24)
        w = max(1, dilation[1] * (s - 1) + 1 - 2 * padding[1]) + rng.randint(0, 24)
        configs.append(dict(
            n=rng.randint(1, 3), c=rng.choice([1, 2, 3, 5, 7, 8, 13, 16, 24, 32, 48, 64]),
            h=h, w=w, cout=rng.choice([1, 3, 7, 16, 33, 64, 65, 96, 130]), r=r, s=s,
            stride=stride, padding=padding, dilation=dilation, groups=1,
            bias=rng.random() < 0.7, activation=rng.choice(["relu", "none"]),
            channels_last=rng.random() < 0.5, seed=rng.randrange(1 << 30)))
    return configs


CONFIGS = _random_configs(60, seed=2024)
# torchvision AlexNet's five conv layers at batch 2 (input 224x224).
ALEXNET = [
    dict(n=2, c=3, h=224, w=224, cout=64, r=11, s=11, stride=(4, 4), padding=(2, 2)),
    dict(n=2, c=64, h=27, w=27, cout=192, r=5, s=5, stride=(1, 1), padding=(2, 2)),
    dict(n=2, c=192, h=13, w=13, cout=384, r=3, s=3, stride=(1, 1), padding=(1, 1)),
    dict(n=2, c=384, h=13, w=13, cout=256, r=3, s=3, stride=(1, 1), padding=(1, 1)),
    dict(n=2, c=256, h=13, w=13, cout=256, r=3, s=3, stride=(1, 1), padding=(1, 1)),
]
GROUPED = [
    dict(n=2, c=6, h=11, w=9, cout=4, r=3, s=3, stride=(1, 2), padding=(1, 0), groups=2),
    dict(n=1, c=16, h=10, w=10, cout=16, r=3, s=3, stride=(1, 1), padding=(1, 1), groups=16),
]


def _full(cfg):
    base = dict(dilation=(1, 1), groups=1, bias=True, activation="relu", channels_last=False, seed=0)
    return {**base, **cfg}


def _inputs(cfg, dtype, seed=None):
    cfg = _full(cfg)
    g = torch.Generator().manual_seed(cfg["seed"] if seed is None else seed)
    cin = cfg["c"] // cfg["groups"]
    x = torch.randn(cfg["n"], cfg["c"], cfg["h"], cfg["w"], generator=g, dtype=torch.float64)
    w = torch.randn(cfg["cout"], cin, cfg["r"], cfg["s"], generator=g, dtype=torch.float64)
    w /= math.sqrt(cin * cfg["r"] * cfg["s"])
    b = torch.randn(cfg["cout"], generator=g, dtype=torch.float64) if cfg["bias"] else None
    x = x.to(device="cuda", dtype=dtype)
    if cfg["channels_last"]:
        x = x.contiguous(memory_format=torch.channels_last)
    w = w.to(device="cuda", dtype=dtype)
    b = None if b is None else b.to(device="cuda", dtype=dtype)
    args = (cfg["stride"], cfg["padding"], cfg["dilation"], cfg["groups"], cfg["activation"])
    return x, w, b, args


def _check_forward(fwd, x, w, b, args, tol):
    out = fwd(x, w, b, *args)
    ref = _reference(x, w, b, *args)
    assert out.shape == ref.shape and out.dtype == x.dtype and out.device == x.device
    cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    fmt = torch.channels_last if cl else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt), f"output not in x's memory format {fmt}"
    assert torch.isfinite(out).all(), "non-finite output (unwritten or overflowed elements)"
    assert_close_rel(out, ref, x.dtype, "output", tol=tol)
    return out


@pytest.fixture
def tile(request, monkeypatch):
    """Force the tensor-core kernel's tile shape (PYOWT_CUDA_CONV_TILE) for the test; the
    wgmma tiles only where they can run (an sm_90 GPU, an sm_90a build)."""
    if request.param.startswith("wgmma") and not wgmma_tiles_usable():
        pytest.skip("the wgmma tiles need an sm_90 GPU and an extension built for 9.0a")
    monkeypatch.setenv("PYOWT_CUDA_CONV_TILE", request.param)
    return request.param


# fp32 runs the SIMT kernel (no tile choice); each 16-bit dtype runs every tile shape
# (the K-64 ones only where the A operand takes the vector loader: C_in % 8 == 0; the
# others run as the K-32 WMMA tile of their width).
WMMA_TILES = ("128x64x32", "128x128x32", "128x128x64", "128x96x64")
WGMMA_TILES = ("wgmma128x64x64", "wgmma128x96x64", "wgmma128x128x64")
TILES = WMMA_TILES + WGMMA_TILES
DTYPE_TILES = [(torch.float32, "auto")] + [(d, t) for d in DTYPES[1:] for t in TILES]
DTYPE_TILE_IDS = [f"{DTYPE_IDS[d]}-{t}" for d, t in DTYPE_TILES]


@pytest.mark.gpu
@pytest.mark.parametrize("tf32", [True], indirect=True)  # our fp32 kernel must ignore TF32
@pytest.mark.parametrize("dtype,tile", DTYPE_TILES, ids=DTYPE_TILE_IDS, indirect=["tile"])
@pytest.mark.parametrize("index", range(len(CONFIGS)))
def test_forward_random_configs(conv_cuda_ops, tf32, dtype, tile, index):
    if tile in WGMMA_TILES and CONFIGS[index]["c"] % 8:
        pytest.skip("C_in % 8 != 0: the scalar loader runs a wgmma request as a WMMA K-32 tile, "
                    "which this grid tests under its own name")
    _check_forward(conv_cuda_ops[0], *_inputs(CONFIGS[index], dtype), tol=None)


@pytest.mark.gpu
@pytest.mark.parametrize("tf32", [True], indirect=True)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype,tile", DTYPE_TILES, ids=DTYPE_TILE_IDS, indirect=["tile"])
@pytest.mark.parametrize("layer", range(len(ALEXNET)))
def test_forward_alexnet_layers(conv_cuda_ops, tf32, dtype, tile, layer, channels_last):
    cfg = {**ALEXNET[layer], "channels_last": channels_last, "seed": layer}
    _check_forward(conv_cuda_ops[0], *_inputs(cfg, dtype), tol=None)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES[1:], ids=DTYPE_IDS.get)
def test_tile_shapes_agree_bitwise_and_auto_picks_one(conv_cuda_ops, dtype, monkeypatch):
    # The WMMA shapes sum each output's k in the same order (k16 slices in sequence, the same
    # fragments), so they agree bit for bit; the wgmma shapes (another instruction, whose
    # internal summation may round differently) agree with them to 16-bit rounding; "auto"
    # (timed on the first call, cached after) returns one of them on every call and never
    # finds a tile disagreeing with 128x64x32 (it would warn). ALEXNET[0] (C_in = 3) takes
    # the scalar loader, which runs the K-64 shapes as K-32 WMMA ones.
    tiles = TILES if wgmma_tiles_usable() else WMMA_TILES
    cases = [{**ALEXNET[2], "channels_last": True}, {**ALEXNET[1], "channels_last": False},
             {**CONFIGS[4], "channels_last": True}, {**ALEXNET[0], "channels_last": True}]
    for cfg in cases:
        x, w, b, args = _inputs(cfg, dtype)
        outs = {}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for t in tiles + ("auto", "auto"):
                monkeypatch.setenv("PYOWT_CUDA_CONV_TILE", t)
                outs.setdefault(t, []).append(conv_cuda_ops[0](x, w, b, *args))
        assert not [str(w.message) for w in caught if "differs from" in str(w.message)], cfg
        for t in WMMA_TILES[1:]:
            assert torch.equal(outs[t][0], outs[WMMA_TILES[0]][0]), (t, cfg)
        for t in tiles[len(WMMA_TILES):]:
            assert_close_rel(outs[t][0], outs[WMMA_TILES[0]][0], dtype, f"{t} vs 128x64x32, {cfg}")
        picked = [t for t in tiles if torch.equal(outs["auto"][0], outs[t][0])]
        assert picked and torch.equal(outs["auto"][1], outs["auto"][0]), cfg
    monkeypatch.setenv("PYOWT_CUDA_CONV_TILE", "256x64x32")
    with pytest.raises(RuntimeError, match=r'PYOWT_CUDA_CONV_TILE must be one of "auto", "128x64x32", '
                                           r'"128x128x32", "128x128x64", "128x96x64", "wgmma128x64x64", '
                                           r'"wgmma128x96x64", "wgmma128x128x64", got "256x64x32"'):
        conv_cuda_ops[0](x, w, b, *args)


@pytest.mark.gpu
def test_bad_wgmma_switch(conv_cuda_ops, monkeypatch):
    x, w, b, args = _inputs({**ALEXNET[2], "channels_last": True}, torch.bfloat16)
    monkeypatch.setenv("PYOWT_CUDA_CONV_WGMMA", "yes")
    with pytest.raises(RuntimeError, match=r'PYOWT_CUDA_CONV_WGMMA must be "0" or "1", got "yes"'):
        conv_cuda_ops[0](x, w, b, *args)


@pytest.mark.gpu
def test_forced_wgmma_tile_needs_sm90a(conv_cuda_ops, monkeypatch):
    if wgmma_tiles_usable():
        pytest.skip("the wgmma tiles can run here (the other tests run them)")
    x, w, b, args = _inputs({**ALEXNET[2], "channels_last": True}, torch.bfloat16)
    monkeypatch.setenv("PYOWT_CUDA_CONV_TILE", "wgmma128x128x64")
    with pytest.raises(RuntimeError, match=r"wgmma128x128x64 needs an sm_90 GPU \(this one is sm_\d+\) "
                                           r"and an extension built with 9.0a"):
        conv_cuda_ops[0](x, w, b, *args)


@pytest.mark.gpu
@pytest.mark.parametrize("tf32", [False], indirect=True)  # the fallback is cuDNN
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("cfg", GROUPED)
def test_forward_grouped_fallback(conv_cuda_ops, tf32, dtype, cfg):
    _check_forward(conv_cuda_ops[0], *_inputs({**cfg, "channels_last": True}, dtype), tol=None)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_output_fully_written(conv_cuda_ops, dtype):
    # NaN-filled memory handed back by the caching allocator, and a second run on fresh
    # inputs: any element the kernel skips shows up as NaN or as the previous run's value.
    for layout in (False, True):
        cfg = dict(n=3, c=16, h=19, w=17, cout=70, r=3, s=3, stride=(1, 1), padding=(1, 1),
                   channels_last=layout, activation="none")
        for trial in range(2):
            x, w, b, args = _inputs(cfg, dtype, seed=10 + trial)
            poison = torch.full((3, 70, 19, 17), float("nan"), device="cuda", dtype=dtype)
            del poison
            out = _check_forward(conv_cuda_ops[0], x, w, b, args, tol=None)
            del out


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_misaligned_channels_last_tensors(conv_cuda_ops, dtype):
    # C_in % 8 == 0 and K % 8 == 0, but x and weight start 2 or 4 bytes off a 16-byte
    # boundary: the 16-byte cp.async path must not read them as they are (nor the
    # epilogue's vector bias load a misaligned bias).
    n, c, h, w_, cout = 2, 16, 9, 11, 24
    flat = torch.randn(n * h * w_ * c + 1, device="cuda").to(dtype)
    x = flat[1:].view(n, h, w_, c).permute(0, 3, 1, 2)
    flat_w = (torch.randn(cout * 9 * c + 1, device="cuda") / 12).to(dtype)
    weight = flat_w[1:].view(cout, 3, 3, c).permute(0, 3, 1, 2)
    for t in (x, weight):
        assert t.is_contiguous(memory_format=torch.channels_last) and t.data_ptr() % 16 != 0
    _check_forward(conv_cuda_ops[0], x, weight, None, ((1, 1), (1, 1), (1, 1), 1, "relu"), tol=None)
    # A bias 2 bytes off: the NHWC epilogue's 16-byte stores (C_out % 8 == 0) with scalar
    # bias loads.
    bias = torch.randn(cout + 1, device="cuda").to(dtype)[1:]
    assert bias.data_ptr() % 16 != 0
    _check_forward(conv_cuda_ops[0], x, weight, bias, ((1, 1), (1, 1), (1, 1), 1, "relu"), tol=None)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_strided_input_and_empty_batch(conv_cuda_ops, dtype):
    x = torch.randn(2, 5, 13, 11, device="cuda").to(dtype).transpose(2, 3)  # neither format
    w = torch.randn(7, 5, 3, 2, device="cuda").to(dtype)
    _check_forward(conv_cuda_ops[0], x, w, torch.randn(7, device="cuda").to(dtype),
                   ((2, 1), (1, 0), (1, 2), 1, "relu"), tol=None)
    out = conv_cuda_ops[0](x[:0], w, None, (1, 1), (0, 0), (1, 1), 1, "relu")
    assert out.shape == (0, 7, 9, 12)


def _bad(**over):
    x = torch.randn(2, 4, 9, 9, device="cuda")
    base = dict(x=x, weight=torch.randn(6, 4, 3, 3, device="cuda"), bias=torch.randn(6, device="cuda"),
                stride=[1, 1], padding=[0, 0], dilation=[1, 1], groups=1, activation="relu")
    base.update(over)
    return tuple(base.values())


@pytest.mark.gpu
def test_forward_argument_errors(conv_cuda_ops):
    fwd, bwd = conv_cuda_ops
    cases = [
        (dict(x=torch.randn(4, 9, 9, device="cuda")), "x must be 4-d"),
        (dict(weight=torch.randn(6, 4, 3, 3, device="cuda", dtype=torch.float16)),
         "weight dtype Half differs from x dtype Float"),
        (dict(weight=torch.randn(6, 4, 3, 3)), "weight is on cpu but x is on cuda"),
        (dict(weight=torch.randn(6, 3, 3, 3, device="cuda")), "weight has 3 input channels per group"),
        (dict(groups=3), "groups=3 must divide the 4 input channels"),
        (dict(weight=torch.randn(6, 4, 12, 3, device="cuda")), "larger than the padded input 9x9"),
        (dict(stride=[0, 1]), "stride must be positive"),
        (dict(dilation=[1, 0]), "dilation must be positive"),
        (dict(padding=[-1, 0]), "padding must be non-negative"),
        (dict(activation="gelu"), 'activation must be "relu" or "none", got "gelu"'),
        (dict(bias=torch.randn(5, device="cuda")), r"bias must have shape \(6,\)"),
        (dict(x=torch.randint(0, 3, (2, 4, 9, 9), device="cuda")), "x must be float32, float16 or bfloat16"),
    ]
    for over, match in cases:
        with pytest.raises(RuntimeError, match=match):
            fwd(*_bad(**over))
    x, w, b, stride, padding, dilation, groups, act = _bad()
    with pytest.raises(RuntimeError, match="grad_out must have the forward output's shape"):
        bwd(torch.randn(2, 6, 7, 6, device="cuda"), x, w, torch.randn(2, 6, 7, 7, device="cuda"),
            stride, padding, dilation, groups, act, True, [True, True, True])
    y = torch.randn(2, 6, 7, 7, device="cuda")
    with pytest.raises(RuntimeError, match=r"output_mask must have 3 elements \(grad x, grad weight, "
                                           r"grad bias\), got 1: \[True\]"):
        bwd(y, x, w, y, stride, padding, dilation, groups, act, True, [True])
