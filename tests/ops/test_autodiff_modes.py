"""Autodiff beyond one backward pass through the fused ops equals ATen's.

* Gradients of gradients (``create_graph=True``): the fused backward kernels have no
  derivative of their own, so under ``create_graph`` every backend computes its
  first-order gradients with differentiable ATen ops; second-order gradients (gradient
  penalties, Hessian-vector products) are exact instead of silently missing terms.
* Forward mode (``torch.func.jvp``, ``torch.autograd.forward_ad``): the kernels have no
  forward derivative, so calls carrying a tangent run the ATen composition; before, the
  tangent silently came back as zero.
* ``torch.func`` transforms (grad, hessian, vmap of grad): torch refuses the C++ ops'
  autograd::Function and the Triton ops' registered autograd under them, so the ops run
  the ATen composition inside a transform.
* In-place use of an output (an in-place ReLU or dropout after a layer without
  activation): allowed where the backward does not need the output, refused by autograd's
  version check where it does (the ReLU mask); the Triton linear returned a view, which
  autograd refused to modify in place at all.
"""
import pytest
import torch
import torch.autograd.forward_ad as fwAD

from pyowt import _extension
from pyowt.ops import bias_relu, conv2d_bias_act, linear_bias_act

from ..utils import assert_close_rel, fp32_precision

CASES = {
    # name: (call(backend, *tensors), shapes, which tensors require grad)
    "linear relu 3-d": (lambda be, x, w, b: linear_bias_act(x, w, b, backend=be),
                        [(2, 3, 5), (4, 5), (4,)], (True, True, True)),
    "linear none, no bias": (lambda be, x, w: linear_bias_act(x, w, None, None, backend=be),
                             [(6, 7), (3, 7)], (True, True)),
    "linear 1-d x": (lambda be, x, w, b: linear_bias_act(x, w, b, backend=be),
                     [(5,), (4, 5), (4,)], (True, True, True)),
    "conv relu strided": (lambda be, x, w, b: conv2d_bias_act(x, w, b, 2, 1, backend=be),
                          [(2, 3, 7, 6), (4, 3, 3, 3), (4,)], (True, True, True)),
    "conv first layer": (lambda be, x, w, b: conv2d_bias_act(x, w, b, 1, 2, backend=be),
                         [(1, 3, 8, 8), (5, 3, 5, 5), (5,)], (False, True, True)),
    "conv none grouped": (lambda be, x, w: conv2d_bias_act(x, w, None, 1, 1, 1, 2, None, backend=be),
                          [(2, 4, 5, 5), (6, 2, 3, 3)], (True, True)),
    "bias_relu dim 1": (lambda be, x, b: bias_relu(x, b, 1, backend=be), [(3, 4, 5), (4,)], (True, True)),
    "bias_relu dim -1": (lambda be, x, b: bias_relu(x, b, -1, backend=be), [(3, 6), (6,)], (True, True)),
}


def _device(backend, request):
    if backend == "triton":
        return request.getfixturevalue("triton_device")
    if backend == "cpu":
        if not _extension.STATUS.loaded:
            pytest.skip("extension not built")
        return torch.device("cpu")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if not (_extension.STATUS.loaded and _extension.STATUS.with_cuda):
        pytest.skip("the extension has no CUDA kernels here")
    return torch.device("cuda")


def _second_order(call, backend, shapes, wants, device, seed):
    g = torch.Generator().manual_seed(seed)
    leaves = [(torch.randn(s, generator=g) / (s[-1] ** 0.5 if i else 1)).to(device).requires_grad_(want)
              for i, (s, want) in enumerate(zip(shapes, wants))]
    inputs = [t for t in leaves if t.requires_grad]
    y = call(backend, *leaves)
    first = torch.autograd.grad((y * y).sum(), inputs, create_graph=True)
    penalty = sum((d * d).sum() for d in first)
    return first, torch.autograd.grad(penalty, inputs)


@pytest.mark.parametrize("backend", ["cpu", "triton", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_second_order_gradients_match_aten(backend, case, request):
    call, shapes, wants = CASES[case]
    device = _device(backend, request)
    for seed in (0, 1):
        with fp32_precision(tf32=False):  # a TF32 reference on GPUs would not be comparable
            first, second = _second_order(call, backend, shapes, wants, device, seed)
            ref_first, ref_second = _second_order(call, "aten", shapes, wants, device, seed)
        for i, (a, r) in enumerate(zip(first, ref_first)):
            assert_close_rel(a, r, torch.float32, f"{case}, first-order gradient {i}", tol=1e-4)
        for i, (a, r) in enumerate(zip(second, ref_second)):
            assert_close_rel(a, r, torch.float32, f"{case}, second-order gradient {i}", tol=1e-4)


def _tangents(call, backend, shapes, device, seed):
    g = torch.Generator().manual_seed(seed)
    primals = [torch.randn(s, generator=g).to(device) for s in shapes]
    tangents = [torch.randn(s, generator=g).to(device) for s in shapes]
    _, jvp = torch.func.jvp(lambda *a: call(backend, *a), tuple(primals), tuple(tangents))
    with fwAD.dual_level():
        y = call(backend, *[fwAD.make_dual(p, t) for p, t in zip(primals, tangents)])
        dual = fwAD.unpack_dual(y).tangent
    return jvp, dual


# torch.func's first use scripts a helper of torch's own (a FutureWarning from torch).
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
@pytest.mark.parametrize("backend", ["cpu", "triton", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_forward_mode_tangents_match_aten(backend, case, request):
    call, shapes, _ = CASES[case]
    device = _device(backend, request)
    with fp32_precision(tf32=False):
        jvp, dual = _tangents(call, backend, shapes, device, seed=3)
        ref_jvp, ref_dual = _tangents(call, "aten", shapes, device, seed=3)
    assert dual is not None, f"{case}: the output carries no tangent"
    assert ref_jvp.abs().sum() > 0, "degenerate case: the reference tangent is zero"
    assert_close_rel(jvp, ref_jvp, torch.float32, f"{case}, torch.func.jvp tangent", tol=1e-4)
    assert_close_rel(dual, ref_dual, torch.float32, f"{case}, forward_ad tangent", tol=1e-4)


def _func_transforms(call, backend, shapes, device, seed):
    """torch.func: gradients, gradients of gradients, per-sample gradients (vmap of grad)."""
    g = torch.Generator().manual_seed(seed)
    leaves = [(torch.randn(s, generator=g) / (s[-1] ** 0.5 if i else 1)).to(device)
              for i, s in enumerate(shapes)]
    argnums = tuple(range(len(leaves)))

    def f(*a):
        return call(backend, *a).pow(2).sum()

    first = torch.func.grad(f, argnums=argnums)(*leaves)
    second = torch.func.grad(
        lambda *a: sum((d * d).sum() for d in torch.func.grad(f, argnums=argnums)(*a)),
        argnums=argnums)(*leaves)
    batch = torch.stack([leaves[0], 0.5 * leaves[0] + 1])
    per_sample = torch.func.vmap(torch.func.grad(f, argnums=1),
                                 in_dims=(0,) + (None,) * (len(leaves) - 1))(batch, *leaves[1:])
    return list(first) + list(second) + [per_sample]


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
@pytest.mark.parametrize("backend", ["cpu", "triton", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_torch_func_transforms_match_aten(backend, case, request):
    """Under torch.func (grad, grad of grad, vmap of grad) the ops run the ATen composition:
    torch refuses the C++ ops' autograd::Function and the Triton ops' registered autograd
    there ("cannot use C++ torch::autograd::Function with functorch transforms")."""
    call, shapes, _ = CASES[case]
    device = _device(backend, request)
    with fp32_precision(tf32=False):
        ours = _func_transforms(call, backend, shapes, device, seed=4)
        ref = _func_transforms(call, "aten", shapes, device, seed=4)
    assert ref[-1].abs().sum() > 0, "degenerate case: the per-sample gradients are zero"
    for i, (a, r) in enumerate(zip(ours, ref)):
        assert_close_rel(a, r, torch.float32, f"{case}, torch.func result {i}", tol=1e-4)


IN_PLACE = {
    "linear 2-d": (lambda be, x, w: linear_bias_act(x, w, None, None, backend=be), [(4, 5), (3, 5)]),
    "linear 3-d": (lambda be, x, w: linear_bias_act(x, w, None, None, backend=be), [(2, 4, 5), (3, 5)]),
    "conv": (lambda be, x, w: conv2d_bias_act(x, w, None, 1, 1, 1, 1, None, backend=be),
             [(1, 2, 5, 5), (3, 2, 3, 3)]),
}


@pytest.mark.parametrize("backend", ["cpu", "triton", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("case", list(IN_PLACE), ids=list(IN_PLACE))
def test_outputs_can_be_modified_in_place(backend, case, request):
    call, shapes = IN_PLACE[case]
    device = _device(backend, request)
    grads = {}
    for be in (backend, "aten"):
        g = torch.Generator().manual_seed(5)
        leaves = [torch.randn(s, generator=g).to(device).requires_grad_(True) for s in shapes]
        with fp32_precision(tf32=False):
            y = call(be, *leaves)
            y.mul_(2).relu_()  # activation "none": the backward does not need y
            grads[be] = torch.autograd.grad(y.sum(), leaves)
    for i, (a, r) in enumerate(zip(grads[backend], grads["aten"])):
        assert_close_rel(a, r, torch.float32, f"{case}, gradient {i}", tol=1e-5)


@pytest.mark.parametrize("backend", ["cpu", "triton", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_in_place_change_of_a_saved_output_is_refused(backend, request):
    device = _device(backend, request)
    x = torch.randn(4, 5, device=device, requires_grad=True)
    y = linear_bias_act(x, torch.randn(3, 5, device=device), None, "relu", backend=backend)
    y.mul_(2)  # the ReLU mask is read from y
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
