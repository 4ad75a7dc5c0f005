"""Triton kernels for y = relu(x + bias) along one dimension, and its backward.

A dense tensor is seen as [outer, C, inner] in memory order (inner = 1 for channels-last
inputs, whose channel is innermost); element i has channel (i // inner) % C. Eager launches
of a size seen before relaunch the compiled kernel (kernels.autotuned.launch_from_memo).
"""
import torch
import triton
import triton.language as tl

from . import ceil_div
from .autotuned import LaunchMemos, launch_and_remember, launch_from_memo

BLOCK = 1024


@triton.jit
def bias_relu_fwd_kernel(x_ptr, bias_ptr, y_ptr, n, channels, inner, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    c = (offs // inner) % channels
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(bias_ptr + c, mask=mask, other=0.0).to(tl.float32)
    y = tl.maximum(x + b, 0.0)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def relu_mask_kernel(grad_ptr, out_ptr, grad_x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0)
    y = tl.load(out_ptr + offs, mask=mask, other=0.0)
    tl.store(grad_x_ptr + offs, tl.where(y > 0, g, tl.zeros_like(g)), mask=mask)


def grid_1d(n: int):
    return (ceil_div(n, BLOCK),)


# Eager launches seen before, by (kernel, sizes, dtypes, device).
_MEMOS = LaunchMemos()


def _launch(launch, kernel, key: tuple, tensors: tuple, scalars: tuple) -> None:
    """``kernel[grid_1d(n)](*tensors, *scalars, BLOCK=BLOCK)`` through ``launch`` (wrap_triton
    inside the registered ops) or, eager (None), from the memo of ``key``."""
    memo = _MEMOS.for_launch(launch, key)
    if launch_from_memo(memo, kernel, tensors):
        return
    launch_and_remember(launch, memo, kernel, None, grid_1d(scalars[0]), tensors, scalars, dict(BLOCK=BLOCK))


def launch_bias_relu_fwd(launch, x: torch.Tensor, bias: torch.Tensor, y: torch.Tensor,
                         channels: int, inner: int) -> None:
    """Run the forward kernel over dense ``x`` into ``y`` (same layout)."""
    n = x.numel()
    if n:
        _launch(launch, bias_relu_fwd_kernel, ("fwd", n, channels, inner, x.dtype, bias.dtype, y.dtype, x.device),
                (x, bias, y), (n, channels, inner))


def launch_relu_mask(launch, grad: torch.Tensor, out: torch.Tensor, grad_x: torch.Tensor) -> None:
    """grad_x = grad where out > 0 else 0, over dense tensors of one layout."""
    n = out.numel()
    if n:
        _launch(launch, relu_mask_kernel, ("mask", n, grad.dtype, out.dtype, grad_x.dtype, out.device),
                (grad, out, grad_x), (n,))
