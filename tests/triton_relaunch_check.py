"""kernels.relaunch against the installed Triton's own ``JITFunction.run``, without a GPU.

A stand-in driver (current device and stream) and a stand-in compiled kernel whose
launcher records its arguments (benchmarks/triton_launch_host.py) replace what needs a GPU; everything between them is
Triton's: the binder, the specialization, the kernel cache, the launcher call that ends
``JITFunction.run``. The conv forward's eager launch (kernels.conv2d.launch_conv2d_fwd
with a memo) runs: call 1 tunes, call 2 goes through ``JITFunction.run`` and captures the
compiled kernel, later calls relaunch it; then the eager op's backward kernels the same
way. Each check compares what the launcher received.

It must run without ``TRITON_INTERPRET`` (the interpreter replaces ``triton.jit`` at
import), so the test runs it as ``python -m tests.triton_relaunch_check`` and reads one
JSON object: check name -> [passed, detail].
"""
from __future__ import annotations

import json

import torch

from benchmarks import environ


def _same_launch(a, b) -> bool:
    """Equal launcher arguments apart from the hooks and their metadata (slots 6-8)."""
    return len(a) == len(b) and a[:6] == b[:6] and all(x is y or x == y for x, y in zip(a[9:], b[9:]))


def _same_apart_from_tensors(ours, theirs, tensor_counts) -> list:
    """Per launch, whether ours passed what theirs did apart from the leading tensors (new
    ones on every call), ``tensor_counts`` of them per launch."""
    return [_same_launch(a[:9] + a[9 + n:], b[:9] + b[9 + n:]) for a, b, n in zip(ours, theirs, tensor_counts)]


def _count_runs(fns: dict) -> list:
    """Wrap each JIT function's ``run`` (name -> function) so that every call appends its name
    to the returned list."""
    runs = []
    for name, fn in fns.items():
        fn.run = (lambda real, name: lambda *a, **k: runs.append(name) or real(*a, **k))(fn.run, name)
    return runs


def main() -> dict:
    import triton

    from benchmarks.triton_launch_host import activate_stand_in_driver, install_stand_ins

    activate_stand_in_driver()
    from pyowt.kernels import conv2d as K
    from pyowt.ops.conv2d import conv_shape

    stand_in, launches, compiles = install_stand_ins(K.conv2d_fwd_kernel)
    jit_runs = _count_runs({"forward": K.conv2d_fwd_kernel.fn})

    shape = conv_shape((2, 8, 9, 7), (16, 8, 3, 3), (1, 1), (1, 1), (1, 1), 1)

    def tensors(offset=0):
        x = torch.randn(2, 8, 9, 7).contiguous(memory_format=torch.channels_last)
        w = torch.randn(16, 8, 3, 3).contiguous(memory_format=torch.channels_last)
        b = torch.randn(16)
        y_buf = torch.empty(2 * 16 * 9 * 7 + offset)
        y = y_buf[offset:].view(2, 9, 7, 16).permute(0, 3, 1, 2)  # channels_last (N, C, H, W)
        return x, w, b, y

    memo = {}
    first = tensors()

    def launch(ts):
        K.launch_conv2d_fwd(None, *ts, shape, True, memo=memo)

    checks = {}

    def check(name, ok, detail=""):
        checks[name] = [bool(ok), str(detail)]

    def idle(hook):
        """None (Triton < 3.5) or an empty hook chain: the hook calls nothing."""
        return hook is None or (hasattr(hook, "calls") and not hook.calls)

    launch(first)   # tunes (one config) and keeps the launch's arguments
    launch(first)   # JITFunction.run from the memo; captures the compiled kernel
    via_jit = launches[-1]
    check("captured", memo.get("relaunch"), repr(memo.get("relaunch")))
    n_compiles, n_runs = len(compiles), len(jit_runs)
    launch(first)   # relaunch
    check("relaunch skips JITFunction.run", len(jit_runs) == n_runs and len(launches) == 3, len(jit_runs) - n_runs)
    check("relaunch passes what JITFunction.run passed", _same_launch(launches[-1], via_jit),
          f"{len(via_jit)} vs {len(launches[-1])} arguments")
    check("no hooks, no metadata", launches[-1][6:9] == (None, None, None) and all(map(idle, via_jit[7:9])),
          (launches[-1][6:9], via_jit[6:9]))
    check("no compile on relaunch", len(compiles) == n_compiles, len(compiles))
    check("stream and grid", launches[-1][3] == 1000 and launches[-1][:3] == via_jit[:3], launches[-1][:4])

    second = tensors()
    launch(second)
    check("new tensors passed", len(jit_runs) == n_runs and all(a is b for a, b in zip(launches[-1][9:13], second)),
          [type(a).__name__ for a in launches[-1][9:13]])
    check("rest unchanged", launches[-1][13:] == via_jit[13:])

    # A misaligned output (same metadata, data_ptr % 16 == 4): JITFunction.run and a compile.
    misaligned = tensors(offset=1)
    assert misaligned[3].stride() == first[3].stride() and misaligned[3].data_ptr() % 16 == 4
    before = len(jit_runs)
    launch(misaligned)
    check("misaligned pointer goes through the JIT", len(compiles) == n_compiles + 1 and len(jit_runs) == before + 1,
          len(compiles))

    # A launch hook (a profiler): JITFunction.run calls it; so must this path.
    def hook(*args):
        return None

    knobs = getattr(triton, "knobs", None)
    runtime = knobs.runtime if knobs is not None and hasattr(knobs.runtime, "launch_enter_hook") else None
    if runtime is None:
        from triton.compiler import CompiledKernel as runtime
    chain = runtime.launch_enter_hook
    if hasattr(chain, "add"):  # Triton >= 3.5: a HookChain
        chain.add(hook)
    else:
        runtime.launch_enter_hook = hook
    before = len(jit_runs)
    launch(first)
    check("launch hook goes through the JIT", len(jit_runs) == before + 1 and launches[-1][6] == "metadata",
          launches[-1][6:8])
    if hasattr(chain, "remove"):
        chain.remove(hook)
    else:
        runtime.launch_enter_hook = None
    before = len(jit_runs)
    launch(first)
    check("relaunch again without the hook", len(jit_runs) == before and _same_launch(launches[-1], via_jit))

    # Another current device: Triton's cache is per device.
    stand_in.device = 1
    before = len(compiles)
    launch(first)
    check("other device goes through the JIT", len(compiles) == before + 1 and launches[-1][3] == 1001,
          launches[-1][3])
    check("misaligned and other-device calls compiled nothing on relaunch", len(compiles) == n_compiles + 2,
          len(compiles))
    stand_in.device = 0

    # The switch set after the capture: through the JIT at once, and back when unset.
    before = len(jit_runs)
    with environ("PYOWT_TRITON_RELAUNCH", "0"):
        launch(first)
    launch(first)
    check("PYOWT_TRITON_RELAUNCH=0 takes effect on captured kernels", len(jit_runs) == before + 1,
          len(jit_runs) - before)

    # A launcher that refuses the arguments (another Triton's convention): one warning, then
    # every call through the JIT.
    import warnings

    relaunch = memo["relaunch"]

    def refusing(*args):
        raise TypeError(f"function takes exactly {len(args) + 1} arguments ({len(args)} given)")

    relaunch._run = refusing
    before, n_launches = len(jit_runs), len(launches)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        launch(first)
        launch(first)
    check("a refused relaunch warns once and falls back",
          len(jit_runs) == before + 2 and len(launches) == n_launches + 2 and len(caught) == 1
          and "JITFunction.run" in str(caught[0].message), [str(w.message) for w in caught])

    # Switched off: no capture.
    memo.clear()
    with environ("PYOWT_TRITON_RELAUNCH", "0"):
        launch(first)
        launch(first)
    check("PYOWT_TRITON_RELAUNCH=0 captures nothing", memo.get("relaunch") is False, memo.get("relaunch"))
    backward_checks(check)
    linear_checks(check)
    bias_relu_checks(check)
    return checks


def backward_checks(check) -> None:
    """The eager op's backward (pyowt.ops.conv2d: the forward's plan keeps the backward's
    memos): its third forward+backward relaunches the data gradient, the weight gradient's
    partials and their sum, passing what JITFunction.run passed."""
    from benchmarks.triton_launch_host import install_stand_ins
    from pyowt.kernels import conv2d as K
    from pyowt.kernels import conv2d_backward as B
    from pyowt.ops import conv2d as conv_mod

    install_stand_ins(B.conv2d_dgrad_kernel)
    _, launches, _ = install_stand_ins(B.conv2d_wgrad_kernel)  # what compiles from now on records here
    conv_mod.resolve_backend = lambda op, device, backend=None: "triton"  # CPU tensors
    conv_mod._EAGER_PLANS.clear()
    jit_runs = _count_runs({"dgrad": B.conv2d_dgrad_kernel.fn, "partials": B.conv2d_wgrad_kernel.fn,
                            "sum": B.conv2d_wgrad_sum_kernel, "forward": K.conv2d_fwd_kernel.fn})

    def step(weight_format=torch.channels_last):
        x = torch.randn(2, 8, 9, 7).contiguous(memory_format=torch.channels_last).requires_grad_()
        w = torch.randn(16, 8, 3, 3).contiguous(memory_format=weight_format).requires_grad_()
        b = torch.randn(16, requires_grad=True)
        y = conv_mod.conv2d_bias_act(x, w, b, 1, 1, backend="triton")
        start = len(launches)
        grads = torch.autograd.grad(y, [x, w, b], torch.randn(y.shape).contiguous(memory_format=torch.channels_last))
        return launches[start:], grads, w

    step()                               # tunes, keeps the launches' arguments
    jit_runs.clear()
    via_jit, _, _ = step()               # JITFunction.run from the memos; captures
    check("backward: second call through JITFunction.run from its memos",
          sorted(jit_runs) == ["dgrad", "forward", "partials", "sum"], jit_runs)
    jit_runs.clear()
    relaunched, grads, w = step()        # relaunch
    check("backward: third call relaunches every kernel", not jit_runs and len(relaunched) == 3,
          (jit_runs, len(relaunched)))
    same = _same_apart_from_tensors(relaunched, via_jit, (4, 5, 4))  # dgrad, partials, sum
    check("backward: relaunches pass what JITFunction.run passed", len(same) == 3 and all(same), same)
    check("backward: gradients in the weight's layout", grads[1].is_contiguous(memory_format=torch.channels_last)
          and grads[1].dtype == w.dtype, grads[1].stride())
    (plan,) = conv_mod._EAGER_PLANS.values()
    jit_runs.clear()
    _, grads, _ = step(torch.contiguous_format)  # another weight layout: another memo, sum through the JIT
    check("backward: another weight layout gets its own memos",
          len(plan.backward) == 2 and grads[1].is_contiguous() and "sum" in jit_runs, (len(plan.backward), jit_runs))


def linear_checks(check) -> None:
    """The eager Triton linear (kernels.linear keeps a memo per launch geometry): its third
    forward+backward relaunches the forward, dX and dW GEMMs as JITFunction.run did."""
    from benchmarks.triton_launch_host import install_stand_ins
    from pyowt.kernels import linear as L
    from pyowt.ops import linear as linear_mod

    variants = [v for group in (L._FWD, L._DX, L._DW) for v in group.values()]
    launches = None
    for v in variants:
        _, launches, _ = install_stand_ins(v)  # the last one's list records what compiles next
    linear_mod.resolve_backend = lambda op, device, backend=None: "triton"  # CPU tensors
    L._MEMOS.clear()
    jit_runs = _count_runs({"forward": L.linear_fwd_kernel, "dx": L.linear_dx_kernel, "dw": L.linear_dw_kernel})

    def step():
        x = torch.randn(24, 40, requires_grad=True)
        w = torch.randn(48, 40, requires_grad=True)
        b = torch.randn(48, requires_grad=True)
        start = len(launches)
        torch.autograd.grad(linear_mod.linear_bias_act(x, w, b, backend="triton"), [x, w, b], torch.randn(24, 48))
        return launches[start:]

    step()
    jit_runs.clear()
    via_jit = step()
    check("linear: second call through JITFunction.run from its memos", sorted(jit_runs) == ["dw", "dx", "forward"],
          jit_runs)
    jit_runs.clear()
    relaunched = step()
    same = _same_apart_from_tensors(relaunched, via_jit, (4, 5, 4))  # launch order: forward, dW, dX
    check("linear: third call relaunches the three GEMMs as JITFunction.run did",
          not jit_runs and len(relaunched) == 3 and all(same), (jit_runs, len(relaunched), same))


def bias_relu_checks(check) -> None:
    """The eager Triton bias_relu (plain JIT kernels, kernels.bias_relu's memos): its third
    forward+backward relaunches both kernels as JITFunction.run did."""
    import importlib

    import triton.compiler

    from benchmarks.triton_launch_host import RecordingCompiled
    from pyowt.kernels import bias_relu as K

    bias_relu_mod = importlib.import_module("pyowt.ops.bias_relu")  # (pyowt.ops.bias_relu is also the op)

    launches = []
    triton.compiler.compile = lambda src, *args, **kwargs: RecordingCompiled(launches)
    bias_relu_mod.resolve_backend = lambda op, device, backend=None: "triton"  # CPU tensors
    K._MEMOS.clear()
    jit_runs = _count_runs({"forward": K.bias_relu_fwd_kernel, "mask": K.relu_mask_kernel})

    def step():
        x = torch.randn(4, 6, 5, 3, requires_grad=True)
        b = torch.randn(6, requires_grad=True)
        start = len(launches)
        torch.autograd.grad(bias_relu_mod.bias_relu(x, b, 1, backend="triton"), [x, b], torch.randn(4, 6, 5, 3))
        return launches[start:]

    step()
    jit_runs.clear()
    via_jit = step()
    jit_runs.clear()
    relaunched = step()
    same = _same_apart_from_tensors(relaunched, via_jit, (3, 3))
    check("bias_relu: third call relaunches both kernels as JITFunction.run did",
          not jit_runs and len(via_jit) == 2 and len(relaunched) == 2 and all(same), (jit_runs, len(relaunched), same))


if __name__ == "__main__":
    print(json.dumps(main()))
