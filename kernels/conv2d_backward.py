"""Triton backward kernels of out = act(conv2d(x, weight) + bias): two implicit GEMMs.

With ``dy = grad_out * (out > 0)`` (the ReLU mask is applied on the fly from the saved
output; ``activation="none"`` skips it):

* grad_input, ``dx[(img, ih, iw), c] = sum_{r, s, co} dy[(img, oh, ow), co] * w[co, c, r, s]``
  with ``oh = (ih + pad_h - r*dil_h) / stride_h`` when that divides exactly and lands in
  the output (the transposed convolution, gathered instead of scattered so every output
  element is written once, without atomics). Rows are input pixels, columns input
  channels, the reduction walks (tap, output-channel block). Strides above 1 leave most
  taps empty for a given pixel; they are masked, not skipped.
* grad_weight, ``dw[co, (r, s, c)] = sum_m dy[m, co] * A[m, (r, s, c)]`` with ``A`` the
  same gathered input as the forward. The reduction runs over all ``M = N*H_out*W_out``
  output pixels while the result is small, so ``M`` is split in ``SPLIT`` chunks across
  a grid axis (split-K); each chunk writes its own float32 partial (no atomics, so the
  result is deterministic). The bias gradient ``sum_m dy[m, co]`` rides along: the
  programs of the first k tile add up the dy tile they already hold, per chunk, into a
  second partial buffer. A third kernel sums the partials in a fixed order and stores both
  gradients in their dtype and the weight's layout: one launch where the ATen sum, casts
  and layout copy were four to six, each a host round of several microseconds.

``dy`` and ``out`` must share strides (the launcher makes both channels_last), so one set
of offsets serves both. Every load and store is masked.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import ceil_div, interpreter_enabled
from .autotuned import launch_and_remember, launch_from_memo
from .conv2d import (GEOMETRY_ARGS, _config, advance_tap, channel_align, check_int32_images,
                     grouped_tile, make_pruner, mixed_radix_add, mma, use_flat_k)


def dgrad_configs():
    if interpreter_enabled():
        return [_config(128, 16, 16, 4, 1, GROUP_M=4)]
    return [
        _config(128, 128, 32, 8, 3, GROUP_M=8),
        _config(128, 64, 32, 4, 4, GROUP_M=8),
        _config(64, 128, 32, 4, 4, GROUP_M=8),
        _config(128, 128, 64, 8, 3, GROUP_M=8),
    ]


def wgrad_configs():
    # BLOCK_M is the reduction (pixel) block; BLOCK_N output channels; BLOCK_K (r, s, c).
    if interpreter_enabled():
        return [_config(32, 16, 16, 4, 1)]
    return [
        _config(64, 128, 128, 8, 3),
        _config(64, 64, 128, 4, 3),
        _config(32, 128, 64, 4, 4),
        _config(64, 64, 64, 4, 4),
    ]


@triton.autotune(configs=dgrad_configs(), key=["M", "C", "CO", "R", "S"],
                 prune_configs_by={"early_config_prune": make_pruner("M", "C")})
@triton.jit(do_not_specialize=GEOMETRY_ARGS + ["syn", "syh", "syw", "sxn", "sxh", "sxw"])
def conv2d_dgrad_kernel(
    dy_ptr, out_ptr, w_ptr, dx_ptr,
    M, C, H, W, CO, HO, WO, R, S,
    syn, syc, syh, syw,
    sxn, sxc, sxh, sxw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    RELU: tl.constexpr, IEEE: tl.constexpr, UNIT_STRIDE: tl.constexpr,
    X_ALIGN: tl.constexpr, Y_ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Y_ALIGN divides dy's pixel offsets and CO; X_ALIGN divides dx's pixel offsets and C
    # (so weight rows and taps too): vectorized channel loads/stores, as in the forward.
    C = (C // X_ALIGN) * X_ALIGN
    CO = (CO // Y_ALIGN) * Y_ALIGN
    g = tl.program_id(1)
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(C, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # input pixels (img, ih, iw)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # input channels of group g
    m_ok = offs_m < M
    n_ok = offs_n < C
    img = offs_m // (H * W)
    pix = offs_m % (H * W)
    ih = pix // W
    iw = pix % W
    y_img = tl.multiple_of(img.to(tl.int64) * syn + (g * CO) * syc, Y_ALIGN)
    KW = R * S * C
    # Row tk = co0 + k of the weight tile starts at w_rows[k] + co0 * KW.
    w_rows = w_ptr + (g * CO + tl.arange(0, BLOCK_K)).to(tl.int64) * KW
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # The loop walks (tap, output-channel block) with loop-carried counters instead of
    # dividing the iteration number (two integer divisions per iteration on sm_90).
    zero = tl.program_id(0) * 0  # an int32 scalar to start the counters from
    co0 = zero
    s = zero
    dr = zero  # r * dil_h
    tap_k = zero  # (r * S + s) * C: the tap's first column in a weight row
    for _ in range(0, R * S * tl.cdiv(CO, BLOCK_K)):
        th = ih + pad_h - dr
        tw = iw + pad_w - s * dil_w
        if UNIT_STRIDE:  # most layers: no per-row divisions at all
            row_ok = m_ok & (th >= 0) & (tw >= 0) & (th < HO) & (tw < WO)
            oh = th
            ow = tw
        else:
            # Clamp before dividing: negative values are masked anyway, and integer division
            # of negatives differs between the GPU (truncates) and the interpreter (floors).
            thc = tl.maximum(th, 0)
            twc = tl.maximum(tw, 0)
            oh = thc // stride_h
            ow = twc // stride_w
            row_ok = (m_ok & (th >= 0) & (tw >= 0) & (thc % stride_h == 0) & (twc % stride_w == 0)
                      & (oh < HO) & (ow < WO))
        offs_co = co0 + tl.arange(0, BLOCK_K)
        co_ok = offs_co < CO
        ld_ok = row_ok[:, None] & co_ok[None, :]
        y_pix = tl.multiple_of(oh * syh + ow * syw, Y_ALIGN)
        y_off = (y_img + y_pix)[:, None] + (offs_co * syc)[None, :]
        dy = tl.load(dy_ptr + y_off, mask=ld_ok, other=0.0)
        if RELU:
            o = tl.load(out_ptr + y_off, mask=ld_ok, other=0.0)
            dy = tl.where(o > 0, dy, tl.zeros_like(dy))
        # w[co, c, r, s] sits at (g*CO + co) * KW + (r*S + s) * C + c in (C_out, R, S, C).
        w_off = co0.to(tl.int64) * KW + tap_k
        wt = tl.load((w_rows + w_off)[:, None] + offs_n[None, :], mask=co_ok[:, None] & n_ok[None, :],
                     other=0.0)
        acc = mma(dy, wt, acc, IEEE)
        # Blocks of output channels within a tap; a tap's weight columns are C apart.
        co0, tap_k, s, dr = advance_tap(co0, tap_k, s, dr, CO, C, S, dil_h, BLOCK_K)
    dx_pix = tl.multiple_of(img.to(tl.int64) * sxn + ih * sxh + iw * sxw, X_ALIGN)
    dx_off = dx_pix[:, None] + ((g * C + offs_n) * sxc)[None, :]
    tl.store(dx_ptr + dx_off, acc.to(dx_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.autotune(configs=wgrad_configs(), key=["M", "C", "CO", "R", "S", "CHUNK", "FLAT_K"],
                 prune_configs_by={"early_config_prune": make_pruner("CHUNK", "CO")})
@triton.jit(do_not_specialize=GEOMETRY_ARGS + ["CO_TOTAL", "CHUNK", "syn", "syh", "syw", "sxn", "sxh", "sxw"])
def conv2d_wgrad_kernel(
    dy_ptr, out_ptr, x_ptr, dw_ptr, db_ptr,
    M, C, H, W, CO, HO, WO, R, S, CO_TOTAL, CHUNK,
    syn, syc, syh, syw,
    sxn, sxc, sxh, sxw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    HAS_BIAS: tl.constexpr, RELU: tl.constexpr, IEEE: tl.constexpr, FLAT_K: tl.constexpr,
    X_ALIGN: tl.constexpr, Y_ALIGN: tl.constexpr, Y_DENSE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Y_DENSE: dy (and out) are dense NHWC (syn = HO*syh, syh = WO*syw), so pixel m sits at
    # m*syw: no decode of m for them (15% of the loop's instructions in its sm_90 SASS).
    # Alignment as in the forward: X_ALIGN divides x's pixel offsets and C, Y_ALIGN dy's
    # pixel offsets and CO. The k tile is flat over (r, s, c) (FLAT_K, few channels) or
    # one tap by a channel block (contiguous, vectorized gathers of x).
    C = (C // X_ALIGN) * X_ALIGN
    CO = (CO // Y_ALIGN) * Y_ALIGN
    KW = R * S * C
    if FLAT_K:
        k_tiles = tl.cdiv(KW, BLOCK_K)
    else:
        c_blocks = tl.cdiv(C, BLOCK_K)
        k_tiles = R * S * c_blocks
    pid_n = tl.program_id(0) // k_tiles
    pid_k = tl.program_id(0) % k_tiles
    split = tl.program_id(1)
    g = tl.program_id(2)
    offs_co = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    co_ok = offs_co < CO
    if FLAT_K:
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = offs_k < KW
        c = offs_k % C
        r_off = ((offs_k // C) // S) * dil_h
        s_off = ((offs_k // C) % S) * dil_w
    else:
        rs_tap = pid_k // c_blocks
        c = (pid_k % c_blocks) * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = c < C
        offs_k = rs_tap * C + c
    y_ch = ((g * CO + offs_co) * syc)[:, None]  # (BLOCK_N, 1)
    x_ch = ((g * C + c) * sxc)[None, :]  # (1, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    m_start = split * CHUNK
    m_end = tl.minimum(m_start + CHUNK, M)
    # Pixel m = (img, oh, ow) of each row, decoded once and then advanced by BLOCK_M as a
    # mixed-radix addition (BLOCK_M = d_img*HO*WO + d_oh*WO + d_ow, one carry per digit):
    # dividing every block's pixel indices cost three integer divisions per row.
    first = m_start + tl.arange(0, BLOCK_M)
    img = first // (HO * WO)
    oh = (first % (HO * WO)) // WO
    ow = first % WO
    d_img = BLOCK_M // (HO * WO)
    d_oh = (BLOCK_M % (HO * WO)) // WO
    d_ow = BLOCK_M % WO
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < m_end
        # dy^T tile (BLOCK_N, BLOCK_M): output channels by pixels.
        if Y_DENSE:
            y_pix = tl.multiple_of(offs_m.to(tl.int64) * syw, Y_ALIGN)
        else:
            y_pix = tl.multiple_of(img.to(tl.int64) * syn + oh * syh + ow * syw, Y_ALIGN)
        y_off = y_ch + y_pix[None, :]
        y_ok = co_ok[:, None] & m_ok[None, :]
        dy = tl.load(dy_ptr + y_off, mask=y_ok, other=0.0)
        if RELU:
            o = tl.load(out_ptr + y_off, mask=y_ok, other=0.0)
            dy = tl.where(o > 0, dy, tl.zeros_like(dy))
        # Gathered input tile (BLOCK_M, BLOCK_K), as in the forward.
        ih0 = oh * stride_h - pad_h
        iw0 = ow * stride_w - pad_w
        if FLAT_K:
            ih = ih0[:, None] + r_off[None, :]
            iw = iw0[:, None] + s_off[None, :]
            a_ok = m_ok[:, None] & k_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a_off = (img.to(tl.int64) * sxn)[:, None] + ih * sxh + iw * sxw + x_ch
        else:
            ih = ih0 + (rs_tap // S) * dil_h
            iw = iw0 + (rs_tap % S) * dil_w
            row_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a_ok = row_ok[:, None] & k_ok[None, :]
            a_pix = tl.multiple_of(img.to(tl.int64) * sxn + ih * sxh + iw * sxw, X_ALIGN)
            a_off = a_pix[:, None] + x_ch
        a = tl.load(x_ptr + a_off, mask=a_ok, other=0.0)
        acc = mma(dy, a, acc, IEEE)
        if HAS_BIAS:
            if pid_k == 0:  # the only programs that store it (a uniform branch elsewhere)
                db += tl.sum(dy.to(tl.float32), axis=1)
        ow, oh, img = mixed_radix_add(ow, oh, img, d_ow, d_oh, d_img, WO, HO)
    # Partials: dw_ptr is (SPLIT, CO_TOTAL, KW) float32, db_ptr (SPLIT, CO_TOTAL) float32.
    row = split.to(tl.int64) * CO_TOTAL + g * CO + offs_co
    tl.store(dw_ptr + row[:, None] * KW + offs_k[None, :], acc, mask=co_ok[:, None] & k_ok[None, :])
    if HAS_BIAS:
        tl.store(db_ptr + row, db, mask=co_ok & (pid_k == 0))


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _split_count(m: int, tiles: int, device: torch.device) -> tuple:
    """(SPLIT, CHUNK): chunks of the M reduction so that the grid fills the device.

    On a GPU aim for about four programs per SM, each chunk at least 256 rows and aligned
    to 128 (whole pixel blocks); the interpreter uses up to three small chunks so the
    tests run the partial-sum path with chunk boundaries inside a block.
    """
    if device.type == "cuda":
        sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
        want = max(1, (4 * sms) // max(tiles, 1))
        split = max(1, min(want, m // 256))
        chunk = ceil_div(ceil_div(m, split), 128) * 128
    else:
        split = max(1, min(3, m // 24))
        chunk = ceil_div(m, split)
    return ceil_div(m, chunk), chunk


def launch_conv2d_dgrad(launch, dy: torch.Tensor, out: torch.Tensor, w_cl: torch.Tensor,
                        dx: torch.Tensor, shape, relu: bool, memo=None) -> None:
    """grad_input into ``dx`` (any strides). ``dy``/``out`` share strides; w_cl as forward.
    ``memo``: as launch_conv2d_fwd's (kernels.autotuned.launch_from_memo)."""
    if launch_from_memo(memo, conv2d_dgrad_kernel, (dy, out, w_cl, dx)):
        return
    check_int32_images(shape)
    c = shape.c_in // shape.groups
    co = shape.c_out // shape.groups
    m = shape.n * shape.h * shape.w
    if m == 0 or c == 0:
        return

    def grid(meta):
        return (ceil_div(m, meta["BLOCK_M"]) * ceil_div(c, meta["BLOCK_N"]), shape.groups)

    key = (m, c, co, shape.r, shape.s, dy.dtype, out.dtype, w_cl.dtype, dx.dtype)
    scalars = (m, c, shape.h, shape.w, co, shape.h_out, shape.w_out, shape.r, shape.s,
               *dy.stride(), *dx.stride(), *shape.stride, *shape.padding, *shape.dilation)
    constexprs = dict(RELU=relu, IEEE=dy.dtype == torch.float32, UNIT_STRIDE=tuple(shape.stride) == (1, 1),
                      X_ALIGN=channel_align(c, dx), Y_ALIGN=channel_align(co, dy))
    launch_and_remember(launch, memo, conv2d_dgrad_kernel, key, grid, (dy, out, w_cl, dx), scalars, constexprs)


def nhwc_dense(t: torch.Tensor) -> bool:
    """Whether pixel p = (n, h, w) of (N, C, H, W) ``t`` starts at p * stride(3), as in dense
    NHWC (channels_last) memory (the strides of size-1 dimensions do not matter)."""
    n, _, h, w = t.shape
    sn, _, sh, sw = t.stride()
    return (h == 1 or sh == w * sw) and (n == 1 or sn == h * w * sw)


def launch_conv2d_wgrad_partials(launch, dy: torch.Tensor, out: torch.Tensor, x: torch.Tensor,
                                 shape, relu: bool, has_bias: bool, split=None, flat_k=None, memo=None):
    """The weight gradient's float32 partials: (dw_parts (SPLIT, C_out, R*S*C), db_parts
    (SPLIT, C_out), or a (1,) placeholder without ``has_bias``); their sum over SPLIT is
    grad_weight in (C_out, R, S, C) order and grad_bias (:func:`launch_conv2d_wgrad`).

    ``split`` forces the number of M chunks (tests); ``memo`` as launch_conv2d_fwd's.
    """
    dev = dy.device
    if memo:
        size_w, size_b = memo["sizes"]
        dw = torch.empty(size_w, dtype=torch.float32, device=dev)
        db = torch.empty(size_b, dtype=torch.float32, device=dev)
        launch_from_memo(memo, conv2d_wgrad_kernel, (dy, out, x, dw, db))
        return dw, db
    check_int32_images(shape)
    c = shape.c_in // shape.groups
    co = shape.c_out // shape.groups
    kw = shape.r * shape.s * c
    m = shape.n * shape.h_out * shape.w_out
    if m == 0 or co == 0 or kw == 0:
        return (torch.zeros((1, shape.c_out, kw), dtype=torch.float32, device=dev),
                torch.zeros((1, shape.c_out) if has_bias else (1,), dtype=torch.float32, device=dev))
    tiles = ceil_div(co, 64) * ceil_div(kw, 64) * shape.groups
    if split is None:
        n_split, chunk = _split_count(m, tiles, dev)
    else:
        chunk = ceil_div(m, max(1, int(split)))
        n_split = ceil_div(m, chunk)
    dw = torch.empty((n_split, shape.c_out, kw), dtype=torch.float32, device=dev)
    db = torch.empty((n_split, shape.c_out) if has_bias else (1,), dtype=torch.float32, device=dev)

    flat = use_flat_k(c) if flat_k is None else bool(flat_k)

    def grid(meta):
        bk = meta["BLOCK_K"]
        k_tiles = ceil_div(kw, bk) if flat else shape.r * shape.s * ceil_div(c, bk)
        return (ceil_div(co, meta["BLOCK_N"]) * k_tiles, n_split, shape.groups)

    key = (m, c, co, shape.r, shape.s, chunk, flat, dy.dtype, out.dtype, x.dtype)
    scalars = (m, c, shape.h, shape.w, co, shape.h_out, shape.w_out, shape.r, shape.s, shape.c_out, chunk,
               *dy.stride(), *x.stride(), *shape.stride, *shape.padding, *shape.dilation)
    constexprs = dict(HAS_BIAS=has_bias, RELU=relu, IEEE=dy.dtype == torch.float32, FLAT_K=flat,
                      X_ALIGN=channel_align(c, x), Y_ALIGN=channel_align(co, dy), Y_DENSE=nhwc_dense(dy))
    launch_and_remember(launch, memo, conv2d_wgrad_kernel, key, grid, (dy, out, x, dw, db), scalars, constexprs)
    if memo is not None and "launch" in memo:
        memo["sizes"] = (dw.shape, db.shape)
    return dw, db


# The sum's tile: 16 output channels by 64 weight columns (4 KB of float32 per partial).
SUM_BLOCK_CO = 16
SUM_BLOCK_K = 64


@triton.jit(do_not_specialize=["SPLIT", "CO", "KW", "C", "S", "sw_co", "sw_c", "sw_r", "sw_s"])
def conv2d_wgrad_sum_kernel(
    dw_parts_ptr, db_parts_ptr, dw_ptr, db_ptr,
    SPLIT, CO, KW, C, S, sw_co, sw_c, sw_r, sw_s,
    HAS_BIAS: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # dw[co, c, r, s] = sum_i dw_parts[i, co, (r*S + s)*C + c] over i = 0, 1, ... in order (the
    # same sum on every run), stored at co*sw_co + c*sw_c + r*sw_r + s*sw_s in dw's dtype.
    pid_k = tl.program_id(1)
    offs_co = tl.program_id(0) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    co_ok = offs_co < CO
    ok = co_ok[:, None] & (offs_k < KW)[None, :]
    part = offs_co.to(tl.int64)[:, None] * KW + offs_k[None, :]
    part_step = CO.to(tl.int64) * KW
    acc = tl.zeros((BLOCK_CO, BLOCK_K), dtype=tl.float32)
    for i in range(0, SPLIT):
        acc += tl.load(dw_parts_ptr + i * part_step + part, mask=ok, other=0.0)
    c = offs_k % C
    tap = offs_k // C
    w_off = offs_co.to(tl.int64)[:, None] * sw_co + (c * sw_c + (tap // S) * sw_r + (tap % S) * sw_s)[None, :]
    tl.store(dw_ptr + w_off, acc.to(dw_ptr.dtype.element_ty), mask=ok)
    if HAS_BIAS:
        if pid_k == 0:
            db = tl.zeros((BLOCK_CO,), dtype=tl.float32)
            for i in range(0, SPLIT):
                db += tl.load(db_parts_ptr + i * CO + offs_co, mask=co_ok, other=0.0)
            tl.store(db_ptr + offs_co, db.to(db_ptr.dtype.element_ty), mask=co_ok)


def launch_wgrad_sum(launch, dw_parts: torch.Tensor, db_parts: torch.Tensor, grad_w: torch.Tensor,
                     grad_b, memo=None) -> None:
    """grad_w (C_out, C, R, S) (any strides and float dtype) and grad_b (C_out,) or None
    from :func:`launch_conv2d_wgrad_partials`' partials; ``memo`` as launch_conv2d_fwd's."""
    tensors = (dw_parts, db_parts, grad_w, grad_w if grad_b is None else grad_b)
    if launch_from_memo(memo, conv2d_wgrad_sum_kernel, tensors):
        return
    split, co, kw = dw_parts.shape
    _, c, _, s = grad_w.shape
    if co == 0 or kw == 0:
        return
    grid = (ceil_div(co, SUM_BLOCK_CO), ceil_div(kw, SUM_BLOCK_K))
    launch_and_remember(launch, memo, conv2d_wgrad_sum_kernel, None, grid, tensors,
                        (split, co, kw, c, s, *grad_w.stride()),
                        dict(HAS_BIAS=grad_b is not None, BLOCK_CO=SUM_BLOCK_CO, BLOCK_K=SUM_BLOCK_K))


def launch_conv2d_wgrad(launch, dy: torch.Tensor, out: torch.Tensor, x: torch.Tensor, grad_w: torch.Tensor,
                        grad_b, shape, relu: bool, split=None, flat_k=None, memo=None) -> None:
    """grad_weight into ``grad_w`` ((C_out, C_in/groups, R, S), any strides and float dtype)
    and grad_bias into ``grad_b`` ((C_out,), or None: not computed).

    ``dy``/``out`` share strides, ``x`` (N, C_in, H, W) any strides (channels_last makes
    its gathers contiguous); ``split`` forces the number of M chunks (tests); ``memo``: a
    dict the caller keeps for calls that differ only in the tensors' data (the eager path).
    """
    memo_parts = memo_sum = None
    if memo is not None:
        memo_parts, memo_sum = memo.setdefault("partials", {}), memo.setdefault("sum", {})
    dw_parts, db_parts = launch_conv2d_wgrad_partials(launch, dy, out, x, shape, relu, grad_b is not None,
                                                      split, flat_k, memo_parts)
    launch_wgrad_sum(launch, dw_parts, db_parts, grad_w, grad_b, memo_sum)
