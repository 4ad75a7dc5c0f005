"""bias_relu on every backend that runs here, against a float64 reference."""
import pytest
import torch
import torch.nn.functional as F

import pyowt
from pyowt import _extension
from pyowt.ops import bias_relu
from pyowt.ops.bias_relu import bias_relu_reference

from ..utils import assert_close_rel

needs_ext = pytest.mark.skipif(not _extension.STATUS.loaded, reason="extension not built")

# (shape, dim, layout): odd sizes, channels first/last/middle, strided inputs.
CASES = [
    ((2, 3, 5, 7), 1, "contiguous"),
    ((2, 5, 3, 4), 1, "channels_last"),
    ((4, 6), 1, "contiguous"),
    ((3, 5, 2), -1, "contiguous"),
    ((7,), 0, "contiguous"),
    ((3, 4, 5), 1, "transposed"),
    ((2, 3, 2, 2, 3), 1, "contiguous"),
    ((1, 1, 1, 1), 1, "contiguous"),
    ((0, 3, 2, 2), 1, "contiguous"),
]


def _make(shape, dim, layout, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    if layout == "transposed":
        # Built as (..., transposed) so the result is non-contiguous with the right shape.
        base = torch.randn(shape[0], shape[2], shape[1], generator=g, dtype=torch.float64)
        x = base.transpose(1, 2)
    else:
        x = torch.randn(shape, generator=g, dtype=torch.float64)
    bias = torch.randn(shape[dim], generator=g, dtype=torch.float64)
    weight = torch.randn(shape, generator=g, dtype=torch.float64)
    x_dev = x.to(dtype).to(device)
    if layout == "channels_last":
        x_dev = x_dev.contiguous(memory_format=torch.channels_last)
    elif layout == "transposed":
        x_dev = x_dev.transpose(1, 2).contiguous().transpose(1, 2)
    return x_dev, bias.to(dtype).to(device), weight


def _check_backend(backend, dtype, device, shape, dim, layout, seed=0):
    x, bias, weight = _make(shape, dim, layout, dtype, device, seed)
    x.requires_grad_(True)
    bias.requires_grad_(True)
    out = bias_relu(x, bias, dim=dim, backend=backend)
    assert out.shape == x.shape and out.dtype == dtype and out.device == x.device
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last), "channels_last layout not kept"
    (out.double() * weight.to(device)).sum().backward()

    x64 = x.detach().double().cpu().requires_grad_(True)
    b64 = bias.detach().double().cpu().requires_grad_(True)
    ref = bias_relu_reference(x64, b64, dim % len(shape))
    (ref * weight).sum().backward()
    if x.numel() == 0:
        assert out.numel() == 0 and torch.all(bias.grad == 0)
        return
    assert_close_rel(out, ref, dtype, "output")
    assert_close_rel(x.grad, x64.grad, dtype, "grad x")
    assert_close_rel(bias.grad, b64.grad, dtype, "grad bias")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,dim,layout", CASES)
@pytest.mark.parametrize("backend", ["cpu", "aten"])
def test_cpu_backends_match_reference(backend, dtype, shape, dim, layout):
    if backend == "cpu" and not _extension.STATUS.loaded:
        pytest.skip("extension not built")
    _check_backend(backend, dtype, "cpu", shape, dim, layout)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape,dim,layout", CASES)
def test_triton_matches_reference(triton_device, dtype, shape, dim, layout):
    _check_backend("triton", dtype, triton_device, shape, dim, layout)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,dim,layout", CASES + [((64, 96, 27, 27), 1, "channels_last")])
def test_gpu_backends_match_reference(backend, dtype, shape, dim, layout):
    _check_backend(backend, dtype, "cuda", shape, dim, layout)


def test_large_fp32_values_fresh_seeds():
    for seed in range(3):
        _check_backend("cpu" if _extension.STATUS.loaded else "aten", torch.float32, "cpu",
                       (8, 33, 9, 11), 1, "contiguous", seed=seed)


def _opcheck_samples(device, dtype=torch.float32):
    samples = []
    for i, (shape, dim, layout) in enumerate(CASES[:6]):
        x, bias, _ = _make(shape, dim, layout, dtype, device, seed=100 + i)
        samples.append((x.requires_grad_(True), bias.requires_grad_(True), dim % len(shape)))
    return samples


@needs_ext
def test_opcheck_cpp_op():
    for args in _opcheck_samples("cpu"):
        torch.library.opcheck(torch.ops.pyowt.bias_relu.default, args)
        out = torch.ops.pyowt.bias_relu(*args)
        torch.library.opcheck(torch.ops.pyowt.bias_relu_backward.default,
                              (torch.randn_like(out), out.detach(), args[2]))


def test_opcheck_triton_op(triton_device):
    # Under the interpreter the aot-dispatch and compile checks cannot run (Inductor does
    # not compile Triton for CPU; see DESIGN.md); they run on a GPU.
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    if triton_device.type == "cuda":
        utils = utils + ("test_aot_dispatch_dynamic",)
    for args in _opcheck_samples(triton_device)[:3]:
        torch.library.opcheck(torch.ops.pyowt.bias_relu_triton.default, args, test_utils=utils)


class _ConvBiasRelu(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, bias=False)
        self.bias = torch.nn.Parameter(torch.randn(8))

    def forward(self, x):
        return bias_relu(self.conv(x), self.bias, dim=1).sum(dim=(2, 3))


def test_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    model = _ConvBiasRelu()
    x = torch.randn(2, 3, 9, 9)
    eager = model(x)
    eager.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, eager)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, g)


def test_default_backend_on_cpu():
    expected = "cpu" if _extension.STATUS.loaded else "aten"
    assert pyowt.ops.resolve_backend("bias_relu", torch.device("cpu")) == expected


def test_env_var_forces_backend(monkeypatch):
    monkeypatch.setenv("PYOWT_BACKEND_BIAS_RELU", "aten")
    assert pyowt.ops.resolve_backend("bias_relu", torch.device("cpu")) == "aten"
    monkeypatch.setenv("PYOWT_BACKEND_BIAS_RELU", "nonsense")
    with pytest.raises(ValueError, match="PYOWT_BACKEND_BIAS_RELU'nonsense' is not a backend"):
        bias_relu(torch.randn(2, 3), torch.randn(3))


@pytest.mark.parametrize(
    "x,bias,kwargs,exc,match",
    [
        (torch.randn(2, 3), torch.randn(4), {}, ValueError, r"bias must have shape \(3,\).*got \(4,\)"),
        (torch.randn(2, 3), torch.randn(3, 1), {}, ValueError, r"got \(3, 1\)"),
        (torch.randn(2, 3), torch.randn(3, dtype=torch.float64), {}, TypeError, "bias dtype torch.float64 differs from x dtype torch.float32"),
        (torch.randint(0, 5, (2, 3)), torch.randn(3), {}, TypeError, "x must be float32, float16 or bfloat16, got torch.int64"),
        (torch.randn(2, 3), torch.randn(3), {"dim": 2}, ValueError, r"dim must be in \[-2, 1\] for a 2-d x, got 2"),
        (torch.randn(2, 3), torch.randn(3), {"backend": "tpu"}, ValueError, "backend='tpu' is not a backend"),
        (torch.randn(2, 3), torch.randn(3), {"backend": "cuda"}, ValueError, "backend 'cuda' needs CUDA tensors, got device cpu"),
        (torch.tensor(1.0), torch.randn(1), {}, ValueError, "at least 1 dimension"),
        ([1.0], torch.randn(1), {}, TypeError, "x must be a torch.Tensor, got list"),
    ],
)
def test_bad_input_errors(x, bias, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        bias_relu(x, bias, **kwargs)


@needs_ext
def test_cpp_op_checks_its_arguments():
    with pytest.raises(RuntimeError, match="bias has 4 elements but x has 3 channels along dim 1"):
        torch.ops.pyowt.bias_relu(torch.randn(2, 3), torch.randn(4), 1)
    with pytest.raises(RuntimeError, match="dim must be in"):
        torch.ops.pyowt.bias_relu(torch.randn(2, 3), torch.randn(3), 5)
    with pytest.raises(RuntimeError, match="grad_out shape"):
        torch.ops.pyowt.bias_relu_backward(torch.randn(2, 4), torch.randn(2, 3), 1)


def test_matches_torch_functional_relu():
    x = torch.randn(4, 5, 6)
    b = torch.randn(5)
    torch.testing.assert_close(bias_relu(x, b), F.relu(x + b[None, :, None]))
