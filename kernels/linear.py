"""Triton GEMMs for y = act(x @ w^T + b) and its backward.

Shapes: x (M, K), w (N, K), y and grad_out (M, N); any strides (passed explicitly).

* forward: y tile (BLOCK_M x BLOCK_N), reduction over K; bias and ReLU in the epilogue.
* dX = G @ w, dW = G^T @ x, G = grad_out * (out > 0): the mask is applied in the prologue
  (each grad_out tile is loaded with the matching `out` tile and zeroed where out <= 0), so G
  is never written to memory. The bias gradient, the column sums of G, is fused into the
  dW kernel: the programs of the first dW column block see every row of G for their
  features anyway, so they also sum it (float32) and store grad_bias.

Programs are ordered in groups of GROUP_M row blocks (the "grouped ordering" / L2 swizzle):
consecutive programs share the same B tiles and a few A tiles, which stay in L2.

Every kernel computes in float32. float32 inputs use ``input_precision="ieee"`` (no TF32),
so they match a float64 reference to ~1e-6.

Autotuning: a handful of configs on a GPU for problems of at least ``TUNE_MIN_MACS``
multiply-adds, one fixed config below that; under the interpreter (``TRITON_INTERPRET=1``,
CPU tensors) a single tiny config.
The launchers take ``launch`` (``torch.library.wrap_triton``) so the calls trace under
torch.compile; None in eager mode, where a launch whose sizes, strides, dtypes and flags
were seen before passes only its tensors, and from its third call relaunches the compiled
kernel without Triton's ``JITFunction.run`` (kernels.autotuned.launch_from_memo,
kernels.relaunch; ``PYOWT_TRITON_RELAUNCH=0`` turns the relaunch off).
"""
import torch
import triton
import triton.language as tl

from . import ceil_div, interpreter_enabled
from .autotuned import LaunchMemos, launch_and_remember, launch_from_memo


# Problems below this many multiply-adds run one fixed tile config instead of autotuning:
# big tiles only waste work on them, and every autotuned config costs a compile per
# specialization (the GPU tests' many odd little shapes would otherwise compile hundreds).
TUNE_MIN_MACS = 1 << 27


def _small_config():
    if interpreter_enabled():  # the interpreter is slow and timing it is moot: tiny tiles
        return triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 4},
                             num_warps=1, num_stages=1)
    return triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8},
                         num_warps=4, num_stages=3)


def _tuned_configs(fp32: bool):
    if interpreter_enabled():
        return [_small_config()]
    if fp32:
        # float32 in "ieee" precision runs on FMA units, not tensor cores: smaller tiles.
        # (The 16-bit tiles below take 30-40 s each to compile for fp32 on sm_90 and need
        # more shared memory than an H100 has.)
        shapes = [(128, 64, 32, 3, 4), (64, 128, 32, 3, 4), (128, 128, 32, 3, 8), (64, 64, 32, 4, 4)]
    else:
        # (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps). Each config costs 0.5-2 s of
        # compile per kernel and specialization on sm_90 (measured ahead of time, Triton
        # 3.8): four keep the GPU check within its time budget.
        shapes = [
            (128, 256, 64, 3, 8),
            (128, 128, 64, 4, 4),
            (128, 128, 32, 4, 8),
            (64, 128, 32, 4, 4),
        ]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8},
                          num_stages=st, num_warps=w) for m, n, k, st, w in shapes]


def _variants(kernel):
    """Launchable versions of one @triton.jit kernel (sharing its compile cache): a fixed
    config for small problems, autotuned ones for 16-bit and for float32 inputs."""
    key = ["M", "N", "K"]
    return {"small": triton.autotune(configs=[_small_config()], key=key)(kernel),
            "tuned16": triton.autotune(configs=_tuned_configs(False), key=key)(kernel),
            "tuned32": triton.autotune(configs=_tuned_configs(True), key=key)(kernel)}


def _pick(variants, macs: int, dtype: torch.dtype):
    if macs < TUNE_MIN_MACS:
        return variants["small"]
    return variants["tuned32" if dtype == torch.float32 else "tuned16"]


@triton.jit
def _tile_coords(pid, rows, cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 GROUP_M: tl.constexpr):
    """(row block, column block) of program ``pid`` in grouped order."""
    blocks_m = tl.cdiv(rows, BLOCK_M)
    blocks_n = tl.cdiv(cols, BLOCK_N)
    per_group = GROUP_M * blocks_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(blocks_m - first_m, GROUP_M)
    local = pid % per_group
    return first_m + local % group_m, local // group_m


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    # One return at the end: early returns under constexpr branches are not portable across
    # Triton versions' code generators.
    if IEEE:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def linear_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K,
                      stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
                      HAS_BIAS: tl.constexpr, RELU: tl.constexpr, IEEE: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP_M: tl.constexpr):
    pid_m, pid_n = _tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :] * stride_xk,
                    mask=mask_m[:, None] & (kk[None, :] < K), other=0.0)
        b = tl.load(w_ptr + kk[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                    mask=(kk[:, None] < K) & mask_n[None, :], other=0.0)
        acc = _dot(a, b, acc, IEEE)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if RELU:
        acc = tl.maximum(acc, 0.0)
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def linear_dx_kernel(g_ptr, o_ptr, w_ptr, dx_ptr, M, N, K,
                     stride_gm, stride_gn, stride_om, stride_on, stride_wn, stride_wk,
                     stride_dm, stride_dk,
                     RELU: tl.constexpr, IEEE: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_M: tl.constexpr):
    """dX (M, K) = G (M, N) @ w (N, K); tiles BLOCK_M x BLOCK_N of dX, reduction over N
    in steps of BLOCK_K (the names follow the output, not the op's M/N/K)."""
    pid_m, pid_k = _tile_coords(tl.program_id(0), M, K, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_k = offs_k < K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_K):
        nn = n0 + offs_r
        gmask = mask_m[:, None] & (nn[None, :] < N)
        g = tl.load(g_ptr + offs_m[:, None] * stride_gm + nn[None, :] * stride_gn, mask=gmask, other=0.0)
        if RELU:
            o = tl.load(o_ptr + offs_m[:, None] * stride_om + nn[None, :] * stride_on, mask=gmask, other=0.0)
            g = tl.where(o > 0, g, tl.zeros_like(g))
        w = tl.load(w_ptr + nn[:, None] * stride_wn + offs_k[None, :] * stride_wk,
                    mask=(nn[:, None] < N) & mask_k[None, :], other=0.0)
        acc = _dot(g, w, acc, IEEE)
    tl.store(dx_ptr + offs_m[:, None] * stride_dm + offs_k[None, :] * stride_dk,
             acc.to(dx_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_k[None, :])


@triton.jit
def linear_dw_kernel(g_ptr, o_ptr, x_ptr, dw_ptr, db_ptr, M, N, K,
                     stride_gm, stride_gn, stride_om, stride_on, stride_xm, stride_xk,
                     stride_dn, stride_dk,
                     RELU: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_M: tl.constexpr):
    """dW (N, K) = G^T (N, M) @ x (M, K) and db (N,) = column sums of G; tiles
    BLOCK_M x BLOCK_N of dW, reduction over M in steps of BLOCK_K."""
    pid = tl.program_id(0)
    pid_n, pid_k = _tile_coords(pid, N, K, BLOCK_M, BLOCK_N, GROUP_M)
    offs_n = pid_n * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    mask_k = offs_k < K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    db = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_K):
        mm = m0 + offs_r
        gmask = mask_n[:, None] & (mm[None, :] < M)
        # G^T tile (BLOCK_M features x BLOCK_K rows), read straight from row-major grad_out.
        g = tl.load(g_ptr + offs_n[:, None] * stride_gn + mm[None, :] * stride_gm, mask=gmask, other=0.0)
        if RELU:
            o = tl.load(o_ptr + offs_n[:, None] * stride_on + mm[None, :] * stride_om, mask=gmask, other=0.0)
            g = tl.where(o > 0, g, tl.zeros_like(g))
        x = tl.load(x_ptr + mm[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=(mm[:, None] < M) & mask_k[None, :], other=0.0)
        acc = _dot(g, x, acc, IEEE)
        if HAS_BIAS:
            db += tl.sum(g.to(tl.float32), axis=1)
    tl.store(dw_ptr + offs_n[:, None] * stride_dn + offs_k[None, :] * stride_dk,
             acc.to(dw_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_k[None, :])
    if HAS_BIAS:
        # Every column block computed the same sums; the first one stores them.
        tl.store(db_ptr + offs_n, db.to(db_ptr.dtype.element_ty), mask=mask_n & (pid_k == 0))


_FWD = _variants(linear_fwd_kernel)
_DX = _variants(linear_dx_kernel)
_DW = _variants(linear_dw_kernel)


def _grid(rows: int, cols: int):
    return lambda meta: (ceil_div(rows, meta["BLOCK_M"]) * ceil_div(cols, meta["BLOCK_N"]),)


# Eager launches seen before, by (which GEMM, its tensors' sizes, strides and dtypes, flags,
# device).
_MEMOS = LaunchMemos()


def launch_linear_fwd(launch, x: torch.Tensor, w: torch.Tensor, bias, y: torch.Tensor, relu: bool) -> None:
    """y (M, N) = act(x (M, K) @ w (N, K)^T + bias); ``bias`` (N,) or None."""
    M, K = x.shape
    N = w.shape[0]
    if M == 0 or N == 0:
        return
    b = bias if bias is not None else y
    kernel = _pick(_FWD, M * N * K, x.dtype)
    tensors = (x, w, b, y)
    memo = _MEMOS.for_launch(launch, ("fwd", M, N, K, x.stride(), w.stride(), y.stride(), x.dtype, w.dtype,
                                      b.dtype, y.dtype, bias is not None, relu, x.device))
    if launch_from_memo(memo, kernel, tensors):
        return
    launch_and_remember(
        launch, memo, kernel, (M, N, K, x.dtype, w.dtype, b.dtype, y.dtype), _grid(M, N), tensors,
        (M, N, K, x.stride(0), x.stride(1), w.stride(0), w.stride(1), y.stride(0), y.stride(1)),
        dict(HAS_BIAS=bias is not None, RELU=relu, IEEE=x.dtype == torch.float32))


def launch_linear_dx(launch, g: torch.Tensor, out, w: torch.Tensor, dx: torch.Tensor) -> None:
    """dx (M, K) = (g * (out > 0)) @ w; ``out`` None means no mask."""
    M, N = g.shape
    K = w.shape[1]
    if M == 0 or K == 0:
        return
    o = out if out is not None else g
    kernel = _pick(_DX, M * N * K, g.dtype)
    tensors = (g, o, w, dx)
    memo = _MEMOS.for_launch(launch, ("dx", M, N, K, g.stride(), o.stride(), w.stride(), dx.stride(), g.dtype,
                                      o.dtype, w.dtype, dx.dtype, out is not None, g.device))
    if launch_from_memo(memo, kernel, tensors):
        return
    launch_and_remember(
        launch, memo, kernel, (M, N, K, g.dtype, o.dtype, w.dtype, dx.dtype), _grid(M, K), tensors,
        (M, N, K, g.stride(0), g.stride(1), o.stride(0), o.stride(1), w.stride(0), w.stride(1),
         dx.stride(0), dx.stride(1)),
        dict(RELU=out is not None, IEEE=g.dtype == torch.float32))


def launch_linear_dw(launch, g: torch.Tensor, out, x: torch.Tensor, dw: torch.Tensor, db) -> None:
    """dw (N, K) = (g * (out > 0))^T @ x and, if ``db`` is given, db (N,) = its column sums."""
    M, N = g.shape
    K = x.shape[1]
    if N == 0 or K == 0:
        return
    o = out if out is not None else g
    b = db if db is not None else dw
    kernel = _pick(_DW, M * N * K, g.dtype)
    tensors = (g, o, x, dw, b)
    memo = _MEMOS.for_launch(launch, ("dw", M, N, K, g.stride(), o.stride(), x.stride(), dw.stride(), g.dtype,
                                      o.dtype, x.dtype, dw.dtype, b.dtype, out is not None, db is not None,
                                      g.device))
    if launch_from_memo(memo, kernel, tensors):
        return
    launch_and_remember(
        launch, memo, kernel, (M, N, K, g.dtype, o.dtype, x.dtype, dw.dtype, b.dtype), _grid(N, K), tensors,
        (M, N, K, g.stride(0), g.stride(1), o.stride(0), o.stride(1), x.stride(0), x.stride(1),
         dw.stride(0), dw.stride(1)),
        dict(RELU=out is not None, HAS_BIAS=db is not None, IEEE=g.dtype == torch.float32))
