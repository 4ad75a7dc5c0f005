"""``bias_relu``: y = relu(x + bias), the bias broadcast along one dimension.

The epilogue of every conv and FC layer, and the op that proves the whole operator path:
C++ (``torch.ops.pyowt.bias_relu``, CPU and CUDA kernels in csrc/), Triton
(``torch.ops.pyowt.bias_relu_triton``, kernels in pyowt.kernels.bias_relu) and ATen, each
with a fake kernel and autograd.
"""
from __future__ import annotations

from functools import partial
from typing import Optional, Tuple

import torch

from .. import _extension
from ..kernels import HAS_TRITON
from . import _checks
from ._autocast import autocast_inputs
from .backend import (composition_required, eager_autograd_function, on_input_device, python_kernels_callable,
                      register_op, resolve_backend)

OP = "bias_relu"
register_op(
    OP,
    implemented=("triton", "cuda", "cpu", "aten"),
    prefer_cuda=("cuda", "triton", "aten"),
    prefer_cpu=("cpu", "aten"),
)


def _bias_view(bias: torch.Tensor, ndim: int, dim: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[dim] = -1
    return bias.view(shape)


def bias_relu_reference(x: torch.Tensor, bias: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """The ATen composition: ``relu(x + bias)`` with bias along ``dim``."""
    return torch.relu(x + _bias_view(bias, x.dim(), dim))


def _fake_like(x: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.empty_like(x, memory_format=_checks.preferred_memory_format(x, dim % x.dim()))


def _setup_context(ctx, inputs, output):
    ctx.dim = inputs[2]
    ctx.save_for_backward(output)


# --- C++ / CUDA registration (only when the extension is loaded) -------------------------
if _extension.STATUS.loaded:

    @torch.library.register_fake("pyowt::bias_relu")
    def _bias_relu_fake(x, bias, dim):
        return _fake_like(x, dim)

    @torch.library.register_fake("pyowt::bias_relu_backward")
    def _bias_relu_backward_fake(grad_out, out, dim):
        return _fake_like(out, dim), out.new_empty(out.shape[dim])

    # The C++ op's autograd is registered in C++ (csrc/bias_relu_autograd.cpp: host cost).


# --- Triton registration -----------------------------------------------------------------
if HAS_TRITON:
    from torch.library import triton_op, wrap_triton

    from ..kernels import bias_relu as _kernels

    @on_input_device
    def _triton_forward(launch, x, bias, dim):
        """The Triton forward's body; ``launch`` is ``wrap_triton`` inside the registered op
        and None in the eager path (``_TritonBiasReluEager``)."""
        dim = dim % x.dim()
        fmt = _checks.preferred_memory_format(x, dim)
        x = x.contiguous(memory_format=fmt)
        y = torch.empty_like(x, memory_format=fmt)
        _, channels, inner = _checks.channel_layout(x, dim, fmt)
        _kernels.launch_bias_relu_fwd(launch, x, bias.contiguous(), y, channels, inner)
        return y

    @on_input_device
    def _triton_backward(launch, grad_out, out, dim):
        """The Triton backward's body (``launch`` as in :func:`_triton_forward`)."""
        dim = dim % out.dim()
        fmt = _checks.preferred_memory_format(out, dim)
        out = out.contiguous(memory_format=fmt)
        grad_out = grad_out.contiguous(memory_format=fmt)
        grad_x = torch.empty_like(out, memory_format=fmt)
        _kernels.launch_relu_mask(launch, grad_out, out, grad_x)
        outer, channels, inner = _checks.channel_layout(out, dim, fmt)
        # The per-channel sum uses torch's reduction, accumulating in float32.
        flat = grad_x.as_strided((outer, channels, inner), (channels * inner, inner, 1))
        grad_bias = flat.sum(dim=(0, 2), dtype=torch.float32).to(out.dtype)
        return grad_x, grad_bias

    @triton_op("pyowt::bias_relu_triton", mutates_args=())
    def bias_relu_triton(x: torch.Tensor, bias: torch.Tensor, dim: int) -> torch.Tensor:
        return _triton_forward(wrap_triton, x, bias, dim)

    @triton_op("pyowt::bias_relu_backward_triton", mutates_args=())
    def bias_relu_backward_triton(grad_out: torch.Tensor, out: torch.Tensor, dim: int) -> Tuple[torch.Tensor, torch.Tensor]:
        return _triton_backward(wrap_triton, grad_out, out, dim)

    # triton_op has no fake kernel of its own under the interpreter (DESIGN.md: opcheck's
    # fake-tensor test needs one), so give both an explicit one.
    @bias_relu_triton.register_fake
    def _(x, bias, dim):
        return _fake_like(x, dim)

    @bias_relu_backward_triton.register_fake
    def _(grad_out, out, dim):
        return _fake_like(out, dim), out.new_empty(out.shape[dim % out.dim()])

    def _triton_grads(ctx, grad, backward):
        """Gradients for the Triton forward's autograd; ``backward`` runs the backward
        kernel (the registered op, or its body in the eager path)."""
        (out,) = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph: differentiable ATen ops, so gradients of gradients are exact
            # (the backward kernel has no derivative of its own).
            g = torch.ops.aten.threshold_backward(grad, out, 0)
            others = [d for d in range(g.dim()) if d != ctx.dim % g.dim()]
            return g, (g.sum(others) if others else g), None
        grad_x, grad_bias = backward(grad, out, ctx.dim)
        return grad_x, grad_bias, None

    def _bias_relu_triton_backward(ctx, grad):
        return _triton_grads(ctx, grad, torch.ops.pyowt.bias_relu_backward_triton)

    bias_relu_triton.register_autograd(_bias_relu_triton_backward, setup_context=_setup_context)

    # Eager calls: the same kernels without the registered op's dispatch (launch=None).
    _TritonBiasReluEager = eager_autograd_function(
        "_TritonBiasReluEager", partial(_triton_forward, None), _setup_context,
        lambda ctx, grad: _triton_grads(ctx, grad, partial(_triton_backward, None)))


def bias_relu(x: torch.Tensor, bias: torch.Tensor, dim: int = 1, backend: Optional[str] = None) -> torch.Tensor:
    """``relu(x + bias)`` with ``bias`` broadcast along ``dim``, differentiable.

    Args:
        x: ``(..., C, ...)`` float32/float16/bfloat16 tensor; ``C = x.shape[dim]``. Any
            strides; channels-last 4-d/5-d inputs keep their layout.
        bias: ``(C,)`` tensor of x's dtype and device.
        dim: the channel dimension of ``x`` (negative counts from the end).
        backend: ``"triton"``, ``"cuda"``, ``"cpu"`` or ``"aten"``; default: see
            :mod:`pyowt.ops.backend`.

    Returns:
        Tensor of x's shape, dtype and device.

    Under ``torch.autocast`` x and bias are cast to the autocast dtype first, like the
    conv2d/linear whose epilogue this is.
    """
    x, bias = autocast_inputs(x, bias)
    _checks.check_tensor(x, "x")
    _checks.check_tensor(bias, "bias")
    _checks.check_float_dtype(x, "x")
    dim = _checks.normalize_dim(dim, x.dim(), "x")
    _checks.check_same(x, bias, "x", "bias")
    if bias.dim() != 1 or bias.shape[0] != x.shape[dim]:
        raise ValueError(
            f"bias must have shape ({x.shape[dim]},) to match x.shape[{dim}] of x with shape "
            f"{tuple(x.shape)}, got {tuple(bias.shape)}"
        )
    chosen = resolve_backend(OP, x.device, backend)
    if chosen == "aten" or composition_required(chosen):
        return bias_relu_reference(x, bias, dim)
    if chosen == "triton":
        if python_kernels_callable((x, bias)):
            return _TritonBiasReluEager.apply(x, bias, dim)
        return torch.ops.pyowt.bias_relu_triton(x, bias, dim)
    return torch.ops.pyowt.bias_relu(x, bias, dim)
