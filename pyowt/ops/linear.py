"""``linear_bias_act``: y = act(x @ weight^T + bias), the fused fully-connected layer.

Backends: C++ (``torch.ops.pyowt.linear_bias_act``: oneDNN/ATen GEMMs with a fused mask and
bias-gradient pass on CPU, cuBLASLt epilogues on CUDA; csrc/{cpu,cuda}/linear.*), Triton
(``torch.ops.pyowt.linear_bias_act_triton``: GEMMs with the bias/ReLU epilogue and the ReLU
mask in the backward prologue; pyowt.kernels.linear) and ATen (``F.relu(F.linear(...))``).
Each has a fake kernel and autograd. The backward returns (dX, dW, db) in one op.
"""
from __future__ import annotations

from functools import partial
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .. import _extension
from ..kernels import HAS_TRITON
from . import _checks
from ._autocast import autocast_inputs
from .backend import (call_cpp_op, composition_required, eager_autograd_function, on_input_device,
                      python_kernels_callable, register_op, resolve_backend)

OP = "linear_bias_act"
# CPU: the C++ backend measured 1.0-2x the ATen composition on a 2-core x86 CPU (float32,
# forward and forward+backward; see benchmarks/test_bench_linear.py), so it comes first.
# CUDA: the fastest backend measured (benchmarks/RESULTS.md, H100, bf16, 2026-11-26): our
# cuBLASLt-epilogue op, once its plans were cached, ran AlexNet's FC shapes at 1.20-1.25x
# `F.relu(F.linear(...))` forward and 1.20-1.22x forward+backward (geometric means of 18
# shapes, two runs); our Triton GEMM ran at 0.4x. (On an H200 before the plan cache:
# 0.80x / 0.77x, when ATen was the default.) Its 16-bit outputs with a bias are computed to
# be rounded once (csrc/cuda/linear.cu, "Rounding"), which ATen's were not at one measured
# shape; the GPU test of that fix is still to run. PYOWT_BACKEND_LINEAR_BIAS_ACT=aten
# selects cuBLAS through ATen.
register_op(
    OP,
    implemented=("triton", "cuda", "cpu", "aten"),
    prefer_cuda=("cuda", "aten", "triton"),
    prefer_cpu=("cpu", "aten"),
)

ACTIVATIONS = ("relu", "none")
# The Triton kernels index with 32-bit offsets.
_MAX_TRITON_NUMEL = 2**31 - 1


def linear_bias_act_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                              activation: Optional[str] = "relu") -> torch.Tensor:
    """The ATen composition: ``relu(F.linear(x, weight, bias))`` (no ReLU for None/"none")."""
    y = F.linear(x, weight, bias)
    return F.relu(y) if activation == "relu" else y


def _out_shape(x: torch.Tensor, weight: torch.Tensor):
    return tuple(x.shape[:-1]) + (weight.shape[0],)


def _rows(x: torch.Tensor) -> int:
    """The product of x's leading dims (not numel // in_features: in_features may be 0)."""
    rows = 1
    for s in x.shape[:-1]:
        rows *= s
    return rows


def _fake_forward(x, weight, bias, activation):
    return x.new_empty(_out_shape(x, weight))


def _fake_backward(grad_out, x, weight, out, activation, has_bias):
    n = weight.shape[0] if has_bias else 0
    return x.new_empty(x.shape), weight.new_empty(weight.shape), weight.new_empty((n,))


def _setup_context(ctx, inputs, output):
    x, weight, bias, activation = inputs
    ctx.activation = activation
    ctx.has_bias = bias is not None
    # The output is needed only for the ReLU mask; without it do not keep it alive.
    ctx.save_for_backward(x, weight, output if activation == "relu" else None)


def _saved(ctx, grad):
    x, weight, out = ctx.saved_tensors
    if out is None:  # activation "none": the kernels do not read it
        out = grad.new_empty((0,))
    return grad, x, weight, out, ctx.activation, ctx.has_bias


# --- C++ / CUDA registration (only when the extension is loaded) -------------------------
if _extension.STATUS.loaded:
    torch.library.register_fake("pyowt::linear_bias_act")(_fake_forward)
    torch.library.register_fake("pyowt::linear_bias_act_backward")(_fake_backward)
    _linear_cpp = torch.ops.pyowt.linear_bias_act.default
    # The unboxed entry (csrc/direct_calls.cpp); None with an extension built before it.
    _linear_direct = getattr(_extension.STATUS.module, "linear_bias_act_direct", None)
    # The C++ op's autograd is registered in C++ (csrc/linear_autograd.cpp): a Python one
    # costs more host time per call than the GPU work at AlexNet's FC sizes.


# --- Triton registration -----------------------------------------------------------------
if HAS_TRITON:
    from torch.library import triton_op, wrap_triton

    from ..kernels import linear as _kernels

    def _check_triton_size(*tensors):
        for t in tensors:
            if t.numel() > _MAX_TRITON_NUMEL:
                raise ValueError(f"linear_bias_act (triton): a tensor of {t.numel()} elements exceeds the "
                                 f"32-bit indexing limit {_MAX_TRITON_NUMEL}; use backend='cuda'")

    @on_input_device
    def _triton_forward(launch, x, weight, bias, activation):
        """The Triton forward's body; ``launch`` is ``wrap_triton`` inside the registered op
        and None in the eager path (``_TritonLinearEager``)."""
        k = weight.shape[1]
        x2 = x.reshape(_rows(x), k)
        # The output is allocated in its final shape and the kernel writes a 2-d view of it:
        # a returned view would be refused by autograd when modified in place later.
        y = x.new_empty(_out_shape(x, weight))
        y2 = y.view(x2.shape[0], weight.shape[0])
        _check_triton_size(x2, weight, y2)
        # The kernel reads the bias with unit stride: a strided view (bias[::2]) is copied.
        _kernels.launch_linear_fwd(launch, x2, weight, None if bias is None else bias.contiguous(),
                                   y2, activation == "relu")
        return y

    @on_input_device
    def _triton_backward(launch, grad_out, x, weight, out, activation, has_bias):
        """The Triton backward's body (``launch`` as in :func:`_triton_forward`)."""
        n, k = weight.shape
        x2 = x.reshape(_rows(x), k)
        g = grad_out.reshape(_rows(x), n)
        o = out.reshape(_rows(x), n) if activation == "relu" else None
        _check_triton_size(x2, weight, g)
        dx = x.new_empty(x.shape)  # returned whole, written through a 2-d view (see above)
        dw = weight.new_empty(weight.shape)
        db = weight.new_empty((n if has_bias else 0,))
        if g.shape[0] == 0 or k == 0:
            # No rows (or no inputs): dW and db come out of the (empty) reductions as zeros.
            # The kernels' grids would be empty or never store db, so use torch here.
            dw.zero_()
            if has_bias:
                gm = g if o is None else g * (o > 0)
                db.copy_(gm.sum(0, dtype=torch.float32))
        else:
            _kernels.launch_linear_dw(launch, g, o, x2, dw, db if has_bias else None)
        _kernels.launch_linear_dx(launch, g, o, weight, dx.view(x2.shape))
        return dx, dw, db

    @triton_op("pyowt::linear_bias_act_triton", mutates_args=())
    def linear_bias_act_triton(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                               activation: str) -> torch.Tensor:
        return _triton_forward(wrap_triton, x, weight, bias, activation)

    @triton_op("pyowt::linear_bias_act_backward_triton", mutates_args=())
    def linear_bias_act_backward_triton(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                                        out: torch.Tensor, activation: str,
                                        has_bias: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _triton_backward(wrap_triton, grad_out, x, weight, out, activation, has_bias)

    # Explicit fake kernels: under the interpreter the triton_op has none of its own
    # (DESIGN.md: opcheck's fake-tensor test needs them).
    linear_bias_act_triton.register_fake(_fake_forward)
    linear_bias_act_backward_triton.register_fake(_fake_backward)

    def _triton_grads(ctx, grad, backward):
        """Gradients for the Triton forward's autograd; ``backward`` runs the backward
        kernels (the registered op, or its body in the eager path)."""
        if torch.is_grad_enabled():
            # create_graph: differentiable ATen ops, so gradients of gradients are exact
            # (the backward kernels have no derivative of their own).
            x, weight, out = ctx.saved_tensors
            g = grad if out is None else torch.ops.aten.threshold_backward(grad, out, 0)
            g2 = g.reshape(-1, weight.shape[0])
            return (g.matmul(weight), g2.t().mm(x.reshape(-1, weight.shape[1])),
                    g2.sum(0) if ctx.has_bias else None, None)
        gx, gw, gb = backward(*_saved(ctx, grad))
        return gx, gw, (gb if ctx.has_bias else None), None

    def _linear_triton_backward(ctx, grad):
        return _triton_grads(ctx, grad, torch.ops.pyowt.linear_bias_act_backward_triton)

    linear_bias_act_triton.register_autograd(_linear_triton_backward, setup_context=_setup_context)

    # Eager calls: the same kernels without the registered op's dispatch (launch=None).
    _TritonLinearEager = eager_autograd_function(
        "_TritonLinearEager", partial(_triton_forward, None), _setup_context,
        lambda ctx, grad: _triton_grads(ctx, grad, partial(_triton_backward, None)))


def _normalize_activation(activation) -> str:
    if activation is None:
        return "none"
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"activation must be 'relu' or None, got {activation!r}")
    return activation


def check_linear_args(x, weight, bias) -> None:
    """Raise TypeError/ValueError naming the argument if x, weight, bias do not fit together."""
    _checks.check_tensor(x, "x")
    _checks.check_tensor(weight, "weight")
    _checks.check_float_dtype(x, "x")
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension, got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-d (out_features, in_features), got shape {tuple(weight.shape)}")
    _checks.check_same(x, weight, "x", "weight")
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight has in_features {weight.shape[1]} but x has {x.shape[-1]} features in "
                         f"its last dim (x shape {tuple(x.shape)})")
    if bias is not None:
        _checks.check_tensor(bias, "bias")
        _checks.check_same(x, bias, "x", "bias")
        if bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have shape ({weight.shape[0]},) to match weight's out_features, "
                             f"got {tuple(bias.shape)}")


def linear_bias_act(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                    activation: Optional[str] = "relu", backend: Optional[str] = None) -> torch.Tensor:
    """``act(x @ weight.T + bias)``, differentiable in x, weight and bias.

    Args:
        x: ``(..., in_features)`` float32/float16/bfloat16; leading dims are flattened.
        weight: ``(out_features, in_features)``, x's dtype and device.
        bias: ``(out_features,)`` or None.
        activation: ``"relu"`` or ``None`` (identity).
        backend: ``"triton"``, ``"cuda"``, ``"cpu"`` or ``"aten"``; default: see
            :mod:`pyowt.ops.backend` (env ``PYOWT_BACKEND_LINEAR_BIAS_ACT``).

    Returns:
        ``(..., out_features)`` contiguous tensor of x's dtype and device.

    Under ``torch.autocast`` x, weight and bias are cast to the autocast dtype first, as
    ATen's linear is.
    """
    x, weight, bias = autocast_inputs(x, weight, bias)
    act = _normalize_activation(activation)
    if not isinstance(x, torch.Tensor) or not _checks.tensors_on_one_device(x, weight, bias):
        check_linear_args(x, weight, bias)  # raises, naming the argument
    chosen = resolve_backend(OP, x.device, backend)
    if composition_required(chosen):
        chosen = "aten"
    if chosen in ("cpu", "cuda"):
        # The C++ op checks every argument itself (csrc/linear.cpp); checking twice on
        # every call cost ~1.5 us of host time on the hot path.
        return call_cpp_op(_linear_direct, _linear_cpp, (x, weight, bias, act),
                           lambda: check_linear_args(x, weight, bias))
    check_linear_args(x, weight, bias)
    if chosen == "aten":
        return linear_bias_act_reference(x, weight, bias, act)
    if python_kernels_callable((x, weight, bias)):
        return _TritonLinearEager.apply(x, weight, bias, act)
    return torch.ops.pyowt.linear_bias_act_triton(x, weight, bias, act)
