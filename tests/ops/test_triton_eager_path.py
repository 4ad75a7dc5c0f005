"""How eager calls reach the Triton kernels of every op: straight from a plain
autograd.Function (pyowt.ops.backend.eager_autograd_function, no torch.library dispatch),
bitwise the same as the registered op; the registered op under __torch_function__ modes
and fake tensors; and an autotuned kernel that skips its autotuner once a shape is tuned."""
import importlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from pyowt.ops import bias_relu, conv2d_bias_act, linear_bias_act
from pyowt.ops.bias_relu import bias_relu_reference
from pyowt.ops.conv2d import conv2d_bias_act_reference
from pyowt.ops.linear import linear_bias_act_reference

from ..utils import assert_close_rel, record_calls, recorded_torch_functions


def _leaves(device, *shapes, channels_last_first=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(*shape, generator=g).to(device) for shape in shapes]
    if channels_last_first:
        tensors[0] = tensors[0].contiguous(memory_format=torch.channels_last)
    return [t.requires_grad_() for t in tensors]


# name: (module, eager Function, registered op's name, inputs(device), eager call,
#        registered op call, reference, whether the reference matches bitwise)
CASES = {
    "conv2d": ("pyowt.ops.conv2d", "_TritonConv2dEager", "conv2d_bias_act_triton",
               lambda d, seed=0: _leaves(d, (2, 5, 9, 7), (6, 5, 3, 3), (6,), channels_last_first=True, seed=seed),
               lambda x, w, b: conv2d_bias_act(x, w, b, 2, 1, backend="triton"),
               lambda x, w, b: torch.ops.pyowt.conv2d_bias_act_triton(x, w, b, [2, 2], [1, 1], [1, 1], 1, "relu"),
               lambda x, w, b: conv2d_bias_act_reference(x, w, b, 2, 1), False),
    "linear": ("pyowt.ops.linear", "_TritonLinearEager", "linear_bias_act_triton",
               lambda d: _leaves(d, (2, 3, 13), (9, 13), (9,)),
               lambda x, w, b: linear_bias_act(x, w, b, backend="triton"),
               lambda x, w, b: torch.ops.pyowt.linear_bias_act_triton(x, w, b, "relu"),
               lambda x, w, b: linear_bias_act_reference(x, w, b), False),
    "bias_relu": ("pyowt.ops.bias_relu", "_TritonBiasReluEager", "bias_relu_triton",
                  lambda d: _leaves(d, (2, 5, 3, 4), (5,), channels_last_first=True),
                  lambda x, b: bias_relu(x, b, 1, backend="triton"),
                  lambda x, b: torch.ops.pyowt.bias_relu_triton(x, b, 1),
                  lambda x, b: bias_relu_reference(x, b, 1), True),
}


def _out_and_grads(fn, tensors):
    out = fn(*tensors)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device)
    return [out.detach()] + list(torch.autograd.grad(out, tensors, grad))


@pytest.mark.parametrize("case", CASES)
def test_eager_path_equals_the_registered_op(triton_device, monkeypatch, case):
    # pyowt.ops.bias_relu is also the name of the function: import the module by name.
    module, eager_fn, _, inputs, call, op, ref, _ = CASES[case]
    calls = record_calls(monkeypatch, getattr(importlib.import_module(module), eager_fn), "apply")
    tensors = inputs(triton_device)
    eager = _out_and_grads(call, tensors)
    assert calls == ["apply"], "an eager call did not take the direct Triton path"
    names = ["out"] + [f"grad of input {i}" for i in range(len(tensors))]
    for name, a, r in zip(names, eager, _out_and_grads(op, tensors)):
        assert torch.equal(a, r), f"{name}: the eager path differs from the registered op"
    for name, a, r in zip(names, eager, _out_and_grads(ref, tensors)):
        assert_close_rel(a, r, torch.float32, name)


@pytest.mark.parametrize("case", CASES)
def test_modes_and_fake_tensors_take_the_registered_op(triton_device, monkeypatch, case):
    module, eager_fn, op_name, inputs, call, _, ref, ref_exact = CASES[case]
    calls = record_calls(monkeypatch, getattr(importlib.import_module(module), eager_fn), "apply")
    tensors = [t.detach() for t in inputs(triton_device)]
    with recorded_torch_functions() as seen:
        out = call(*tensors)
    assert any(op_name in str(f) for f in seen), seen
    if ref_exact:
        assert torch.equal(out, ref(*tensors))
    else:
        assert_close_rel(out, ref(*tensors), torch.float32, "under a mode")
    with FakeTensorMode() as mode:
        fake = call(*(mode.from_tensor(t) for t in tensors))
    assert fake.shape == out.shape and fake.stride() == out.stride()
    assert not calls, "a mode or fake tensors reached the direct Triton path"


def test_launch_skips_the_autotuner_once_tuned(triton_device, monkeypatch):
    from pyowt.kernels import autotuned, conv2d as kconv
    from pyowt.ops import conv2d as conv_mod

    monkeypatch.setattr(autotuned, "_PICKED", {})
    monkeypatch.setattr(conv_mod, "_EAGER_PLANS", {})
    tuner = kconv.conv2d_fwd_kernel
    tuner_runs = []
    monkeypatch.setattr(tuner, "run", lambda *a, real=tuner.run, **k: tuner_runs.append(1) or real(*a, **k))
    x, w, b = (t.detach() for t in CASES["conv2d"][3](triton_device, seed=3))
    first = conv2d_bias_act(x, w, b, 1, 1, backend="triton")
    assert len(tuner_runs) == 1 and len(autotuned._PICKED) == 1
    (kernel, key), (config, config_kwargs) = next(iter(autotuned._PICKED.items()))
    assert kernel is kconv.conv2d_fwd_kernel and config is kconv.conv2d_fwd_kernel.best_config
    assert config_kwargs == config.all_kwargs()
    # the eager plan now holds the launch's scalars: the next call passes only tensors
    (plan,) = conv_mod._EAGER_PLANS.values()
    assert plan.memo["launch"][1]["grid"] and plan.memo["launch"][1]["warmup"] is False
    generic = []
    monkeypatch.setattr(autotuned, "launch_autotuned",
                        lambda *a, real=autotuned.launch_autotuned, **k: generic.append("launch_autotuned") or real(*a, **k))
    again = conv2d_bias_act(x, w, b, 1, 1, backend="triton")
    assert len(tuner_runs) == 1, "the second call of a tuned shape went through the autotuner"
    assert not generic, "the second call did not take the plan's prepared launch"
    assert torch.equal(first, again)
    conv2d_bias_act(x[:1], w, b, 1, 1, backend="triton")  # a new shape is tuned first
    assert len(tuner_runs) == 2 and len(autotuned._PICKED) == 2 and generic == ["launch_autotuned"]


@pytest.mark.parametrize("channels_last", [False, True])
def test_packed_rgb_launch_repeats_from_the_plan(triton_device, monkeypatch, channels_last):
    # An RGB layer's packed walk copies x and w into 4-channel buffers on every call (they
    # hold the call's data); once tuned, its launch too is taken from the plan, on the new
    # copies: a second call on other data matches the reference without the generic launch.
    from pyowt.kernels import autotuned
    from pyowt.ops import conv2d as conv_mod

    monkeypatch.setattr(conv_mod, "_EAGER_PLANS", {})
    g = torch.Generator().manual_seed(5)
    x1, x2 = (torch.randn(2, 3, 13, 11, generator=g).to(triton_device) for _ in range(2))
    if channels_last:
        x1, x2 = (t.contiguous(memory_format=torch.channels_last) for t in (x1, x2))
    w, b = torch.randn(6, 3, 5, 5, generator=g).to(triton_device), torch.randn(6, generator=g).to(triton_device)
    first = conv2d_bias_act(x1, w, b, 2, 1, backend="triton")
    (plan,) = conv_mod._EAGER_PLANS.values()
    assert plan.memo["packed"] is True and plan.memo["launch"]
    generic = record_calls(monkeypatch, autotuned, "launch_autotuned")
    packs = record_calls(monkeypatch, conv_mod._fwd, "pack_rgb")
    second = conv2d_bias_act(x2, w, b, 2, 1, backend="triton")
    assert not generic, "the second call of a tuned RGB layer did not launch from its plan"
    assert packs == ["pack_rgb"]
    assert_close_rel(first, conv2d_bias_act_reference(x1, w, b, 2, 1), torch.float32, "first call")
    assert_close_rel(second, conv2d_bias_act_reference(x2, w, b, 2, 1), torch.float32, "second call")
    assert second.is_contiguous(memory_format=torch.channels_last) is channels_last


def test_conv_eager_plans_keep_every_check(triton_device, monkeypatch):
    # pyowt.ops.conv2d caches, per tensor metadata and conv arguments, what _validate found
    # for an eager Triton call; a call the cache has seen must still refuse what it refused
    # before and follow its input's layout.
    from pyowt.ops import conv2d as conv_mod

    monkeypatch.setattr(conv_mod, "_EAGER_PLANS", {})
    validations = record_calls(monkeypatch, conv_mod, "_validate")
    x, w, b = (t.detach() for t in CASES["conv2d"][3](triton_device, seed=4))
    out = conv2d_bias_act(x, w, b, (2, 2), 1, backend="triton")
    again = conv2d_bias_act(x, w, b, (2, 2), 1, backend="triton")
    assert validations == ["_validate"], "the second call of a geometry was validated again"
    assert torch.equal(out, again) and out.is_contiguous(memory_format=torch.channels_last)
    # the same shapes in NCHW: another plan, an NCHW output, the same values
    nchw = conv2d_bias_act(x.contiguous(), w, b, (2, 2), 1, backend="triton")
    assert nchw.is_contiguous() and torch.equal(nchw, out)
    with pytest.raises(TypeError, match=r"stride must be an int or a pair of ints, got \(True, True\)"):
        conv2d_bias_act(x, w, b, (True, True), 1, backend="triton")  # equal to (1, 1) as a key
    with pytest.raises(TypeError, match="weight dtype torch.float64 differs from x dtype torch.float32"):
        conv2d_bias_act(x, w.double(), b, (2, 2), 1, backend="triton")
    with pytest.raises(ValueError, match=r"bias must have shape \(6,\), got \(5,\)"):
        conv2d_bias_act(x, w, b[:5], (2, 2), 1, backend="triton")
    with pytest.raises(ValueError, match=r"activation must be 'relu', 'none' or None, got \['relu'\]"):
        conv2d_bias_act(x, w, b, (2, 2), 1, activation=["relu"], backend="triton")
    assert len(conv_mod._EAGER_PLANS) == 2, "a refused call was cached"


def test_conv_eager_plan_cache_is_bounded(triton_device, monkeypatch):
    from pyowt.ops import conv2d as conv_mod

    monkeypatch.setattr(conv_mod, "_EAGER_PLANS", {})
    monkeypatch.setattr(conv_mod, "_EAGER_PLANS_MAX", 3)
    x, w, b = (t.detach() for t in CASES["conv2d"][3](triton_device, seed=5))
    for padding in range(5):
        conv2d_bias_act(x, w, b, 1, padding, backend="triton")
        assert 1 <= len(conv_mod._EAGER_PLANS) <= 3


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["eager", "registered op"])
@pytest.mark.parametrize("case", CASES)
def test_gpu_triton_ops_launch_on_their_tensors_device(case, path):
    # Triton launches on the current device; the ops switch to their tensors' device
    # (pyowt.ops.backend.on_input_device), as the C++ ops' CUDAGuard does.
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    _, _, _, inputs, call, op, ref, _ = CASES[case]
    device = torch.device("cuda", torch.cuda.device_count() - 1)
    tensors = inputs(device)
    with torch.cuda.device(0):
        got = _out_and_grads(call if path == "eager" else op, tensors)
        assert torch.cuda.current_device() == 0, "an op left another device current"
    names = ["out"] + [f"grad of input {i}" for i in range(len(tensors))]
    for name, a, r in zip(names, got, _out_and_grads(ref, tensors)):
        assert a.device == device, name
        assert_close_rel(a, r, torch.float32, name)


@pytest.mark.parametrize("activation", ["relu", None])
def test_conv_eager_backward_launches_from_the_plan(triton_device, monkeypatch, activation):
    # The eager backward keeps its launches' arguments in the forward's plan, per gradient
    # layout: later backward passes of a geometry skip the launchers' preparation (here
    # under the interpreter: no relaunch, JITFunction.run from the memos), with the same
    # gradients, and a weight in another layout gets memos (and a gradient) of its own.
    from pyowt.kernels import conv2d as kconv
    from pyowt.kernels import conv2d_backward as kbwd
    from pyowt.ops import conv2d as conv_mod

    monkeypatch.setattr(conv_mod, "_EAGER_PLANS", {})
    prepared = record_calls(monkeypatch, kconv, "launch_and_remember")
    prepared_bwd = record_calls(monkeypatch, kbwd, "launch_and_remember")
    x, w, b = CASES["conv2d"][3](triton_device, seed=6)
    grad = torch.randn(2, 6, 5, 4, generator=torch.Generator().manual_seed(7)).to(triton_device)

    def grads(weight):
        weight = weight.detach().requires_grad_()
        out = conv2d_bias_act(x, weight, b, 2, 1, activation=activation, backend="triton")
        return torch.autograd.grad(out, (x, weight, b), grad)

    first = grads(w)
    assert len(prepared) == 1 and len(prepared_bwd) == 3  # forward; dgrad, partials, sum
    second, third = grads(w), grads(w)
    assert len(prepared) == 1 and len(prepared_bwd) == 3, "a planned call prepared its launches again"
    for a, s, t in zip(first, second, third):
        assert torch.equal(a, s) and torch.equal(a, t)
    (plan,) = conv_mod._EAGER_PLANS.values()
    assert len(plan.backward) == 1
    assert w.is_contiguous() and first[1].is_contiguous()
    nhwc = grads(w.contiguous(memory_format=torch.channels_last))
    assert len(plan.backward) == 2 and nhwc[1].is_contiguous(memory_format=torch.channels_last)
    for a, n in zip(first, nhwc):
        assert torch.equal(a, n)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    ref = torch.autograd.grad(conv2d_bias_act_reference(x64, w64, b64, 2, 1, activation=activation), (x64, w64, b64),
                              grad.double())
    for name, a, r in zip(("grad x", "grad weight", "grad bias"), first, ref):
        assert_close_rel(a, r, torch.float32, name)


def test_linear_eager_launches_from_memos(triton_device, monkeypatch):
    # kernels.linear keeps a memo per launch geometry: the second forward+backward of a shape
    # prepares none of its three launches again and gives the same results; another shape
    # (or layout) is prepared once.
    from pyowt.kernels import linear as klin
    from pyowt.kernels.autotuned import LaunchMemos

    monkeypatch.setattr(klin, "_MEMOS", LaunchMemos())
    prepared = record_calls(monkeypatch, klin, "launch_and_remember")
    x, w, b = CASES["linear"][3](triton_device)
    first = _out_and_grads(CASES["linear"][4], [x, w, b])
    assert len(prepared) == 3 and len(klin._MEMOS) == 3
    second = _out_and_grads(CASES["linear"][4], [x, w, b])
    assert len(prepared) == 3, "a seen linear launch was prepared again"
    for a, s in zip(first, second):
        assert torch.equal(a, s)
    wt = w.detach().t().contiguous().t().requires_grad_()  # the same weight, column-major
    other = _out_and_grads(CASES["linear"][4], [x, wt, b])
    assert len(prepared) > 3 and len(klin._MEMOS) > 3
    for a, o in zip(first, other):
        torch.testing.assert_close(a, o)


def test_bias_relu_eager_launches_from_memos(triton_device, monkeypatch):
    from pyowt.kernels import bias_relu as kbr
    from pyowt.kernels.autotuned import LaunchMemos

    monkeypatch.setattr(kbr, "_MEMOS", LaunchMemos())
    prepared = record_calls(monkeypatch, kbr, "launch_and_remember")
    tensors = CASES["bias_relu"][3](triton_device)
    first = _out_and_grads(CASES["bias_relu"][4], tensors)
    assert len(prepared) == 2 and len(kbr._MEMOS) == 2  # forward, ReLU mask
    second = _out_and_grads(CASES["bias_relu"][4], tensors)
    assert len(prepared) == 2, "a seen bias_relu launch was prepared again"
    for a, s in zip(first, second):
        assert torch.equal(a, s)
