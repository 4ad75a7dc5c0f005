"""Triton forward kernel of out = act(conv2d(x, weight) + bias): an implicit GEMM.

The convolution is the GEMM ``out[m, n] = sum_k A[m, k] * B[k, n]`` with
``m = (image, oh, ow)`` over ``M = N * H_out * W_out``, ``n`` the output channel
(``C_out / groups`` per group) and ``k = (r, s, c)`` over ``K = R * S * C_in / groups`` with
the input channel innermost. ``A`` is never materialized: each tile of it is gathered from
the NHWC input (``x`` in channels_last memory, so a run of ``c`` is contiguous), with
out-of-image taps (the padding) masked to zero. ``B`` is the weight in ``(C_out, R, S, C_in)``
memory order (weight.contiguous(memory_format=torch.channels_last)), a plain row-major
``(C_out, K)`` matrix. Bias and ReLU run in the epilogue on the float32 accumulator, and
the store goes through the output's strides, so NCHW and NHWC outputs cost the same.

Three ways to walk ``k`` (constexprs ``FLAT_K`` and ``PACKED``):

* blocked (default for C_in/groups >= 32): one loop over (r, s, channel block); the tap
  offset is a scalar per iteration, so the gather is one 2-d add and the loads along ``c``
  are contiguous;
* packed (groups = 1 and C_in <= 4, e.g. the RGB first layer): the launcher copies x into
  4 channels (zeros past C_in) and the weight into (C_out, R, JP) rows; ``k`` runs over
  (r, 4*s + c), so each pixel is an aligned run of 4 that loads as one 8-byte (16-bit
  dtypes) async copy. Costs one pass over x and up to ~2x the MMA work of the real K;
* flat (other few-channel cases): ``k`` runs over ``R*S*C`` in blocks and every element
  has its own (r, s, c); the blocked walk would pad C to a whole block and waste most of
  each MMA, but C = 3 pixels are 6 bytes and gather as scalar loads.

Groups are a grid axis: group ``g`` reads channels ``[g*C, (g+1)*C)`` of x and writes
``[g*CO, (g+1)*CO)`` of out, with ``C``/``CO`` the per-group channel counts.

The launchers take ``shape``, a ``pyowt.ops.conv2d.ConvShape`` (any object with its fields).
Every load and store is masked, so any shape is safe. Offsets inside one image are int32
(the launcher refuses an image of 2**31 elements or more); the image offset is int64.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import ceil_div, interpreter_enabled
from .autotuned import launch_and_remember, launch_from_memo

INT32_MAX = 2**31 - 1
# Below this many input channels per group the flat k walk wastes less of each MMA.
FLAT_K_BELOW = 32
# At most this many input channels (groups = 1: RGB first layers) take the packed walk,
# on a 4-channel copy of x; its weight rows are padded to a multiple of PACK_K_MULTIPLE.
PACK_CHANNELS_AT_MOST = 4
PACK_K_MULTIPLE = 64


# Geometry ints are not specialized: Triton would otherwise compile a variant for every
# pattern of "== 1" / "divisible by 16" among ~20 sizes (one per test shape). Alignment
# that matters for vector loads is passed explicitly (the *_ALIGN constexprs) instead;
# the channel strides (sxc, syc) stay specialized, their "== 1" makes loads contiguous.
GEOMETRY_ARGS = ["M", "C", "H", "W", "CO", "HO", "WO", "R", "S", "stride_h", "stride_w",
                 "pad_h", "pad_w", "dil_h", "dil_w"]


def pow2_align(*values: int, cap: int = 16) -> int:
    """Largest power of two (<= cap, itself a power of two) dividing every value: a
    tl.multiple_of hint. (The gcd with a power of two is the largest power of two, up to
    it, that divides; 0 is divisible by anything.)"""
    return math.gcd(cap, *values)


def channel_align(channels: int, t: torch.Tensor) -> int:
    """The ``X_ALIGN``/``Y_ALIGN`` hint for an (N, C, H, W) tensor ``t`` read or written along
    its channels: the largest power of two (<= 16) dividing ``channels`` and every pixel
    stride (N, H, W) of ``t`` when its channels are contiguous, else 1.

    The channel stride itself (1) is left out: including it made every hint 1, and the
    gathers compiled to scalar loads with no async-copy pipelining.
    """
    sn, sc, sh, sw = t.stride()
    if sc != 1:
        return 1
    return pow2_align(channels, sn, sh, sw)


def make_pruner(rows: str, cols: str):
    """An ``early_config_prune`` keeping tiles that fit the problem (rows x cols tiles
    named BLOCK_M x BLOCK_N); tiny problems get the first such config and no tuning.

    (The autotuner skips benchmarking when one config is left, so the GPU tests' many
    small shapes cost a compile each, not a tuning sweep.)
    """
    def prune(configs, named_args, **kwargs):
        m, n = int(named_args[rows]), int(named_args[cols])
        fit_m = max(64, triton.next_power_of_2(max(m, 1)))
        fit_n = max(64, triton.next_power_of_2(max(n, 1)))
        kept = [c for c in configs if c.kwargs["BLOCK_M"] <= fit_m and c.kwargs["BLOCK_N"] <= fit_n]
        kept = kept or configs[:1]
        return kept[:1] if m * n < 4 * 128 * 128 else kept

    return prune


def _config(bm, bn, bk, warps, stages, **extra):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, **extra},
                         num_warps=warps, num_stages=stages)


def fwd_configs():
    # The interpreter runs one config (autotuning it would only cost time): blocks large
    # enough for numpy to vectorize, yet close to the tiny test shapes.
    if interpreter_enabled():
        return [_config(128, 16, 16, 4, 1, GROUP_M=4)]
    return [
        _config(128, 128, 32, 8, 3, GROUP_M=8),
        _config(128, 64, 32, 4, 4, GROUP_M=8),
        _config(64, 128, 32, 4, 4, GROUP_M=8),
        _config(128, 256, 64, 8, 3, GROUP_M=8),
        _config(256, 128, 64, 8, 3, GROUP_M=8),
        _config(64, 64, 64, 4, 3, GROUP_M=8),
        # 64 output channels wide without being issue-bound on sm_90 (251 SASS instructions
        # per 1M-MAC iteration): AlexNet's conv2 has 192 channels, 25% padding at 128 wide.
        _config(256, 64, 64, 8, 4, GROUP_M=8),
        # The H100 sweep's best at AlexNet conv3-conv5 and ResNet-50 layer 2 (2026-11-26,
        # benchmarks/RESULTS.md): K steps of 64 at 128x128 (3 stages: conv2, conv4; 4
        # stages: conv5, 0.078 vs 0.084 ms), and 256 rows at 32 (conv3).
        _config(128, 128, 64, 8, 3, GROUP_M=8),
        _config(128, 128, 64, 8, 4, GROUP_M=8),
        _config(256, 128, 32, 8, 4, GROUP_M=8),
        # Three blocks per SM (166 registers, 72 KB of shared memory in its sm_90 build): at
        # AlexNet's 256-channel conv4/conv5 (batch 128) 1.71 waves over 132 SMs, where every
        # config above makes 1.28 (two blocks of 128x128, four of 128x64: the second wave a
        # quarter full) or, at one block per SM, 2.56 of less efficient blocks.
        _config(128, 64, 64, 4, 3, GROUP_M=8),
    ]


@triton.jit
def mma(a, b, acc, IEEE: tl.constexpr):
    """acc += a @ b; float32 operands in full precision (no TF32) when IEEE."""
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def grouped_tile(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) in GROUP_M-row bands, so neighbouring programs share B tiles in L2."""
    per_band = GROUP_M * num_n
    band = pid // per_band
    first_m = band * GROUP_M
    rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_band) % rows
    pid_n = (pid % per_band) // rows
    return pid_m, pid_n


@triton.jit
def advance_tap(c0, tap_k, s, dr, C_WALK, TAP_COLS, S, dil_h, BLOCK_K: tl.constexpr):
    """One step of a (tap, channel block) walk kept as loop-carried counters instead of
    dividing the iteration number: the next block of the C_WALK channels walked; past the
    last one the next s, whose first weight column tap_k moves by TAP_COLS; past the last s
    the next r, whose row offset dr = r * dil_h moves by dil_h. Returns (c0, tap_k, s, dr)."""
    c0 += BLOCK_K
    next_tap = c0 >= C_WALK
    c0 = tl.where(next_tap, 0, c0)
    tap_k = tl.where(next_tap, tap_k + TAP_COLS, tap_k)
    s = tl.where(next_tap, s + 1, s)
    next_row = s == S
    s = tl.where(next_row, 0, s)
    dr = tl.where(next_row, dr + dil_h, dr)
    return c0, tap_k, s, dr


@triton.jit
def mixed_radix_add(lo, mid, hi, d_lo, d_mid, d_hi, LO, MID):
    """(hi, mid, lo) + (d_hi, d_mid, d_lo) in the radix (., MID, LO), digits d_lo < LO and
    d_mid < MID, so each carry is 0 or 1: advances decoded indices (e.g. a pixel's
    (img, oh, ow), a k's (r, s, c)) by a constant step without dividing."""
    lo += d_lo
    carry_lo = lo >= LO
    lo = tl.where(carry_lo, lo - LO, lo)
    mid += d_mid + carry_lo.to(tl.int32)
    carry_mid = mid >= MID
    mid = tl.where(carry_mid, mid - MID, mid)
    hi += d_hi + carry_mid.to(tl.int32)
    return lo, mid, hi


@triton.autotune(configs=fwd_configs(), key=["M", "CO", "C", "R", "S", "FLAT_K", "PACKED"],
                 prune_configs_by={"early_config_prune": make_pruner("M", "CO")})
@triton.jit(do_not_specialize=GEOMETRY_ARGS + ["sxn", "sxh", "sxw", "syn", "syh", "syw"])
def conv2d_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    M, C, H, W, CO, HO, WO, R, S,
    sxn, sxc, sxh, sxw,
    syn, syc, syh, syw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, JP,
    HAS_BIAS: tl.constexpr, RELU: tl.constexpr, FLAT_K: tl.constexpr, PACKED: tl.constexpr,
    IEEE: tl.constexpr, X_ALIGN: tl.constexpr, Y_ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # X_ALIGN divides every pixel offset of x and C; Y_ALIGN every pixel offset of y and CO
    # (see the launcher). Rebuilding C and CO as multiples of them tells the compiler that
    # the channel masks are constant over aligned runs, so loads and stores along the
    # channels vectorize (and can be pipelined with cp.async).
    C = (C // X_ALIGN) * X_ALIGN
    CO = (CO // Y_ALIGN) * Y_ALIGN
    g = tl.program_id(1)
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(CO, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < CO
    img = offs_m // (HO * WO)
    pix = offs_m % (HO * WO)
    oh = pix // WO
    ow = pix % WO
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w
    x_img = x_ptr + tl.multiple_of(img.to(tl.int64) * sxn + (g * C) * sxc, X_ALIGN)  # (BLOCK_M,)
    KW = R * S * C  # one weight row (one output channel) in (r, s, c) order
    w_row = w_ptr + tl.multiple_of((g * CO + offs_n).to(tl.int64) * KW, X_ALIGN)  # (BLOCK_N,)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    if PACKED:
        # x is pack_rgb's copy: NHWC with 4 channels (zeros past C_in), so every pixel is
        # one aligned run of 4; w is (C_out, R, JP) rows holding, per r, the 4*S values
        # (s, c) and zeros up to JP. k walks (r, j = 4*s + c) in blocks of BLOCK_K; with the
        # constant 4, the compiler sees contiguous runs of 4 (8 bytes in 16-bit) and masks
        # constant over them, so the gathers are vector async copies instead of scalar loads.
        xp_img = x_ptr + img.to(tl.int64) * (4 * H * W)  # (BLOCK_M,)
        wp_row = w_ptr + (g * CO + offs_n).to(tl.int64) * (R * JP)  # (BLOCK_N,)
        zero = tl.program_id(0) * 0
        j0 = zero  # first j of the block
        dr = zero  # r * dil_h
        rk = zero  # r * JP: the row's first column in a weight row
        for _ in range(0, R * tl.cdiv(4 * S, BLOCK_K)):
            j = tl.multiple_of(j0, BLOCK_K) + tl.arange(0, BLOCK_K)
            s = j // 4
            ih = ih0 + dr
            iw = iw0[:, None] + (s * dil_w)[None, :]
            a_ok = ((m_ok & (ih >= 0) & (ih < H))[:, None] & (s < S)[None, :]
                    & (iw >= 0) & (iw < W))
            a_off = ((ih * W)[:, None] + iw) * 4 + (j % 4)[None, :]
            a = tl.load(xp_img[:, None] + a_off, mask=a_ok, other=0.0)
            col = tl.multiple_of(rk + j0, BLOCK_K) + tl.arange(0, BLOCK_K)
            b = tl.load(wp_row[None, :] + col[:, None], mask=n_ok[None, :], other=0.0)
            acc = mma(a, b, acc, IEEE)
            j0 += BLOCK_K
            next_r = j0 >= 4 * S
            j0 = tl.where(next_r, 0, j0)
            dr = tl.where(next_r, dr + dil_h, dr)
            rk = tl.where(next_r, rk + JP, rk)
    elif FLAT_K:
        # Each k of the block is (r, s, c), decoded once and then advanced by BLOCK_K as a
        # mixed-radix addition (BLOCK_K = d_r*S*C + d_s*C + d_c, one carry per digit).
        offs_k = tl.arange(0, BLOCK_K)
        c = offs_k % C
        s = (offs_k // C) % S
        r = offs_k // (S * C)
        d_r = BLOCK_K // (S * C)
        d_s = (BLOCK_K // C) % S
        d_c = BLOCK_K % C
        for k0 in range(0, KW, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < KW
            ih = ih0[:, None] + (r * dil_h)[None, :]
            iw = iw0[:, None] + (s * dil_w)[None, :]
            a_ok = (m_ok[:, None] & k_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W))
            a = tl.load(x_img[:, None] + ih * sxh + iw * sxw + c[None, :] * sxc, mask=a_ok, other=0.0)
            b = tl.load(w_row[None, :] + offs_k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = mma(a, b, acc, IEEE)
            c, s, r = mixed_radix_add(c, s, r, d_c, d_s, d_r, C, S)
    else:
        # One loop over (tap, channel block) so the compiler pipelines all of it. The tap
        # (r, s) and channel block advance as loop-carried counters: dividing the iteration
        # number instead cost two integer divisions per iteration, about a quarter of the
        # loop's instructions on sm_90 (an issue-bound loop at BLOCK_K = 32).
        zero = tl.program_id(0) * 0  # an int32 scalar to start the counters from
        c0 = zero  # first channel of the block
        s = zero
        dr = zero  # r * dil_h
        tap_k = zero  # (r * S + s) * C: the tap's first column in a weight row
        for _ in range(0, R * S * tl.cdiv(C, BLOCK_K)):
            ih = ih0 + dr
            iw = iw0 + s * dil_w
            row_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            offs_c = c0 + tl.arange(0, BLOCK_K)
            c_ok = offs_c < C
            a_pix = tl.multiple_of(ih * sxh + iw * sxw, X_ALIGN)
            a = tl.load((x_img + a_pix)[:, None] + offs_c[None, :] * sxc,
                        mask=row_ok[:, None] & c_ok[None, :], other=0.0)
            b = tl.load(w_row[None, :] + (tap_k + offs_c)[:, None],
                        mask=c_ok[:, None] & n_ok[None, :], other=0.0)
            acc = mma(a, b, acc, IEEE)
            c0, tap_k, s, dr = advance_tap(c0, tap_k, s, dr, C, C, S, dil_h, BLOCK_K)

    if HAS_BIAS:
        bias = tl.load(b_ptr + g * CO + offs_n, mask=n_ok, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    if RELU:
        acc = tl.maximum(acc, 0.0)
    y_pix = tl.multiple_of(img.to(tl.int64) * syn + oh * syh + ow * syw, Y_ALIGN)
    y_ptrs = y_ptr + y_pix[:, None] + ((g * CO + offs_n) * syc)[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def check_int32_images(shape) -> None:
    """Offsets inside one image are int32: refuse images too large for that, clearly."""
    per_image = max(shape.c_in * shape.h * shape.w, shape.c_out * shape.h_out * shape.w_out)
    if per_image > INT32_MAX:
        raise ValueError(
            f"conv2d_bias_act (triton): one image of {per_image} elements exceeds the int32 "
            f"offsets of the kernel (at most {INT32_MAX}); use backend='aten'"
        )


def use_flat_k(channels_per_group: int) -> bool:
    return channels_per_group < FLAT_K_BELOW


def use_packed(channels_per_group: int, groups: int) -> bool:
    return groups == 1 and channels_per_group <= PACK_CHANNELS_AT_MOST


def pack_rgb(x: torch.Tensor, w_cl: torch.Tensor):
    """The packed walk's operands: (x4, w4, JP).

    x4: x as (N, 4, H, W) in NHWC memory (channels_last), zeros past C_in (<= 4); w4:
    (C_out, R, JP) with, per r, the weight's (s, c) values over 4 channels (zeros past C_in)
    and zeros from 4*S up to JP, a multiple of PACK_K_MULTIPLE (so that every BLOCK_K of the
    configs divides it).
    """
    n, c, h, w = x.shape
    co, _, r, s = w_cl.shape
    jp = ceil_div(4 * s, PACK_K_MULTIPLE) * PACK_K_MULTIPLE
    # narrow + copy_, not slice assignment: this runs on every call of an RGB layer, and
    # Python's __setitem__ with slices costs several times their host time.
    x4 = x.new_zeros((n, h, w, 4))
    x4.narrow(3, 0, c).copy_(x.permute(0, 2, 3, 1))
    w4 = w_cl.new_zeros((co, r, jp))
    w4.narrow(2, 0, 4 * s).view(co, r, s, 4).narrow(3, 0, c).copy_(w_cl.permute(0, 2, 3, 1))
    return x4.permute(0, 3, 1, 2), w4, jp


def launch_conv2d_fwd(launch, x: torch.Tensor, w_cl: torch.Tensor, bias, y: torch.Tensor,
                      shape, relu: bool, flat_k=None, packed=None, memo=None) -> None:
    """Write act(conv2d(x, w) + bias) into ``y``.

    Args:
        launch: ``wrap_triton`` (or a stand-in) applied to the kernel before launching;
            None in eager mode (:func:`launch_autotuned`).
        x: (N, C_in, H, W), any strides (channels_last makes the gathers contiguous).
        w_cl: (C_out, C_in/groups, R, S) in channels_last memory, i.e. (C_out, R, S, C) rows.
        bias: (C_out,) contiguous, or None.
        y: (N, C_out, H_out, W_out) output, any strides.
        flat_k: force the flat or blocked k walk (None: chosen from C_in/groups).
        packed: force the packed walk on or off (None: on for groups == 1 and C_in <= 4);
            it copies x and w into pack_rgb's 4-channel layout first.
        memo: a dict the caller keeps for calls whose arguments match this one's in all but
            the tensors' data (shapes, strides, dtypes, device, bias or not, ``relu``): the
            eager path's plan (pyowt.ops.conv2d). Once the kernel is tuned the launch keeps
            its scalar arguments there and later calls only pass the tensors, and once it
            has run from there, the compiled kernel (kernels.relaunch: later calls skip
            Triton's JITFunction.run). Eager launches only; the packed walk's copies are
            made on every call (they hold the call's data), its launch relaunches too.
    """
    b_arg = w_cl if bias is None else bias
    if memo:
        if memo["packed"]:
            x4, w4, _ = pack_rgb(x, w_cl)
            launch_from_memo(memo, conv2d_fwd_kernel, (x4, w4, b_arg, y))
        else:
            launch_from_memo(memo, conv2d_fwd_kernel, (x, w_cl, b_arg, y))
        return
    check_int32_images(shape)
    c = shape.c_in // shape.groups
    co = shape.c_out // shape.groups
    m = shape.n * shape.h_out * shape.w_out
    if m == 0 or co == 0:
        return
    pack = use_packed(c, shape.groups) if packed is None else bool(packed)
    if pack and (shape.groups != 1 or c > 4):
        raise ValueError(f"conv2d_bias_act (triton): the packed walk needs groups=1 and at most 4 "
                         f"input channels, got groups={shape.groups}, C_in={shape.c_in}")
    flat = False if pack else (use_flat_k(c) if flat_k is None else bool(flat_k))
    jp = 0
    x_arg, w_arg, x_align = x, w_cl, channel_align(c, x)
    if pack:
        if 4 * shape.h * shape.w > INT32_MAX:
            raise ValueError(f"conv2d_bias_act (triton): one packed image of {4 * shape.h * shape.w} "
                             f"elements exceeds the kernel's int32 offsets; use backend='aten'")
        x_arg, w_arg, jp = pack_rgb(x, w_cl)
        x_align = 1  # unused by the packed walk

    def grid(meta):
        return (ceil_div(m, meta["BLOCK_M"]) * ceil_div(co, meta["BLOCK_N"]), shape.groups)

    key = (m, co, c, shape.r, shape.s, flat, pack, x_arg.dtype, w_arg.dtype, b_arg.dtype, y.dtype)
    scalars = (m, c, shape.h, shape.w, co, shape.h_out, shape.w_out, shape.r, shape.s,
               *x_arg.stride(), *y.stride(), *shape.stride, *shape.padding, *shape.dilation, jp)
    constexprs = dict(HAS_BIAS=bias is not None, RELU=relu, FLAT_K=flat, PACKED=pack,
                      IEEE=x.dtype == torch.float32, X_ALIGN=x_align, Y_ALIGN=channel_align(co, y))
    launch_and_remember(launch, memo, conv2d_fwd_kernel, key, grid, (x_arg, w_arg, b_arg, y),
                        scalars, constexprs)
    if memo:  # kept: later calls launch from it
        memo["packed"] = pack
