"""``conv2d_bias_act``: out = act(conv2d(x, weight) + bias), act in {ReLU, identity}.

The convolution of every conv layer with its bias and activation fused into the epilogue:
C++ (``torch.ops.pyowt.conv2d_bias_act``: on CPU our Winograd F(2x2, 3x3) / F(2x2, 5x5)
kernel for float32 NCHW 3x3 and 5x5 stride-1 layers on AVX-512 CPUs where it pays, else
oneDNN's fused post-op; our kernel on CUDA), Triton (``torch.ops.pyowt.conv2d_bias_act_triton``, implicit-GEMM kernels in
pyowt.kernels.conv2d and pyowt.kernels.conv2d_backward) and ATen, each with a fake kernel
and autograd. The backward recovers the ReLU mask from the saved output (out > 0), so the
pre-activation is never stored.
"""
from __future__ import annotations

import os
from functools import lru_cache, partial
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from .. import _extension
from ..kernels import HAS_TRITON
from ..kernels.autotuned import LaunchMemos
from . import _checks
from ._autocast import autocast_inputs
from .backend import (call_cpp_op, composition_required, eager_autograd_function, is_forced, on_input_device,
                      python_kernels_callable, register_op, resolve_backend, unavailable_reason)

OP = "conv2d_bias_act"
# The default is the fastest backend measured (benchmarks/RESULTS.md): cuDNN through ATen,
# except where our CUDA kernel measured faster (cuda_kernel_preferred): 16-bit channels_last
# RGB first layers (H200, 2026-11-26) and, since its wgmma tiles ran on an H100 (bf16, batch
# 128, 2026-11-27: 1.07-2.96x cuDNN's forward on each AlexNet conv), every 16-bit
# channels_last layer on an sm_90 GPU. Our Triton kernel (1.16x over AlexNet's forward,
# 0.81x forward+backward on that H100) stays one argument or
# PYOWT_BACKEND_CONV2D_BIAS_ACT=cuda|triton away; revisit with each kernel change.
register_op(
    OP,
    implemented=("triton", "cuda", "cpu", "aten"),
    prefer_cuda=("aten", "cuda", "triton"),
    prefer_cpu=("cpu", "aten"),
)

ACTIVATIONS = ("relu", "none")


def cuda_kernel_preferred(x: torch.Tensor, weight: torch.Tensor, groups: int) -> bool:
    """True for the CUDA tensors on which the default backend is our CUDA kernel, not cuDNN.

    Only where it measured faster (batch 128, channels_last, benchmarks/RESULTS.md), all
    of it for float16/bfloat16, ``groups=1``, channels_last x:

    * a network's first layer, few input channels and a large kernel, where cuDNN's
      tensor-core tiles are mostly channel padding (H200, bf16): AlexNet conv1 (3 -> 64,
      11x11, stride 4) forward 0.495 vs 0.749 ms, ResNet-50 conv1 (3 -> 64, 7x7, stride 2)
      0.670 vs 1.323 ms;
    * on an sm_90 GPU where the kernel's wgmma tiles run (:func:`cuda_wgmma_tiles_enabled`),
      every layer whose C_in is a multiple
      of 8 (the tiles' vector loader): H100, bf16, AlexNet conv2-conv5 forward 1.36x, 1.81x,
      1.07x, 1.19x of cuDNN's, ResNet-50's 3x3 (64 and 128 channels) and 1x1 (1024 -> 256)
      layers 1.91x, 1.70x, 1.51x.

    The 16-bit backward runs cuDNN either way. float32, NCHW inputs (our kernel's slower
    scalar loader) and small-kernel first layers were not measured faster and keep cuDNN.
    """
    if not (groups == 1 and x.dim() == 4 and weight.dim() == 4
            and x.dtype in (torch.float16, torch.bfloat16)
            and _checks.preferred_memory_format(x, 1) == torch.channels_last):
        return False
    if x.shape[1] <= 4 and weight.shape[2] * weight.shape[3] >= 25:
        return True
    return x.shape[1] % 8 == 0 and cuda_wgmma_tiles_enabled(x.device.index)


def cuda_wgmma_tiles_available() -> bool:
    """Whether the ``cuda`` backend's wgmma tiles (csrc/cuda/conv2d_wgmma.cuh) can run here:
    an extension compiled for sm_90a and a current CUDA device of compute capability 9.0,
    what csrc/cuda/conv2d.cu's ``wgmma_usable`` checks. (The first-call tile timing considers
    them unless ``PYOWT_CUDA_CONV_WGMMA=0``.)"""
    return (_extension.STATUS.loaded and torch.cuda.is_available()
            and bool(_extension.STATUS.module.build_config().get("sm90a"))
            and torch.cuda.get_device_capability() == (9, 0))


def cuda_wgmma_tiles_enabled(device_index: Optional[int] = None) -> bool:
    """Whether the ``cuda`` backend uses its wgmma tiles on device ``device_index`` (None: the
    current one): they can run there (:func:`cuda_wgmma_tiles_available`) and
    ``PYOWT_CUDA_CONV_WGMMA`` is not ``"0"`` (benchmarks/gpu_check.sh sets it so when they
    fail its probe)."""
    return os.environ.get("PYOWT_CUDA_CONV_WGMMA") != "0" and _wgmma_tiles_on(device_index)


@lru_cache(maxsize=None)
def _wgmma_tiles_on(device_index: Optional[int]) -> bool:
    # Asked on every default-backend call: the build and the device do not change in a process.
    if not torch.cuda.is_available():
        return False
    with torch.cuda.device(device_index):  # None: the current device
        return cuda_wgmma_tiles_available()


class ConvShape(NamedTuple):
    """Sizes of one conv2d: x (n, c_in, h, w), weight (c_out, c_in/groups, r, s)."""

    n: int
    c_in: int
    h: int
    w: int
    c_out: int
    r: int
    s: int
    h_out: int
    w_out: int
    stride: Tuple[int, int]
    padding: Tuple[int, int]
    dilation: Tuple[int, int]
    groups: int


def conv_shape(x_shape, w_shape, stride, padding, dilation, groups) -> ConvShape:
    """The geometry of a conv whose arguments were validated (see :func:`conv2d_bias_act`)."""
    n, c_in, h, w = x_shape
    c_out, _, r, s = w_shape
    n, c_in, h, w, c_out, r, s = int(n), int(c_in), int(h), int(w), int(c_out), int(r), int(s)
    h_out = (h + 2 * padding[0] - dilation[0] * (r - 1) - 1) // stride[0] + 1
    w_out = (w + 2 * padding[1] - dilation[1] * (s - 1) - 1) // stride[1] + 1
    return ConvShape(n, c_in, h, w, c_out, r, s, h_out, w_out, tuple(stride), tuple(padding),
                     tuple(dilation), int(groups))


def _pair(value, name: str, minimum: int) -> Tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        pair = (value, value)
    elif (isinstance(value, (tuple, list)) and len(value) == 2
          and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        pair = (int(value[0]), int(value[1]))
    else:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(pair) < minimum:
        raise ValueError(f"{name} must be >= {minimum} in both axes, got {value!r}")
    return pair


def _groups(groups) -> int:
    if isinstance(groups, bool) or not isinstance(groups, int):
        raise TypeError(f"groups must be an int, got {groups!r}")
    return groups


def _activation(activation) -> str:
    if activation is None:
        return "none"
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be 'relu', 'none' or None, got {activation!r}")
    return activation


def _output_format(x: torch.Tensor) -> torch.memory_format:
    return _checks.preferred_memory_format(x, 1)


def conv2d_bias_act_reference(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1,
                              activation="relu") -> torch.Tensor:
    """The ATen composition ``relu(conv2d(x, weight, bias))`` (identity for "none")."""
    out = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    out = F.relu(out) if _activation(activation) == "relu" else out
    return out.contiguous(memory_format=_output_format(x))


def _empty_out(x: torch.Tensor, shape: ConvShape) -> torch.Tensor:
    return torch.empty((shape.n, shape.c_out, shape.h_out, shape.w_out), dtype=x.dtype,
                       device=x.device, memory_format=_output_format(x))


def _check_output_mask(output_mask, op: str) -> None:
    # RuntimeError with the C++ kernels' wording (csrc/conv2d_output_mask.h), so that the
    # fake and Triton kernels fail the way the C++ ones do.
    if len(output_mask) != 3:
        raise RuntimeError(
            f"{op}: output_mask must have 3 elements (grad x, grad weight, grad bias), got "
            f"{len(output_mask)}: {list(output_mask)}")


def _backward_fake(x, weight, has_bias, output_mask):
    """The backward's outputs as both backward ops return them: a gradient that
    ``output_mask`` leaves out (and grad bias without a bias) is an empty (0,) tensor."""
    gx = (torch.empty_like(x, memory_format=_output_format(x)) if output_mask[0]
          else x.new_empty((0,)))
    gw = (torch.empty_like(weight, memory_format=_checks.preferred_memory_format(weight, 1))
          if output_mask[1] else x.new_empty((0,)))
    gb = x.new_empty((weight.shape[0] if has_bias and output_mask[2] else 0,))
    return gx, gw, gb


def _setup_context(ctx, inputs, output):
    x, weight, bias, stride, padding, dilation, groups, activation = inputs
    ctx.conv = (list(stride), list(padding), list(dilation), groups, activation)
    ctx.has_bias = bias is not None
    # The output is needed only for the ReLU mask.
    ctx.save_for_backward(x, weight, output if activation == "relu" else None)


# --- C++ / CUDA registration (only when the extension is loaded) -------------------------
if _extension.STATUS.loaded:

    @torch.library.register_fake("pyowt::conv2d_bias_act")
    def _conv_fake(x, weight, bias, stride, padding, dilation, groups, activation):
        return _empty_out(x, conv_shape(x.shape, weight.shape, stride, padding, dilation, groups))

    @torch.library.register_fake("pyowt::conv2d_bias_act_backward")
    def _conv_backward_fake(grad_out, x, weight, out, stride, padding, dilation, groups,
                            activation, has_bias, output_mask):
        _check_output_mask(output_mask, "conv2d_bias_act_backward")
        return _backward_fake(x, weight, has_bias, output_mask)

    _conv_cpp = torch.ops.pyowt.conv2d_bias_act.default
    # The unboxed entry (csrc/direct_calls.cpp); None with an extension built before it.
    _conv_direct = getattr(_extension.STATUS.module, "conv2d_bias_act_direct", None)
    # The C++ op's autograd is registered in C++ (csrc/conv2d_autograd.cpp: host cost); it
    # passes needs_input_grad as output_mask, so a first layer skips its input gradient.


# --- Triton registration -----------------------------------------------------------------
if HAS_TRITON:
    from torch.library import triton_op, wrap_triton

    from ..kernels import conv2d as _fwd
    from ..kernels import conv2d_backward as _bwd

    @on_input_device
    def _triton_forward(launch, x, weight, bias, stride, padding, dilation, groups, activation,
                        plan=None):
        """The Triton forward's body; ``launch`` is ``wrap_triton`` inside the registered op
        and None in the eager path (``_TritonConv2dEager``, kernels.autotuned), which also
        passes the call's :class:`_EagerPlan`."""
        if plan is None:
            shape = conv_shape(x.shape, weight.shape, stride, padding, dilation, groups)
            out = _empty_out(x, shape)
        else:
            shape = plan.shape
            out = x.new_empty_strided(plan.out_size, plan.out_stride)
        # NHWC operands: a run of input channels is contiguous in x and in each weight row.
        # (The packed walk of an RGB layer copies x into its own 4-channel layout instead.)
        packed = _fwd.use_packed(shape.c_in // shape.groups, shape.groups)
        x_cl = x if packed else x.contiguous(memory_format=torch.channels_last)
        w_cl = weight.contiguous(memory_format=torch.channels_last)
        _fwd.launch_conv2d_fwd(launch, x_cl, w_cl, None if bias is None else bias.contiguous(),
                               out, shape, activation == "relu", packed=packed,
                               memo=None if plan is None else plan.memo)
        return out

    @on_input_device
    def _triton_backward(launch, grad_out, x, weight, out, stride, padding, dilation, groups,
                         activation, has_bias, output_mask, plan=None):
        """The Triton backward's body (``launch`` as in :func:`_triton_forward`; the eager
        path passes the forward's :class:`_EagerPlan`, whose ``backward`` table keeps the
        launches' prepared arguments per gradient layout)."""
        _check_output_mask(output_mask, "conv2d_bias_act_backward_triton")
        relu = activation == "relu"
        dy = grad_out.contiguous(memory_format=torch.channels_last)
        # dy and out must share strides; without ReLU `out` is never read.
        o = out.contiguous(memory_format=torch.channels_last) if relu else dy
        w_cl = weight.contiguous(memory_format=torch.channels_last)
        dgrad_memo = wgrad_memo = None
        if plan is None:
            shape = conv_shape(x.shape, weight.shape, stride, padding, dilation, groups)
        else:
            shape = plan.shape
            # x's and the output's layouts are the plan's; dy's strides (size-1 dimensions) and
            # the weight's layout (its gradient's) are not.
            memos = plan.backward.for_launch(launch, (tuple(output_mask), dy.dtype, dy.stride(), o.stride(),
                                                      weight.stride()))
            dgrad_memo, wgrad_memo = memos.setdefault("dgrad", {}), memos.setdefault("wgrad", {})
        # Distinct empty tensors: outputs of a custom op may not alias each other.
        grad_x, grad_w, grad_b = (x.new_empty((0,)) for _ in range(3))
        if output_mask[0]:
            grad_x = torch.empty_like(x, memory_format=_output_format(x))
            _bwd.launch_conv2d_dgrad(launch, dy, o, w_cl, grad_x, shape, relu, memo=dgrad_memo)
        want_bias = has_bias and output_mask[2]
        if output_mask[1]:
            x_cl = x.contiguous(memory_format=torch.channels_last)
            grad_w = torch.empty_like(weight, memory_format=_checks.preferred_memory_format(weight, 1))
            if want_bias:
                grad_b = weight.new_empty((shape.c_out,))
            _bwd.launch_conv2d_wgrad(launch, dy, o, x_cl, grad_w, grad_b if want_bias else None, shape, relu,
                                     memo=wgrad_memo)
        elif want_bias:
            masked = torch.where(o > 0, dy, torch.zeros_like(dy)) if relu else dy
            grad_b = masked.sum(dim=(0, 2, 3), dtype=torch.float32).to(weight.dtype)
        return grad_x, grad_w, grad_b

    @triton_op("pyowt::conv2d_bias_act_triton", mutates_args=())
    def conv2d_bias_act_triton(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                               stride: List[int], padding: List[int], dilation: List[int],
                               groups: int, activation: str) -> torch.Tensor:
        return _triton_forward(wrap_triton, x, weight, bias, stride, padding, dilation, groups,
                               activation)

    @triton_op("pyowt::conv2d_bias_act_backward_triton", mutates_args=())
    def conv2d_bias_act_backward_triton(
        grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor,
        stride: List[int], padding: List[int], dilation: List[int], groups: int, activation: str,
        has_bias: bool, output_mask: List[bool],
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Like the C++ backward, ``output_mask`` (grad x, weight, bias) included: a
        gradient not asked for is returned as an empty (0,) tensor and not computed (the
        first layer's input gradient is never needed, and is the most expensive one)."""
        return _triton_backward(wrap_triton, grad_out, x, weight, out, stride, padding, dilation,
                                groups, activation, has_bias, output_mask)

    # Explicit fake kernels: opcheck's fake-tensor test needs them under the interpreter.
    @conv2d_bias_act_triton.register_fake
    def _(x, weight, bias, stride, padding, dilation, groups, activation):
        return _empty_out(x, conv_shape(x.shape, weight.shape, stride, padding, dilation, groups))

    @conv2d_bias_act_backward_triton.register_fake
    def _(grad_out, x, weight, out, stride, padding, dilation, groups, activation, has_bias,
          output_mask):
        _check_output_mask(output_mask, "conv2d_bias_act_backward_triton")
        return _backward_fake(x, weight, has_bias, output_mask)

    def _triton_grads(ctx, grad, backward):
        """Gradients for the Triton forward's autograd; ``backward`` runs the backward
        kernels (the registered op, or its body in the eager path)."""
        x, weight, out = ctx.saved_tensors
        stride, padding, dilation, groups, activation = ctx.conv
        need = [bool(v) for v in ctx.needs_input_grad[:3]]
        if torch.is_grad_enabled():
            # create_graph: differentiable ATen ops (convolution_backward has a derivative),
            # so gradients of gradients are exact; the backward kernels have none.
            g = grad if out is None else torch.ops.aten.threshold_backward(grad, out, 0)
            grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
                g, x, weight, None, stride, padding, dilation, False, [0, 0], groups,
                [need[0], need[1], False])
            grad_b = g.sum((0, 2, 3)) if (ctx.has_bias and need[2]) else None
            return grad_x, grad_w, grad_b, None, None, None, None, None
        grad_x, grad_w, grad_b = backward(
            grad, x, weight, grad if out is None else out, stride, padding, dilation, groups,
            activation, ctx.has_bias, need)
        return (grad_x if need[0] else None, grad_w if need[1] else None,
                grad_b if (ctx.has_bias and need[2]) else None, None, None, None, None, None)

    def _conv_triton_backward(ctx, grad):
        return _triton_grads(ctx, grad, torch.ops.pyowt.conv2d_bias_act_backward_triton)

    conv2d_bias_act_triton.register_autograd(_conv_triton_backward, setup_context=_setup_context)

    def _eager_setup_context(ctx, inputs, output):
        _setup_context(ctx, inputs[:8], output)
        ctx.plan = inputs[8]

    # Eager calls: the same kernels without the registered op's dispatch (launch=None); the
    # inputs are the op's eight and the call's _EagerPlan.
    _TritonConv2dEager = eager_autograd_function(
        "_TritonConv2dEager", partial(_triton_forward, None), _eager_setup_context,
        lambda ctx, grad: _triton_grads(ctx, grad, partial(_triton_backward, None, plan=ctx.plan)) + (None,))


class _EagerPlan(NamedTuple):
    """What an eager Triton call needs besides its tensors, fixed by their metadata."""

    shape: ConvShape
    args: tuple        # (stride, padding, dilation, groups, activation) as the op takes them
    out_size: tuple
    out_stride: tuple
    memo: dict         # the forward launch's prepared arguments (kernels.conv2d.launch_conv2d_fwd)
    backward: LaunchMemos  # the backward launches' memos (kernels.conv2d_backward), by
                           # output_mask, dy's dtype and strides and the weight's strides


# Tensor metadata and conv arguments of eager Triton calls that passed _validate -> their
# plan. A model repeats a few layer geometries, and on the Triton op's host path (which
# bounds it at AlexNet's conv3-5 on an H100, benchmarks/RESULTS.md) the checks, the
# geometry, the output's layout and the launch's scalar arguments cost ~11 us per call on
# the dev CPU; the key ~2 us. (The key holds everything the launch's arguments depend on:
# x's strides, and through them x_cl's, the output's, the alignment hints.)
_EAGER_PLANS: Dict[tuple, _EagerPlan] = {}
_EAGER_PLANS_MAX = 1024


def _plain_pair_key(value):
    """``value`` when it is an int or a pair of ints (bools excluded: they fail _pair), as
    a hashable key part; None for anything else (such calls are not cached)."""
    kind = type(value)
    if kind is int:
        return value
    if (kind is tuple or kind is list) and len(value) == 2 and type(value[0]) is int and type(value[1]) is int:
        return (value[0], value[1])
    return None


def _eager_plan(x, weight, bias, stride, padding, dilation, groups, activation) -> _EagerPlan:
    """The plan of an eager Triton call, validating the call (raising as :func:`_validate`)
    the first time its metadata is seen."""
    sk, pk, dk = _plain_pair_key(stride), _plain_pair_key(padding), _plain_pair_key(dilation)
    key = None
    if (sk is not None and pk is not None and dk is not None and type(groups) is int
            and (activation is None or type(activation) is str)):
        key = (x.shape, x.stride(), x.dtype, x.device, weight.shape, weight.dtype, weight.device,
               None if bias is None else (bias.shape, bias.dtype, bias.device), sk, pk, dk, groups, activation)
        plan = _EAGER_PLANS.get(key)
        if plan is not None:
            return plan
    shape, act = _validate(x, weight, bias, stride, padding, dilation, groups, activation)
    size = (shape.n, shape.c_out, shape.h_out, shape.w_out)
    out_stride = torch.empty(size, device="meta", memory_format=_output_format(x)).stride()
    plan = _EagerPlan(shape, (shape.stride, shape.padding, shape.dilation, shape.groups, act), size, out_stride,
                      {}, LaunchMemos(limit=8))
    if key is not None:
        if len(_EAGER_PLANS) >= _EAGER_PLANS_MAX:
            _EAGER_PLANS.clear()
        _EAGER_PLANS[key] = plan
    return plan


def _validate(x, weight, bias, stride, padding, dilation, groups, activation):
    _checks.check_tensor(x, "x")
    _checks.check_tensor(weight, "weight")
    if bias is not None:
        _checks.check_tensor(bias, "bias")
    if x.dim() != 4:
        raise ValueError(f"x must be 4-d (N, C_in, H, W), got shape {tuple(x.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"weight must be 4-d (C_out, C_in/groups, R, S), got shape {tuple(weight.shape)}")
    _checks.check_float_dtype(x, "x")
    _checks.check_same(x, weight, "x", "weight")
    stride = _pair(stride, "stride", 1)
    padding = _pair(padding, "padding", 0)
    dilation = _pair(dilation, "dilation", 1)
    _groups(groups)
    c_in, c_out = x.shape[1], weight.shape[0]
    if groups < 1 or c_in % groups or c_out % groups:
        raise ValueError(f"groups={groups} must be >= 1 and divide C_in={c_in} and C_out={c_out}")
    if weight.shape[1] * groups != c_in:
        raise ValueError(
            f"weight has {weight.shape[1]} input channels per group but x has C_in={c_in} with "
            f"groups={groups} (expected weight.shape[1] == {c_in // groups})")
    if weight.shape[2] < 1 or weight.shape[3] < 1:
        raise ValueError(f"weight kernel size must be >= 1, got {tuple(weight.shape[2:])}")
    if bias is not None:
        _checks.check_same(x, bias, "x", "bias")
        if bias.dim() != 1 or bias.shape[0] != c_out:
            raise ValueError(f"bias must have shape ({c_out},), got {tuple(bias.shape)}")
    act = _activation(activation)
    shape = conv_shape(x.shape, weight.shape, stride, padding, dilation, groups)
    for axis, size, k, p, d in ((0, shape.h, shape.r, padding[0], dilation[0]),
                                (1, shape.w, shape.s, padding[1], dilation[1])):
        extent = d * (k - 1) + 1
        if extent > size + 2 * p:
            raise ValueError(
                f"the dilated kernel ({extent} along {'HW'[axis]}) is larger than the padded input "
                f"({size} + 2*{p} = {size + 2 * p}); x shape {tuple(x.shape)}, weight shape "
                f"{tuple(weight.shape)}")
    return shape, act


def conv2d_bias_act(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                    stride=1, padding=0, dilation=1, groups: int = 1, activation: Optional[str] = "relu",
                    backend: Optional[str] = None) -> torch.Tensor:
    """``act(conv2d(x, weight) + bias)`` in one fused op, differentiable.

    Args:
        x: ``(N, C_in, H, W)`` float32/float16/bfloat16, NCHW or channels_last (any strides
            work; other layouts are copied to NCHW first).
        weight: ``(C_out, C_in / groups, R, S)``, x's dtype and device.
        bias: ``(C_out,)`` or None.
        stride, dilation: int or pair, >= 1. padding: int or pair, >= 0 (zero padding).
        groups: divides C_in and C_out. The Triton kernels (the group on a grid axis) and
            the CPU backend run any ``groups``; the CUDA kernel runs ``groups=1`` and hands
            other groups to cuDNN.
        activation: ``"relu"`` (default) or ``None``/``"none"``.
        backend: ``"triton"``, ``"cuda"``, ``"cpu"`` or ``"aten"``; default: ``"cpu"`` on
            CPU tensors, ``"aten"`` (cuDNN) on CUDA tensors except the 16-bit channels_last
            layers where our CUDA kernel measured faster (:func:`cuda_kernel_preferred`:
            RGB first layers; on an sm_90 GPU, every such layer), then the others; see :mod:`pyowt.ops.backend`.

    Returns:
        ``(N, C_out, H_out, W_out)`` in x's memory format (channels_last in, channels_last
        out), with ``H_out = (H + 2*padding - dilation*(R-1) - 1) // stride + 1`` (same for W).

    Raises:
        TypeError / ValueError naming the offending argument (ranks, channels, dtypes,
        devices, groups, a kernel larger than the padded input, bad stride/padding/dilation,
        unknown activation or backend).

    Under ``torch.autocast`` x, weight and bias are cast to the autocast dtype first, as
    ATen's conv2d is.

    Precision: float32 runs in full precision in our kernels, forward and backward (Triton
    with IEEE dots; the CUDA SIMT kernels, whatever torch's TF32 flags say). What the
    ``cuda`` backend hands to cuDNN - the 16-bit backward and everything with ``groups > 1``
    - follows torch's TF32 settings like ``F.conv2d`` (TF32 by default for convolutions;
    ``torch.backends.cudnn.conv.fp32_precision = "ieee"`` for full fp32).
    """
    x, weight, bias = autocast_inputs(x, weight, bias)
    if not isinstance(x, torch.Tensor) or not _checks.tensors_on_one_device(x, weight, bias):
        _validate(x, weight, bias, stride, padding, dilation, groups, activation)  # raises
    chosen = resolve_backend(OP, x.device, backend)
    if (chosen == "aten" and x.is_cuda and cuda_kernel_preferred(x, weight, groups)
            and not is_forced(OP, backend) and unavailable_reason("cuda", x.device) is None):
        chosen = "cuda"
    if composition_required(chosen):
        chosen = "aten"
    if chosen in ("cpu", "cuda"):
        # The C++ op checks the tensors itself (csrc/cpu/conv2d.cpp, csrc/cuda/conv2d.cu,
        # same wording); the full Python checks cost ~5 us per call.
        args = (x, weight, bias, list(_pair(stride, "stride", 1)), list(_pair(padding, "padding", 0)),
                list(_pair(dilation, "dilation", 1)), _groups(groups), _activation(activation))
        return call_cpp_op(_conv_direct, _conv_cpp, args,
                           lambda: _validate(x, weight, bias, stride, padding, dilation, groups, activation))
    if chosen == "triton" and python_kernels_callable((x, weight, bias)):
        plan = _eager_plan(x, weight, bias, stride, padding, dilation, groups, activation)
        return _TritonConv2dEager.apply(x, weight, bias, *plan.args, plan)
    shape, act = _validate(x, weight, bias, stride, padding, dilation, groups, activation)
    args = (list(shape.stride), list(shape.padding), list(shape.dilation), shape.groups, act)
    if chosen == "aten":
        return conv2d_bias_act_reference(x, weight, bias, *args)
    return torch.ops.pyowt.conv2d_bias_act_triton(x, weight, bias, *args)
