"""kernels.relaunch: the conv's eager calls (forward and backward) relaunch the compiled
kernels once the plan has seen them, skipping Triton's JITFunction.run, and fall back to it
whenever Triton would have launched something else."""
import json

import pytest
import torch

from pyowt.ops import conv2d_bias_act
from pyowt.ops.conv2d import conv2d_bias_act_reference

from ..utils import assert_close_rel, run_without_interpreter, triton_nvidia_backend

def test_relaunch_matches_triton_jit_without_gpu():
    # tests/triton_relaunch_check.py: Triton's own JITFunction.run with a stand-in driver and
    # a recording launcher, in a process without TRITON_INTERPRET.
    if not triton_nvidia_backend():
        pytest.skip("this Triton has no NVIDIA backend")
    proc = run_without_interpreter("tests.triton_relaunch_check", timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    checks = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(checks) >= 24, checks
    failed = {name: detail for name, (ok, detail) in checks.items() if not ok}
    assert not failed, failed


def _count_jit_runs(monkeypatch, *fns) -> list:
    """A list that gets one entry per ``JITFunction.run`` call of any of ``fns``."""
    runs = []
    for fn in fns:
        monkeypatch.setattr(fn, "run", lambda *a, real=fn.run, **k: runs.append(1) or real(*a, **k))
    return runs


def _channels_last_at(t: torch.Tensor, offset: int) -> torch.Tensor:
    """A copy of channels-last ``t`` that starts ``offset`` elements into its storage."""
    n, c, h, w = t.shape
    buf = torch.empty(t.numel() + offset, dtype=t.dtype, device=t.device)
    view = buf[offset:].view(n, h, w, c).permute(0, 3, 1, 2)
    view.copy_(t)
    return view


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_conv_relaunch(monkeypatch, dtype):
    from pyowt.kernels import conv2d as kconv
    from pyowt.kernels.relaunch import CompiledLaunch
    from pyowt.ops import conv2d as conv_mod

    monkeypatch.setattr(conv_mod, "_EAGER_PLANS", {})
    g = torch.Generator().manual_seed(11)
    x, x2 = (torch.randn(3, 24, 11, 13, generator=g).to("cuda", dtype).contiguous(memory_format=torch.channels_last)
             for _ in range(2))
    w = torch.randn(40, 24, 3, 3, generator=g).to("cuda", dtype)
    b = torch.randn(40, generator=g).to("cuda", dtype)
    first = conv2d_bias_act(x, w, b, 1, 1, backend="triton")   # tunes
    second = conv2d_bias_act(x, w, b, 1, 1, backend="triton")  # JITFunction.run from the plan
    (plan,) = conv_mod._EAGER_PLANS.values()
    assert isinstance(plan.memo.get("relaunch"), CompiledLaunch), plan.memo.get("relaunch")
    fn = kconv.conv2d_fwd_kernel.fn
    jit_runs = _count_jit_runs(monkeypatch, fn)
    third = conv2d_bias_act(x, w, b, 1, 1, backend="triton")
    other = conv2d_bias_act(x2, w, b, 1, 1, backend="triton")
    assert not jit_runs, "a planned call went through JITFunction.run"
    assert torch.equal(first, second) and torch.equal(first, third)
    registered = torch.ops.pyowt.conv2d_bias_act_triton(x2, w, b, [1, 1], [1, 1], [1, 1], 1, "relu")
    assert torch.equal(other, registered)
    ref = conv2d_bias_act_reference(x2.double(), w.double(), b.double(), 1, 1)
    assert_close_rel(other.double(), ref, dtype, "relaunched output")
    # Same metadata, an input 2 elements off 16-byte alignment: Triton compiles another
    # specialization, so the call must go through it.
    shifted = _channels_last_at(x2, 2 if dtype == torch.float32 else 1)
    assert shifted.stride() == x2.stride() and shifted.data_ptr() % 16 != 0
    jit_runs.clear()  # the registered op went through JITFunction.run
    out = conv2d_bias_act(shifted, w, b, 1, 1, backend="triton")
    assert jit_runs == [1], "a misaligned input was relaunched with the aligned kernel"
    assert_close_rel(out.double(), ref, dtype, "misaligned input's output")
    # PYOWT_TRITON_RELAUNCH=0: new plans capture nothing.
    monkeypatch.setenv("PYOWT_TRITON_RELAUNCH", "0")
    conv_mod._EAGER_PLANS.clear()
    for _ in range(3):
        conv2d_bias_act(x, w, b, 1, 1, backend="triton")
    (plan,) = conv_mod._EAGER_PLANS.values()
    assert plan.memo.get("relaunch") is False


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight_format", [torch.channels_last, torch.contiguous_format], ids=["nhwc_w", "nchw_w"])
def test_gpu_conv_backward_relaunch(monkeypatch, dtype, weight_format):
    # The eager backward keeps its three launches (data gradient, weight-gradient partials,
    # their sum) in the forward's plan: the third forward+backward relaunches all of them,
    # with the registered op's gradients bit for bit, in the weight's layout and dtype.
    from pyowt.kernels import conv2d_backward as kbwd
    from pyowt.ops import conv2d as conv_mod

    monkeypatch.setattr(conv_mod, "_EAGER_PLANS", {})
    g = torch.Generator().manual_seed(12)
    x = torch.randn(4, 24, 11, 13, generator=g).to("cuda", dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(40, 24, 3, 3, generator=g).to("cuda", dtype).contiguous(memory_format=weight_format)
    b = torch.randn(40, generator=g).to("cuda", dtype)
    grad = torch.randn(4, 40, 11, 13, generator=g).to("cuda", dtype).contiguous(memory_format=torch.channels_last)
    leaves = [t.requires_grad_() for t in (x, w, b)]

    def grads(op):
        return torch.autograd.grad(op(*leaves), leaves, grad)

    def eager(x, w, b):
        return conv2d_bias_act(x, w, b, 1, 1, backend="triton")

    first, second = grads(eager), grads(eager)
    jit_runs = _count_jit_runs(monkeypatch, kbwd.conv2d_dgrad_kernel.fn, kbwd.conv2d_wgrad_kernel.fn,
                               kbwd.conv2d_wgrad_sum_kernel)
    third = grads(eager)
    assert not jit_runs, f"{len(jit_runs)} backward launches of a planned call went through JITFunction.run"
    registered = grads(lambda x, w, b: torch.ops.pyowt.conv2d_bias_act_triton(x, w, b, [1, 1], [1, 1], [1, 1], 1,
                                                                               "relu"))
    for name, a, s, t, r in zip(("grad x", "grad weight", "grad bias"), first, second, third, registered):
        assert torch.equal(a, s) and torch.equal(a, t) and torch.equal(a, r), name
    assert third[1].is_contiguous(memory_format=weight_format) and third[1].dtype == dtype
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in leaves)
    ref = torch.autograd.grad(conv2d_bias_act_reference(x64, w64, b64, 1, 1), (x64, w64, b64), grad.double())
    for name, a, r in zip(("grad x", "grad weight", "grad bias"), third, ref):
        assert_close_rel(a.double(), r, dtype, name)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_linear_relaunch(monkeypatch, dtype):
    # The eager Triton linear's third forward+backward of a shape relaunches its three GEMMs
    # (kernels.linear's memos), bit for bit the registered op's results.
    from pyowt.kernels import linear as klin
    from pyowt.kernels.autotuned import LaunchMemos
    from pyowt.ops import linear_bias_act
    from pyowt.ops.linear import linear_bias_act_reference

    monkeypatch.setattr(klin, "_MEMOS", LaunchMemos())
    g = torch.Generator().manual_seed(13)
    x = torch.randn(96, 200, generator=g).to("cuda", dtype).requires_grad_()
    w = torch.randn(144, 200, generator=g).to("cuda", dtype).requires_grad_()
    b = torch.randn(144, generator=g).to("cuda", dtype).requires_grad_()
    grad = torch.randn(96, 144, generator=g).to("cuda", dtype)

    def run(op):
        out = op(x, w, b)
        return [out.detach(), *torch.autograd.grad(out, (x, w, b), grad)]

    def eager(x, w, b):
        return linear_bias_act(x, w, b, backend="triton")

    first, second = run(eager), run(eager)
    jit_runs = _count_jit_runs(monkeypatch, klin.linear_fwd_kernel, klin.linear_dx_kernel, klin.linear_dw_kernel)
    third = run(eager)
    assert not jit_runs, f"{len(jit_runs)} launches of a seen shape went through JITFunction.run"
    registered = run(lambda x, w, b: torch.ops.pyowt.linear_bias_act_triton(x, w, b, "relu"))
    for name, a, s, t, r in zip(("out", "grad x", "grad weight", "grad bias"), first, second, third, registered):
        assert torch.equal(a, s) and torch.equal(a, t) and torch.equal(a, r), name
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    ref64 = linear_bias_act_reference(x64, w64, b64)
    ref = [ref64.detach(), *torch.autograd.grad(ref64, (x64, w64, b64), grad.double())]
    for name, a, r in zip(("out", "grad x", "grad weight", "grad bias"), third, ref):
        assert_close_rel(a.double(), r, dtype, name)
