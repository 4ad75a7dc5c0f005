"""The CUDA backend of conv2d_bias_act (csrc/cuda/conv2d*.cu[h]).

Two parts:
* a CPU emulation (no GPU needed) of the kernels' exact index arithmetic: block tiles over
  M and C_out, the K loop, every thread's share of the shared-memory tiles (NHWC address,
  K tail, image-edge and tile-edge masks, 16-byte chunks), the warp/fragment layout and the
  epilogue's output addressing. Unwritten shared-memory slots are NaN, every output element
  must be written exactly once, and the result must equal F.conv2d in float64. Keep these
  functions in step with the CUDA sources (same names: decode_row, decode_k, a_offset, ...).
* GPU tests (``@pytest.mark.gpu``) of ``torch.ops.pyowt.conv2d_bias_act`` against a float64
  CPU reference, by relative L2 error.
The backward's kernels and GPU tests: test_conv2d_cuda_backward.py.
"""
import math
import random

import pytest
import torch
import torch.nn.functional as F

from ..utils import assert_close_rel, rel_err


def _reference(x, weight, bias, stride, padding, dilation, groups, activation):
    out = F.conv2d(x.double().cpu(), weight.double().cpu(), None if bias is None else bias.double().cpu(),
                   stride, padding, dilation, groups)
    return F.relu(out) if activation == "relu" else out


# ---------------------------------------------------------------------------------------
# CPU emulation of the kernels' indexing (integer math as in conv2d_common.cuh)
# ---------------------------------------------------------------------------------------
class _Params:
    """ConvParams of conv2d_common.cuh."""

    def __init__(self, x_shape, w_shape, stride, padding, dilation, ldw):
        self.N, self.C, self.H, self.W = x_shape
        self.Cout, _, self.R, self.S = w_shape
        (self.sh, self.sw), (self.ph, self.pw), (self.dh, self.dw) = stride, padding, dilation
        self.Ho = (self.H + 2 * self.ph - self.dh * (self.R - 1) - 1) // self.sh + 1
        self.Wo = (self.W + 2 * self.pw - self.dw * (self.S - 1) - 1) // self.sw + 1
        self.HoWo, self.HWC = self.Ho * self.Wo, self.H * self.W * self.C
        self.M, self.K, self.ldw = self.N * self.HoWo, self.R * self.S * self.C, ldw


def decode_row(p, m):
    ok = m < p.M
    mm = torch.where(ok, m, 0)
    n = mm // p.HoWo
    pix = mm - n * p.HoWo
    oh = pix // p.Wo
    ow = pix - oh * p.Wo
    return (n * p.HWC, oh * p.sh - p.ph, ow * p.sw - p.pw, ok)


def decode_k(p, k):
    rs = k // p.C
    c = k - rs * p.C
    r = rs // p.S
    return r, rs - r * p.S, c


def a_offset(p, row, r, s, c):
    base, ih0, iw0, row_ok = row
    ih, iw = ih0 + r * p.dh, iw0 + s * p.dw
    ok = row_ok & (ih >= 0) & (ih < p.H) & (iw >= 0) & (iw < p.W)
    return ok, torch.where(ok, base + (ih * p.W + iw) * p.C + c, 0)


def out_offset(p, m, co, nhwc_out):
    if nhwc_out:
        return m * p.Cout + co
    n = m // p.HoWo
    return (n * p.Cout + co) * p.HoWo + (m - n * p.HoWo)


def _gather(flat, ok, off, width):
    """flat[off + e] for e < width where ok, else 0; asserts every read is in bounds."""
    idx = off.unsqueeze(-1) + torch.arange(width)
    okw = ok.unsqueeze(-1).expand_as(idx)
    assert bool((idx[okw] >= 0).all() and (idx[okw] < flat.numel()).all()), "out-of-bounds read"
    return torch.where(okw, flat[torch.where(okw, idx, 0)], torch.zeros((), dtype=flat.dtype))


def _put(tile, count, blk, rows, cols, vals):
    """tile[blk, rows, cols] = vals, counting writes (a slot written twice is a bug)."""
    b, r, c = torch.broadcast_tensors(blk, rows, cols)
    tile[b, r, c] = vals.expand(b.shape).to(tile.dtype)
    count.index_put_((b, r, c), torch.ones(b.shape, dtype=count.dtype), accumulate=True)


def _epilogue(p, v, bias, co, relu):
    if bias is not None:
        v = v + bias[co]
    return torch.where(v < 0, torch.zeros_like(v), v) if relu else v


def emulate_tc(x, w, bias, stride, padding, dilation, relu, nhwc_out, vec_a, BN=64):
    """conv2d_tc_kernel with TileShape<BN> (BM=128, BN=64 or 128, BK=32, 128 threads, 2x2
    warps of 4 x BN/32 16x16 frags)."""
    BM, BK, LDS, NT = 128, 32, 40, 128
    LDC_ROW, LDC_COL = BN + 4, BM + 4
    SMEM = max(BM * LDC_ROW, BN * LDC_COL) * 4  # the epilogue's staging tile (kCBytes)
    K = x.shape[1] * w.shape[2] * w.shape[3]
    p = _Params(tuple(x.shape), tuple(w.shape), stride, padding, dilation, (K + 7) // 8 * 8)
    assert not vec_a or p.C % 8 == 0
    xf = x.permute(0, 2, 3, 1).reshape(-1)
    wk = torch.zeros(p.Cout, p.ldw, dtype=x.dtype)
    wk[:, :K] = w.permute(0, 2, 3, 1).reshape(p.Cout, K)
    wf = wk.reshape(-1)
    gm, gn, num_kt = -(-p.M // BM), -(-p.Cout // BN), -(-p.K // BK)
    bx, by, tid = torch.arange(gm)[:, None], torch.arange(gn)[:, None], torch.arange(NT)[None, :]
    ld_row, ld_col = tid >> 2, (tid & 3) * 8
    acc = torch.zeros(gm, gn, BM, BN, dtype=x.dtype)
    # vector loader: (k, r, s, c) of the next tile, advanced by BK as a mixed-radix addition
    va_k = ld_col
    va_r, va_s, va_c = decode_k(p, ld_col)
    va_dr, va_ds, va_dc = decode_k(p, BK)
    # vector loader's rows: the receptive field's corner and its offset, unsigned (mod 2**32)
    OUTSIDE, U32 = -(1 << 30), 1 << 32
    vrow_ih0, vrow_iw0, vrow_off = [], [], []
    for i in range(4):
        base, ih0, iw0, row_ok = decode_row(p, bx * BM + ld_row + 32 * i)
        vrow_ih0.append(torch.where(row_ok, ih0, OUTSIDE))
        vrow_iw0.append(iw0)
        vrow_off.append((base + (ih0 * p.W + iw0) * p.C) % U32)
    for kt in range(num_kt):
        As = torch.full((gm, BM, LDS), float("nan"), dtype=x.dtype)
        Bs = torch.full((gn, BN, LDS), float("nan"), dtype=x.dtype)
        a_cnt, b_cnt = torch.zeros(As.shape, dtype=torch.int32), torch.zeros(Bs.shape, dtype=torch.int32)
        if vec_a:
            assert bool((va_k == kt * BK + ld_col).all())
            rdh, sdw = va_r * p.dh, va_s * p.dw
            tap = ((rdh * p.W + sdw) * p.C + va_c) % U32
            for i in range(4):
                ih, iw = vrow_ih0[i] + rdh, vrow_iw0[i] + sdw  # unsigned(v) < n: 0 <= v < n
                ok = (va_k < p.K) & (ih >= 0) & (ih < p.H) & (iw >= 0) & (iw < p.W)
                off = torch.where(ok, (vrow_off[i] + tap) % U32, 0)
                # a chunk never straddles a pixel: its 8 channels are c .. c+7 < C
                assert bool(((off % p.C) + 7 < p.C)[ok].all())
                vals = _gather(xf, ok, off, 8)
                _put(As, a_cnt, bx[..., None], (ld_row + 32 * i)[..., None],
                     ld_col[..., None] + torch.arange(8), vals)
            va_k = va_k + BK
            va_c = va_c + va_dc
            carry_c = va_c >= p.C
            va_c = torch.where(carry_c, va_c - p.C, va_c)
            va_s = va_s + va_ds + carry_c.int()
            carry_s = va_s >= p.S
            va_s = torch.where(carry_s, va_s - p.S, va_s)
            va_r = va_r + va_dr + carry_s.int()
        else:  # one row per thread, 32 columns, (r, s, c) stepped incrementally
            row = decode_row(p, bx * BM + tid)
            k0 = kt * BK
            r, s, c = (torch.full_like(tid, v) for v in decode_k(p, torch.tensor(k0)))
            for kk in range(BK):
                ok, off = a_offset(p, row, r, s, c)
                ok = ok & (k0 + kk < p.K)
                _put(As, a_cnt, bx, tid, torch.tensor(kk), _gather(xf, ok, off, 1)[..., 0])
                c = c + 1
                wrap_c = c == p.C
                c = torch.where(wrap_c, 0, c)
                s = torch.where(wrap_c, s + 1, s)
                wrap_s = s == p.S
                s = torch.where(wrap_s, 0, s)
                r = torch.where(wrap_s, r + 1, r)
        k0 = kt * BK + ld_col
        for i in range(BN // 32):  # Tile::kBChunks
            co = by * BN + ld_row + 32 * i
            ok = (co < p.Cout) & (k0 < p.ldw)
            vals = _gather(wf, ok, torch.where(ok, co * p.ldw + k0, 0), 8)
            _put(Bs, b_cnt, by[..., None], (ld_row + 32 * i)[..., None], ld_col[..., None] + torch.arange(8), vals)
        # every slot the MMAs read written exactly once, the pad columns never
        assert bool((a_cnt[..., :BK] == 1).all() and (a_cnt[..., BK:] == 0).all())
        assert bool((b_cnt[..., :BK] == 1).all() and (b_cnt[..., BK:] == 0).all())
        for wm in range(2):
            for wn in range(2):
                for ks in range(BK // 16):
                    for i in range(4):
                        for j in range(BN // 32):
                            m0, n0 = wm * 64 + i * 16, wn * (BN // 2) + j * 16
                            fa = As[:, m0:m0 + 16, ks * 16:ks * 16 + 16]
                            fb = Bs[:, n0:n0 + 16, ks * 16:ks * 16 + 16]
                            acc[:, :, m0:m0 + 16, n0:n0 + 16] += torch.einsum("amk,bnk->abmn", fa, fb)
    # epilogue: fragments -> fp32 staging tile (row- or column-major) -> global
    out = torch.full((p.N * p.Cout * p.HoWo,), float("nan"), dtype=x.dtype)
    written = torch.zeros(out.shape, dtype=torch.int32)
    cs = torch.full((gm, gn, SMEM // 4), float("nan"), dtype=x.dtype)
    a, b = torch.arange(16)[:, None], torch.arange(16)[None, :]
    for m0 in range(0, BM, 16):
        for n0 in range(0, BN, 16):
            pos = (m0 + a) * LDC_ROW + n0 + b if nhwc_out else (n0 + b) * LDC_COL + m0 + a
            assert int(pos.max()) < SMEM // 4
            cs[:, :, pos] = acc[:, :, m0:m0 + 16, n0:n0 + 16]
    def store(ml, nl, v):
        m = torch.arange(gm)[:, None, None] * BM + ml
        co = torch.arange(gn)[None, :, None] * BN + nl
        ok = (m < p.M) & (co < p.Cout)
        off = out_offset(p, m, co, nhwc_out)[ok]
        out[off] = _epilogue(p, v.expand_as(ok)[ok], bias, co.expand_as(ok)[ok], relu)
        written.index_put_((off,), torch.ones_like(off, dtype=torch.int32), accumulate=True)

    if nhwc_out:  # runs of 8 channels of one pixel per thread and step
        for base in range(0, BM * BN // 8, NT):
            run = base + torch.arange(NT)
            ml, nl = run // (BN // 8), (run % (BN // 8)) * 8
            # the two 16-byte shared loads are aligned: 4-float boundaries
            assert bool(((ml * LDC_ROW + nl) % 4 == 0).all())
            for j in range(8):
                store(ml, nl + j, cs[:, :, ml * LDC_ROW + nl + j])
    else:
        for base in range(0, BM * BN, NT):
            idx = base + torch.arange(NT)
            nl, ml = idx // BM, idx % BM
            store(ml, nl, cs[:, :, nl * LDC_COL + ml])
    assert bool((written == 1).all()), "an output element was written zero or several times"
    shape = (p.N, p.Ho, p.Wo, p.Cout) if nhwc_out else (p.N, p.Cout, p.Ho, p.Wo)
    out = out.view(shape)
    return out.permute(0, 3, 1, 2) if nhwc_out else out


def emulate_simt(x, w, bias, stride, padding, dilation, relu, nhwc_out):
    """conv2d_simt_kernel (BM=BN=64, BK=16, 256 threads, 4x4 register blocks)."""
    K = x.shape[1] * w.shape[2] * w.shape[3]
    p = _Params(tuple(x.shape), tuple(w.shape), stride, padding, dilation, K)
    xf = x.permute(0, 2, 3, 1).reshape(-1)
    wf = w.permute(0, 2, 3, 1).reshape(-1)
    return emulate_simt_gemm(p, xf, wf, bias, relu, nhwc_out, decode_row, a_offset)


def emulate_simt_gemm(p, xf, wf, bias, relu, nhwc_out, row_decoder, a_offsetter):
    """conv2d_simt_kernel's GEMM over the flat NHWC ``xf`` and (Cout, ldw) ``wf`` with
    params ``p``; the row decoder and A offset are the forward's or (kDgrad) the data
    gradient's. Returns the output in NCHW order (a view of NHWC memory when nhwc_out)."""
    BM, BN, BK, NT, LDA = 64, 64, 16, 256, 68
    gm, gn, num_kt = -(-p.M // BM), -(-p.Cout // BN), -(-p.K // BK)
    bx, by, tid = torch.arange(gm)[:, None], torch.arange(gn)[:, None], torch.arange(NT)[None, :]
    ld_k, ld_row = tid % BK, tid // BK
    acc = torch.zeros(gm, gn, 16, 16, 4, 4, dtype=xf.dtype)  # [block m][block n][tm][tn][i][j]
    for kt in range(num_kt):
        As = torch.full((gm, BK, LDA), float("nan"), dtype=xf.dtype)
        Bs = torch.full((gn, BK, LDA), float("nan"), dtype=xf.dtype)
        a_cnt, b_cnt = torch.zeros(As.shape, dtype=torch.int32), torch.zeros(Bs.shape, dtype=torch.int32)
        k = kt * BK + ld_k
        r, s, c = decode_k(p, k)
        for i in range(4):
            ok, off = a_offsetter(p, row_decoder(p, bx * BM + ld_row + 16 * i), r, s, c)
            ok = ok & (k < p.K)
            _put(As, a_cnt, bx, ld_k, ld_row + 16 * i, _gather(xf, ok, off, 1)[..., 0])
            co = by * BN + ld_row + 16 * i
            wok = (k < p.K) & (co < p.Cout)
            _put(Bs, b_cnt, by, ld_k, ld_row + 16 * i,
                 _gather(wf, wok, torch.where(wok, co * p.ldw + k, 0), 1)[..., 0])
        assert bool((a_cnt[..., :BM] == 1).all() and (b_cnt[..., :BN] == 1).all())
        a4 = As[:, :, :BM].reshape(gm, BK, 16, 4)  # [kk][tm][i] = As[kk][tm*4 + i]
        b4 = Bs[:, :, :BN].reshape(gn, BK, 16, 4)
        acc += torch.einsum("aksi,bktj->abstij", a4, b4)
    out = torch.full((p.N * p.Cout * p.HoWo,), float("nan"), dtype=xf.dtype)
    written = torch.zeros(out.shape, dtype=torch.int32)
    tm, tn = tid[0] // 16, tid[0] % 16
    for i in range(4):
        for j in range(4):
            m = torch.arange(gm)[:, None, None] * BM + tm * 4 + i
            co = torch.arange(gn)[None, :, None] * BN + tn * 4 + j
            v = acc[:, :, tm, tn, i, j]
            ok = (m < p.M) & (co < p.Cout)
            off = out_offset(p, m, co, nhwc_out)[ok]
            out[off] = _epilogue(p, v.expand_as(ok)[ok], bias, co.expand_as(ok)[ok], relu)
            written.index_put_((off,), torch.ones_like(off, dtype=torch.int32), accumulate=True)
    assert bool((written == 1).all()), "an output element was written zero or several times"
    shape = (p.N, p.Ho, p.Wo, p.Cout) if nhwc_out else (p.N, p.Cout, p.Ho, p.Wo)
    out = out.view(shape)
    return out.permute(0, 3, 1, 2) if nhwc_out else out


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
        for bn in (64, 128):
            runs[f"tc 128x{bn} scalar A"] = emulate_tc(x, w, bias, stride, padding, dilation, relu,
                                                       nhwc_out, False, bn)
            if c % 8 == 0:
                runs[f"tc 128x{bn} vector A"] = emulate_tc(x, w, bias, stride, padding, dilation, relu,
                                                           nhwc_out, True, bn)
        for name, out in runs.items():
            assert out.shape == ref.shape, name
            assert rel_err(out, ref) < 1e-12, f"{name}: relative error {rel_err(out, ref):.3g}"


def emulate_tc_vector_pipeline(num_kt, stages=3):
    """The vector path's cp.async pipeline (conv2d_tc_kernel, kVecStages) as events per
    thread-uniform step: which tile each stage holds, which commit groups are in flight.
    Asserts: compute(kt) reads a stage holding tile kt whose group has completed; a stage
    is refilled only after the barrier that follows every read of its previous tile.
    Returns the tiles computed, in order."""
    holds = [None] * stages        # tile whose copies target each stage
    groups = []                    # tile per committed group (None: empty group)
    completed = 0                  # groups known complete (cp.async.wait_group)
    last_read = [None] * stages    # iteration that last computed on each stage
    computed = []

    def issue(tile, stage, iteration):
        # the stage's previous tile was last read in an iteration before this barrier
        assert last_read[stage] is None or last_read[stage] < iteration, (tile, stage)
        holds[stage] = tile

    for t in range(stages - 1):                       # prologue
        if t < num_kt:
            issue(t, t, -1)
        groups.append(t if t < num_kt else None)
    stage = 0
    for kt in range(num_kt):
        completed = max(completed, len(groups) - (stages - 2))   # wait_group<stages - 2>
        # (barrier)
        nxt = kt + stages - 1
        if nxt < num_kt:
            issue(nxt, stage - 1 if stage else stages - 1, kt)
        groups.append(nxt if nxt < num_kt else None)   # commit, possibly empty
        assert holds[stage] == kt, f"iteration {kt} computes on stage {stage} holding {holds[stage]}"
        assert kt in groups[:completed], f"tile {kt} read before its copies completed"
        last_read[stage] = kt
        computed.append(kt)
        stage = 0 if stage == stages - 1 else stage + 1
    return computed


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
    """Force the tensor-core kernel's tile shape (PYOWT_CUDA_CONV_TILE) for the test."""
    monkeypatch.setenv("PYOWT_CUDA_CONV_TILE", request.param)
    return request.param


# fp32 runs the SIMT kernel (no tile choice); each 16-bit dtype runs both tile shapes.
DTYPE_TILES = [(torch.float32, "auto")] + [(d, t) for d in DTYPES[1:] for t in ("128x64", "128x128")]
DTYPE_TILE_IDS = [f"{DTYPE_IDS[d]}-{t}" for d, t in DTYPE_TILES]


@pytest.mark.gpu
@pytest.mark.parametrize("tf32", [True], indirect=True)  # our fp32 kernel must ignore TF32
@pytest.mark.parametrize("dtype,tile", DTYPE_TILES, ids=DTYPE_TILE_IDS, indirect=["tile"])
@pytest.mark.parametrize("index", range(len(CONFIGS)))
def test_forward_random_configs(conv_cuda_ops, tf32, dtype, tile, index):
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
    # Both shapes sum every output's k in the same order (K tiles in sequence, the same
    # fragments), so they agree bit for bit; "auto" (timed on the first call, cached after)
    # returns one of them on every call.
    cases = [{**ALEXNET[2], "channels_last": True}, {**ALEXNET[1], "channels_last": False},
             {**CONFIGS[4], "channels_last": True}, {**ALEXNET[0], "channels_last": True}]
    for cfg in cases:
        x, w, b, args = _inputs(cfg, dtype)
        outs = {}
        for t in ("128x64", "128x128", "auto", "auto"):
            monkeypatch.setenv("PYOWT_CUDA_CONV_TILE", t)
            outs.setdefault(t, []).append(conv_cuda_ops[0](x, w, b, *args))
        assert torch.equal(outs["128x64"][0], outs["128x128"][0]), cfg
        for auto in outs["auto"]:
            assert torch.equal(auto, outs["128x64"][0]), cfg
    monkeypatch.setenv("PYOWT_CUDA_CONV_TILE", "256x64")
    with pytest.raises(RuntimeError, match=r'PYOWT_CUDA_CONV_TILE must be "auto", "128x64" or "128x128", '
                                           r'got "256x64"'):
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
