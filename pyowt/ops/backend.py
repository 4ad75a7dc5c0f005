"""Backend choice for pyowt's operators.

Every op has up to four implementations:

* ``"triton"``: a Triton kernel (CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``),
* ``"cuda"``: the C++/CUDA kernel of the compiled extension (CUDA tensors),
* ``"cpu"``: the C++ kernel of the compiled extension (CPU tensors),
* ``"aten"``: a composition of PyTorch ops, the reference.

The choice, in order of precedence: the op's ``backend=`` argument, the environment
variable ``PYOWT_BACKEND_<OP>`` (e.g. ``PYOWT_BACKEND_BIAS_RELU=triton``), then
``PYOWT_BACKEND``, then the op's default preference for the tensor's device, skipping
backends that are not available here.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from .. import _extension
from ..kernels import HAS_TRITON, interpreter_enabled

BACKENDS = ("triton", "cuda", "cpu", "aten")


@dataclass(frozen=True)
class OpSpec:
    """The backends one op implements and the order to prefer them per device type."""

    name: str
    implemented: Tuple[str, ...]
    prefer_cuda: Tuple[str, ...]
    prefer_cpu: Tuple[str, ...]


_OPS: Dict[str, OpSpec] = {}
_OP_ENV_KEYS: Dict[str, object] = {}  # name -> its PYOWT_BACKEND_<OP> key for _getenv


def register_op(name: str, implemented, prefer_cuda, prefer_cpu) -> OpSpec:
    """Declare an op's backends (called once per op module, at import)."""
    for b in tuple(implemented) + tuple(prefer_cuda) + tuple(prefer_cpu):
        if b not in BACKENDS:
            raise ValueError(f"op {name!r}: unknown backend {b!r}; expected one of {BACKENDS}")
    spec = OpSpec(name, tuple(implemented), tuple(prefer_cuda), tuple(prefer_cpu))
    _OPS[name] = spec
    _OP_ENV_KEYS[name] = _env_key(f"PYOWT_BACKEND_{name.upper()}")
    _RESOLVED.clear()
    return spec


def registered_ops() -> Dict[str, OpSpec]:
    return dict(_OPS)


def unavailable_reason(backend: str, device: torch.device) -> Optional[str]:
    """None if ``backend`` can run on ``device`` here, else why not."""
    ext = _extension.STATUS
    if backend == "aten":
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"backend 'cpu' needs CPU tensors, got device {device}"
        return None if ext.loaded else f"the extension is not loaded ({ext.reason})"
    if backend == "cuda":
        if device.type != "cuda":
            return f"backend 'cuda' needs CUDA tensors, got device {device}"
        if not ext.loaded:
            return f"the extension is not loaded ({ext.reason})"
        return None if ext.with_cuda else "the extension was built without CUDA"
    if backend == "triton":
        if not HAS_TRITON:
            return "triton is not installed"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and interpreter_enabled():
            return None
        return f"backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU), got device {device}"
    return f"unknown backend {backend!r}; expected one of {BACKENDS}"


def call_cpp_op(direct, boxed, args, explain_refusal):
    """``op(*args)`` for a C++ op, leaving the argument checks to its kernels.

    ``direct`` is the op's unboxed pybind entry (csrc/direct_calls.cpp; None if the
    extension lacks it), used in eager mode when no argument has a ``__torch_function__``
    override and no such mode is on, which ``torch.ops`` (``boxed``) would honour;
    dispatch-level modes, fake tensors and autograd work either way. When the kernel
    refuses, ``explain_refusal()`` re-checks the arguments in Python to raise the
    TypeError/ValueError the other backends raise; if they pass, the kernel's error stands.
    """
    try:
        if direct is not None and not _is_compiling() and not _has_torch_function(args):
            return direct(*args)
        return boxed(*args)
    except (RuntimeError, TypeError):
        explain_refusal()
        raise


_has_torch_function = torch.overrides.has_torch_function
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def python_kernels_callable(tensors) -> bool:
    """Whether an op's Triton kernels may be launched from Python without its registered
    op (``tensors``: the op's tensor arguments, None allowed): eager mode, plain tensors,
    no ``__torch_function__`` override or mode (those see ``torch.ops``, as for the C++
    ops) and no dispatch mode (fake tensors, tracing, op-counting profilers)."""
    tensors = tuple(t for t in tensors if t is not None)
    return (not _is_compiling() and torch._C._len_torch_dispatch_stack() == 0
            and all(type(t) in _PLAIN_TENSORS for t in tensors) and not _has_torch_function(tensors))


def on_input_device(body):
    """``body(launch, t, *args)``, a Triton op's forward or backward body, run with its first
    tensor's CUDA device current: Triton launches on the current device, not on its
    arguments' (tensors on cuda:1 under current device 0 would fault). The C++ ops hold a
    CUDAGuard; under torch.compile inductor emits its own guard, and fake tensors launch
    nothing."""
    @functools.wraps(body)
    def run(launch, t, *args, **kwargs):
        if t.is_cuda and type(t) in _PLAIN_TENSORS and not _is_compiling():
            index = t.device.index
            if index is not None and index != torch.cuda.current_device():
                with torch.cuda.device(index):
                    return body(launch, t, *args, **kwargs)
        return body(launch, t, *args, **kwargs)

    return run


def eager_autograd_function(name: str, forward, setup_context, backward):
    """A ``torch.autograd.Function`` named ``name`` whose forward runs ``forward(*inputs)``
    and saves through ``setup_context(ctx, inputs, output)`` (the registered op's own) and
    whose backward is ``backward(ctx, grad)``: how eager calls reach an op's Triton kernels
    when :func:`python_kernels_callable`, without torch.library's Python custom-op dispatch
    (~80 us of host time per conv forward on the 2-core dev CPU; on an H100 the conv op ran
    host-bound at 0.23-0.46 ms per call where its kernel takes ~0.08 ms, RESULTS.md)."""
    def run_forward(ctx, *inputs):
        output = forward(*inputs)
        setup_context(ctx, inputs, output)
        return output

    return type(name, (torch.autograd.Function,),
                {"forward": staticmethod(run_forward), "backward": staticmethod(backward)})


_forward_ad = torch.autograd.forward_ad


def forward_ad_active() -> bool:
    """True inside forward-mode AD (a ``forward_ad.dual_level``, ``torch.func.jvp``).

    The Triton ops have no forward derivative and would silently drop a tangent, so the op
    front ends run the ATen composition then (the C++ ops check their inputs' tangents
    themselves: csrc/autograd_skip.h).
    """
    return getattr(_forward_ad, "_current_level", -1) >= 0


_functorch_stack = getattr(getattr(torch._C, "_functorch", None), "peek_interpreter_stack",
                           lambda: None)


def functorch_active() -> bool:
    """True inside a ``torch.func`` transform (grad, vjp, jacrev, hessian, vmap, jvp, ...).

    The C++ ops' autograd is a C++ ``autograd::Function`` and the Triton ops' a registered
    autograd without functorch rules: under these transforms torch refuses both ("cannot use
    C++ torch::autograd::Function with functorch transforms"), so the op front ends run the
    ATen composition there, which every transform supports (vmap then uses ATen's batching
    rules instead of a per-sample loop). Not while torch.compile traces (nothing to peek).
    """
    return _functorch_stack() is not None and not _is_compiling()  # the cheap test first


def composition_required(chosen: str) -> bool:
    """Whether a call for which ``chosen`` was resolved must run the ATen composition
    instead: inside a torch.func transform (any backend), or carrying a forward-mode
    tangent on the Triton backend (the C++ ops route tangents themselves)."""
    return functorch_active() or (chosen == "triton" and forward_ad_active())


def is_forced(op: str, backend: Optional[str] = None) -> bool:
    """True when ``backend=`` or the environment names ``op``'s backend (no default applies)."""
    return _requested(op, backend)[0] is not None


def _requested(op: str, backend: Optional[str]) -> Tuple[Optional[str], str]:
    if backend is not None:
        return backend, "backend="
    key = f"PYOWT_BACKEND_{op.upper()}"
    for var in (key, "PYOWT_BACKEND"):
        value = os.environ.get(var, "").strip()
        if value:
            return value, var
    return None, ""


def resolve_backend(op: str, device: torch.device, backend: Optional[str] = None) -> str:
    """The backend ``op`` runs with on ``device``.

    Raises ``ValueError`` when a forced backend is unknown, not implemented by the op, or
    not available for this device, naming what was asked and why it cannot run.
    """
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    if (backend is not None and not isinstance(backend, str)) or _is_compiling():
        # A bad backend= raises, naming the value. Under torch.compile the plain lookup is
        # traced instead of the cache (dynamo should not guard on the whole environment).
        return _resolve(op, torch.device(device_type), backend)
    # Every input of the choice is in the key (the environment is read on every call, so
    # setting a variable takes effect at once); only successful choices are cached. This
    # runs on every call of every fused op, where host time matters (benchmarks/RESULTS.md).
    key = (op, device_type, backend, _getenv(_OP_ENV_KEYS[op]), _getenv(_ENV_ALL), _getenv(_ENV_INTERPRET))
    chosen = _RESOLVED.get(key)
    if chosen is None:
        chosen = _resolve(op, torch.device(device_type), backend)
        _RESOLVED[key] = chosen
    return chosen


_is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)

# (op, device type, backend=, env values) -> backend; the extension and Triton availability
# are fixed for the process, so they need no place in the key.
_RESOLVED: Dict[tuple, str] = {}

# os.environ.get costs ~0.7 us for a missing variable (a KeyError raised inside); its
# backing dict, which every os.environ write updates, answers in ~0.05 us. POSIX CPython
# keys it by bytes; elsewhere fall back to os.environ.
_ENV_DATA = getattr(os.environ, "_data", None) if os.name == "posix" else None
if not isinstance(_ENV_DATA, dict):
    _ENV_DATA = None


def _env_key(name: str):
    return os.fsencode(name) if _ENV_DATA is not None else name


_ENV_ALL = _env_key("PYOWT_BACKEND")
_ENV_INTERPRET = _env_key("TRITON_INTERPRET")


def _getenv(key):
    return _ENV_DATA.get(key) if _ENV_DATA is not None else os.environ.get(key)


def check_backend_name(op: str, backend: Optional[str], owner: str) -> Optional[str]:
    """``backend`` if it is None or a backend ``op`` implements, else ``ValueError``.

    For modules that store a ``backend=`` for later calls: a misspelt name is refused where
    it is given, not at the first forward. Whether it can run on a device is decided per
    call (the module may move), by :func:`resolve_backend`.
    """
    if backend is None:
        return None
    implemented = _OPS[op].implemented
    if not isinstance(backend, str) or backend not in implemented:
        raise ValueError(f"{owner}: backend must be None or one of {implemented}, got {backend!r}")
    return backend


def _resolve(op: str, device: torch.device, backend: Optional[str]) -> str:
    spec = _OPS[op]
    requested, source = _requested(op, backend)
    if requested is not None:
        if not isinstance(requested, str) or requested not in BACKENDS:
            raise ValueError(f"{op}: {source}{requested!r} is not a backend; expected one of {BACKENDS}")
        if requested not in spec.implemented:
            raise ValueError(f"{op}: {source}{requested!r} is not implemented; it has {spec.implemented}")
        why = unavailable_reason(requested, device)
        if why is not None:
            raise ValueError(f"{op}: {source}{requested!r} cannot run: {why}")
        return requested
    order = spec.prefer_cuda if device.type == "cuda" else spec.prefer_cpu
    for b in order:
        if b in spec.implemented and unavailable_reason(b, device) is None:
            return b
    return "aten"
