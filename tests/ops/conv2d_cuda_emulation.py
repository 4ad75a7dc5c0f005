"""CPU emulation of the CUDA conv kernels' exact index arithmetic (csrc/cuda/conv2d*.cu[h]).

Each function mirrors one kernel - integer math as in conv2d_common.cuh, every thread's
share of the shared-memory tiles (NHWC address, K tail, image-edge and tile-edge masks,
16-byte chunks), the warp/fragment layout, the epilogue's output addressing - over whole
grids at once with torch ops on CPU tensors. Unwritten shared-memory slots are NaN and
every output element must be written exactly once, so a wrong index shows up as a NaN, a
double write or a wrong value. Keep these functions in step with the CUDA sources (same
names: decode_row, decode_k, a_offset, ...); tests/ops/test_conv2d_cuda.py and
test_conv2d_cuda_backward.py compare them with F.conv2d and autograd in float64.
"""
import copy

import torch


# ---------------------------------------------------------------------------------------
# The forward (conv2d_tc_kernel, conv2d_simt_kernel)
# ---------------------------------------------------------------------------------------
class ConvParams:
    """ConvParams of conv2d_common.cuh."""

    def __init__(self, x_shape, w_shape, stride, padding, dilation, ldw):
        self.N, self.C, self.H, self.W = x_shape
        self.Cout, _, self.R, self.S = w_shape
        (self.sh, self.sw), (self.ph, self.pw), (self.dh, self.dw) = stride, padding, dilation
        self.Ho = (self.H + 2 * self.ph - self.dh * (self.R - 1) - 1) // self.sh + 1
        self.Wo = (self.W + 2 * self.pw - self.dw * (self.S - 1) - 1) // self.sw + 1
        self.HoWo, self.HWC = self.Ho * self.Wo, self.H * self.W * self.C
        self.M, self.K, self.ldw = self.N * self.HoWo, self.R * self.S * self.C, ldw


def split_row(p, m):
    ok = m < p.M
    mm = torch.where(ok, m, 0)
    n = mm // p.HoWo
    pix = mm - n * p.HoWo
    y = pix // p.Wo
    return n, y, pix - y * p.Wo, ok


def decode_row(p, m):
    n, oh, ow, ok = split_row(p, m)
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


def gather(flat, ok, off, width):
    """flat[off + e] for e < width where ok, else 0; asserts every read is in bounds."""
    idx = off.unsqueeze(-1) + torch.arange(width)
    okw = ok.unsqueeze(-1).expand_as(idx)
    assert bool((idx[okw] >= 0).all() and (idx[okw] < flat.numel()).all()), "out-of-bounds read"
    return torch.where(okw, flat[torch.where(okw, idx, 0)], torch.zeros((), dtype=flat.dtype))


def put(tile, count, blk, rows, cols, vals):
    """tile[blk, rows, cols] = vals, counting writes (a slot written twice is a bug)."""
    b, r, c = torch.broadcast_tensors(blk, rows, cols)
    tile[b, r, c] = vals.expand(b.shape).to(tile.dtype)
    count.index_put_((b, r, c), torch.ones(b.shape, dtype=count.dtype), accumulate=True)


def epilogue(p, v, bias, co, relu):
    if bias is not None:
        v = v + bias[co]
    return torch.where(v < 0, torch.zeros_like(v), v) if relu else v


def wgmma_operand(stage, first_row, rows, ks):
    """What a wgmma descriptor of conv2d_wgmma.cuh reads: the rows x 16 K-major operand
    starting at row ``first_row`` (a multiple of 8) of a 128B-swizzled stage, k16 step
    ``ks``. ``stage``: (blocks, stage elements) 16-bit words. The hardware's view: row r,
    column kk at byte (first_row + r) * 128 + ks * 32 + kk * 2 of the 1024-aligned stage
    (8-row groups 1024 bytes apart, the descriptor's stride), then bits 4-6 of the address
    XOR bits 7-9 (the 128-byte swizzle)."""
    r, kk = torch.arange(rows)[:, None], torch.arange(16)[None, :]
    addr = first_row * 128 + (r // 8) * 1024 + (r % 8) * 128 + ks * 32 + kk * 2
    physical = addr ^ (((addr >> 7) & 7) << 4)
    return stage[:, physical // 2]


def wgmma_accumulator_slot(warp, lane, i):
    """(row, column) of D that accumulator ``i`` of thread (warp, lane) holds in an m64nN
    wgmma (conv2d_wgmma.cuh): register i = g8*4 + h*2 + j."""
    return warp * 16 + lane // 4 + 8 * ((i >> 1) & 1), (i >> 2) * 8 + 2 * (lane % 4) + (i & 1)


def emulate_tc(x, w, bias, stride, padding, dilation, relu, nhwc_out, vec_a, BN=64, BK=32, wgmma=False):
    """conv2d_tc_kernel with TileShape<BN, BK, wgmma> (BM=128, BN=64, 96 or 128, BK=32 or 64
    (vector loader only), 128 threads; WMMA: 2x2 warps of 4 x BN/32 16x16 frags; wgmma
    (BK=64, vector loader): one warpgroup, two m64 x BN halves, 128B-swizzled stages)."""
    BM, NT = 128, 128
    assert BK == 32 or vec_a, "K steps of 64 exist for the vector loader only"
    assert not wgmma or (BK == 64 and vec_a), "wgmma tiles: K steps of 64, vector loader"
    LDS = BK if wgmma else BK + 8
    CHUNKS16 = BK // 8                 # Tile::kChunks16
    ROWS_PER_PASS = NT // CHUNKS16     # Tile::kRowsPerPass
    LDC_ROW, LDC_COL = BN + 4, BM + 4
    SMEM = max(BM * LDC_ROW, BN * LDC_COL) * 4  # the epilogue's staging tile (kCBytes)
    K = x.shape[1] * w.shape[2] * w.shape[3]
    p = ConvParams(tuple(x.shape), tuple(w.shape), stride, padding, dilation, (K + 7) // 8 * 8)
    assert not vec_a or p.C % 8 == 0
    xf = x.permute(0, 2, 3, 1).reshape(-1)
    wk = torch.zeros(p.Cout, p.ldw, dtype=x.dtype)
    wk[:, :K] = w.permute(0, 2, 3, 1).reshape(p.Cout, K)
    wf = wk.reshape(-1)
    gm, gn, num_kt = -(-p.M // BM), -(-p.Cout // BN), -(-p.K // BK)
    bx, by, tid = torch.arange(gm)[:, None], torch.arange(gn)[:, None], torch.arange(NT)[None, :]
    ld_row, ld_col = tid // CHUNKS16, (tid % CHUNKS16) * 8
    # the shared column of the thread's chunk: swizzled by its first row (kernel: chunk_slot)
    slot_col = (((ld_col >> 3) ^ (ld_row & 7)) << 3) if wgmma else ld_col
    acc = torch.zeros(gm, gn, BM, BN, dtype=x.dtype)
    # vector loader: (k, r, s, c) of the next tile, advanced by BK as a mixed-radix addition
    va_k = ld_col
    va_r, va_s, va_c = decode_k(p, ld_col)
    va_dr, va_ds, va_dc = decode_k(p, BK)
    # vector loader's rows: the receptive field's corner and its offset, unsigned (mod 2**32)
    OUTSIDE, U32 = -(1 << 30), 1 << 32
    vrow_ih0, vrow_iw0, vrow_off = [], [], []
    for i in range(BM // ROWS_PER_PASS):  # Tile::kAChunks
        base, ih0, iw0, row_ok = decode_row(p, bx * BM + ld_row + ROWS_PER_PASS * i)
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
            for i in range(len(vrow_off)):
                ih, iw = vrow_ih0[i] + rdh, vrow_iw0[i] + sdw  # unsigned(v) < n: 0 <= v < n
                ok = (va_k < p.K) & (ih >= 0) & (ih < p.H) & (iw >= 0) & (iw < p.W)
                off = torch.where(ok, (vrow_off[i] + tap) % U32, 0)
                # a chunk never straddles a pixel: its 8 channels are c .. c+7 < C
                assert bool(((off % p.C) + 7 < p.C)[ok].all())
                vals = gather(xf, ok, off, 8)
                put(As, a_cnt, bx[..., None], (ld_row + ROWS_PER_PASS * i)[..., None],
                    slot_col[..., None] + torch.arange(8), vals)
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
                put(As, a_cnt, bx, tid, torch.tensor(kk), gather(xf, ok, off, 1)[..., 0])
                c = c + 1
                wrap_c = c == p.C
                c = torch.where(wrap_c, 0, c)
                s = torch.where(wrap_c, s + 1, s)
                wrap_s = s == p.S
                s = torch.where(wrap_s, 0, s)
                r = torch.where(wrap_s, r + 1, r)
        k0 = kt * BK + ld_col
        for i in range(BN // ROWS_PER_PASS):  # Tile::kBChunks
            co = by * BN + ld_row + ROWS_PER_PASS * i
            ok = (co < p.Cout) & (k0 < p.ldw)
            vals = gather(wf, ok, torch.where(ok, co * p.ldw + k0, 0), 8)
            put(Bs, b_cnt, by[..., None], (ld_row + ROWS_PER_PASS * i)[..., None],
                slot_col[..., None] + torch.arange(8), vals)
        # every slot the MMAs read written exactly once, the pad columns never
        assert bool((a_cnt[..., :BK] == 1).all() and (a_cnt[..., BK:] == 0).all())
        assert bool((b_cnt[..., :BK] == 1).all() and (b_cnt[..., BK:] == 0).all())
        if wgmma:
            a_flat, b_flat = As.reshape(gm, -1), Bs.reshape(gn, -1)
            for ks in range(BK // 16):
                fb = wgmma_operand(b_flat, 0, BN, ks)
                for h in range(2):
                    fa = wgmma_operand(a_flat, h * 64, 64, ks)
                    acc[:, :, h * 64:h * 64 + 64, :] += torch.einsum("amk,bnk->abmn", fa, fb)
            continue
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
    if wgmma:  # each thread stores its accumulators: every slot of the tile exactly once
        cs_cnt = torch.zeros(SMEM // 4, dtype=torch.int32)
        warp, lane = tid[0] // 32, tid[0] % 32
        for h in range(2):
            for i in range(BN // 2):
                row, col = wgmma_accumulator_slot(warp, lane, i)
                ml, nl = h * 64 + row, col
                pos = ml * LDC_ROW + nl if nhwc_out else nl * LDC_COL + ml
                cs[:, :, pos] = acc[:, :, ml, nl]
                cs_cnt.index_put_((pos,), torch.ones_like(pos, dtype=torch.int32), accumulate=True)
        tile_pos = ((torch.arange(BM)[:, None] * LDC_ROW + torch.arange(BN)) if nhwc_out
                    else (torch.arange(BN)[:, None] * LDC_COL + torch.arange(BM)))
        assert bool((cs_cnt[tile_pos] == 1).all()) and int(cs_cnt.sum()) == BM * BN
    else:  # WMMA: 16x16 fragments stored row- or column-major
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
        out[off] = epilogue(p, v.expand_as(ok)[ok], bias, co.expand_as(ok)[ok], relu)
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
    p = ConvParams(tuple(x.shape), tuple(w.shape), stride, padding, dilation, K)
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
            put(As, a_cnt, bx, ld_k, ld_row + 16 * i, gather(xf, ok, off, 1)[..., 0])
            co = by * BN + ld_row + 16 * i
            wok = (k < p.K) & (co < p.Cout)
            put(Bs, b_cnt, by, ld_k, ld_row + 16 * i,
                 gather(wf, wok, torch.where(wok, co * p.ldw + k, 0), 1)[..., 0])
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
            out[off] = epilogue(p, v.expand_as(ok)[ok], bias, co.expand_as(ok)[ok], relu)
            written.index_put_((off,), torch.ones_like(off, dtype=torch.int32), accumulate=True)
    assert bool((written == 1).all()), "an output element was written zero or several times"
    shape = (p.N, p.Ho, p.Wo, p.Cout) if nhwc_out else (p.N, p.Cout, p.Ho, p.Wo)
    out = out.view(shape)
    return out.permute(0, 3, 1, 2) if nhwc_out else out


def emulate_tc_vector_pipeline(num_kt, stages=3):
    """The vector path's cp.async pipeline (conv2d_tc_kernel, kVecStages) as events per
    thread-uniform step: which tile each stage holds, which commit groups are in flight.
    Asserts: compute(kt) reads a stage holding tile kt whose group has completed; a stage
    is refilled only after the barrier that follows every read of its previous tile. (The
    wgmma tiles read stage kt while the iteration's loads are issued: that the stage still
    holds tile kt after them covers it.) Returns the tiles computed, in order."""
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


def cdiv(a, b):
    return -(-a // b)


# ---------------------------------------------------------------------------------------
# The data gradient: conv2d_simt_kernel<kNhwcOut, /*kDgrad=*/true>
# ---------------------------------------------------------------------------------------
def dgrad_params(x_shape, w_shape, stride, padding, dilation):
    """ConvParams of the data-gradient GEMM (make_params(dgrad_geometry(g)))."""
    f = ConvParams(x_shape, w_shape, stride, padding, dilation, 0)
    t = copy.copy(f)
    t.C, t.H, t.W, t.Cout, t.Ho, t.Wo = f.Cout, f.Ho, f.Wo, f.C, f.H, f.W
    t.HoWo, t.HWC = f.H * f.W, f.Ho * f.Wo * f.Cout
    t.M, t.K = f.N * f.H * f.W, f.R * f.S * f.Cout
    t.ldw = t.K
    return t


def decode_row_dgrad(p, m):
    n, ih, iw, ok = split_row(p, m)
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
# conv2d_wgrad_simt_kernel: kWgradBCo, kWgradBK, kWgradRows, kWgradThreads, kWgradLd
WGRAD_BCO, WGRAD_BK, WGRAD_ROWS, WGRAD_NT, WGRAD_LD = 64, 64, 16, 256, 68


def wgrad_slicing(M, K, cout, sms):
    """(slices, rows per slice) as wgrad_splits / wgrad_simt choose them."""
    tiles = cdiv(K, WGRAD_BK) * cdiv(cout, WGRAD_BCO)
    wanted = cdiv(4 * sms, tiles)
    splits = max(1, min(wanted, max(1, M // 256), max(1, ((1 << 30) - 1) // (cout * K)), 64))
    m_per_split = cdiv(cdiv(M, splits), WGRAD_ROWS) * WGRAD_ROWS
    return cdiv(M, m_per_split), m_per_split


def emulate_wgrad(x, grad_pre, w_shape, stride, padding, dilation, m_per_split):
    """grad_weight (C_out, C_in, R, S) from conv2d_wgrad_simt_kernel's slices, summed."""
    K = x.shape[1] * w_shape[2] * w_shape[3]
    p = ConvParams(tuple(x.shape), tuple(w_shape), stride, padding, dilation, K)
    xf = x.permute(0, 2, 3, 1).reshape(-1)
    gf = grad_pre.permute(0, 2, 3, 1).reshape(-1)
    splits = cdiv(p.M, m_per_split)
    gk, gc = cdiv(p.K, WGRAD_BK), cdiv(p.Cout, WGRAD_BCO)
    tid = torch.arange(WGRAD_NT)
    ld_row, ld_col = tid // 16, (tid % 16) * 4
    tm, tn = tid // (WGRAD_BK // 4), tid % (WGRAD_BK // 4)
    partial = torch.full((splits * p.Cout * p.K,), float("nan"), dtype=x.dtype)
    written = torch.zeros(partial.shape, dtype=torch.int32)
    for z in range(splits):
        m_begin = z * m_per_split
        m_end = min(p.M, m_begin + m_per_split)
        num_steps = cdiv(m_end - m_begin, WGRAD_ROWS) if m_end > m_begin else 0
        # blocks (k block bx, co block by) flattened to blk = by * gk + bx
        bx = torch.arange(gk).repeat(gc)[:, None]
        by = torch.arange(gc).repeat_interleave(gk)[:, None]
        acc = torch.zeros(gc * gk, 16, 16, 4, 4, dtype=x.dtype)  # [blk][tm][tn][i][j]
        for step in range(num_steps):
            As = torch.full((gc * gk, WGRAD_ROWS, WGRAD_LD), float("nan"), dtype=x.dtype)
            Gs = torch.full((gc * gk, WGRAD_ROWS, WGRAD_LD), float("nan"), dtype=x.dtype)
            a_cnt, g_cnt = torch.zeros(As.shape, dtype=torch.int32), torch.zeros(Gs.shape, dtype=torch.int32)
            blk = torch.arange(gc * gk)[:, None]
            m = m_begin + step * WGRAD_ROWS + ld_row
            row = decode_row(p, torch.where(m < m_end, m, p.M))
            for j in range(4):
                k = bx * WGRAD_BK + ld_col + j
                k_ok = k < p.K
                r, s, c = decode_k(p, torch.where(k_ok, k, 0))
                ok, off = a_offset(p, row, r, s, c)
                ok = ok & k_ok
                put(As, a_cnt, blk, ld_row, ld_col + j, gather(xf, ok, off, 1)[..., 0])
                co = by * WGRAD_BCO + ld_col + j
                g_ok = row[3] & (co < p.Cout)
                put(Gs, g_cnt, blk, ld_row, ld_col + j,
                     gather(gf, g_ok, torch.where(g_ok, m * p.Cout + co, 0), 1)[..., 0])
            assert bool((a_cnt[..., :WGRAD_BK] == 1).all() and (a_cnt[..., WGRAD_BK:] == 0).all())
            assert bool((g_cnt[..., :WGRAD_BCO] == 1).all() and (g_cnt[..., WGRAD_BCO:] == 0).all())
            g4 = Gs[:, :, :WGRAD_BCO].reshape(-1, WGRAD_ROWS, 16, 4)  # [kk][tm][i] = Gs[kk][tm*4 + i]
            a4 = As[:, :, :WGRAD_BK].reshape(-1, WGRAD_ROWS, 16, 4)
            acc += torch.einsum("bksi,bktj->bstij", g4, a4)
        for i in range(4):
            for j in range(4):
                co = by * WGRAD_BCO + tm * 4 + i
                k = bx * WGRAD_BK + tn * 4 + j
                ok = (co < p.Cout) & (k < p.K)
                dst = (z * p.Cout * p.K + co * p.K + k)[ok]
                partial[dst] = acc[:, tm, tn, i, j][ok]
                written.index_put_((dst,), torch.ones_like(dst, dtype=torch.int32), accumulate=True)
    assert bool((written == 1).all()), "a partial element was written zero or several times"
    grad_w = partial.view(splits, p.Cout, p.K).sum(0)  # the host's at::sum_out over slices
    return grad_w.view(p.Cout, p.R, p.S, p.C).permute(0, 3, 1, 2)
