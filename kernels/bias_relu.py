"""Triton kernels for y = relu(x + bias) along one dimension, and its backward.

A dense tensor is seen as [outer, C, inner] in memory order (inner = 1 for channels-last
inputs, whose channel is innermost); element i has channel (i // inner) % C.
"""
import torch
import triton
import triton.language as tl

from . import ceil_div

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


def _launchable(launch, kernel):
    # launch: wrap_triton inside the registered ops, None in eager mode.
    return kernel if launch is None else launch(kernel)


def launch_bias_relu_fwd(launch, x: torch.Tensor, bias: torch.Tensor, y: torch.Tensor,
                         channels: int, inner: int) -> None:
    """Run the forward kernel over dense ``x`` into ``y`` (same layout)."""
    n = x.numel()
    if n:
        _launchable(launch, bias_relu_fwd_kernel)[grid_1d(n)](x, bias, y, n, channels, inner, BLOCK=BLOCK)


def launch_relu_mask(launch, grad: torch.Tensor, out: torch.Tensor, grad_x: torch.Tensor) -> None:
    """grad_x = grad where out > 0 else 0, over dense tensors of one layout."""
    n = out.numel()
    if n:
        _launchable(launch, relu_mask_kernel)[grid_1d(n)](grad, out, grad_x, n, BLOCK=BLOCK)
