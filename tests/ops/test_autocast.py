"""The fused ops under torch.autocast behave like the ATen ops they replace: inputs cast
to the autocast dtype, gradients back to the fp32 parameters."""
import pytest
import torch

from pyowt.ops import bias_relu, conv2d_bias_act, linear_bias_act
from pyowt.ops.backend import unavailable_reason

CASES = {
    "conv2d_bias_act": (lambda x, w, b, be: conv2d_bias_act(x, w, b, padding=1, backend=be),
                        (2, 3, 7, 6), (5, 3, 3, 3), (5,)),
    "linear_bias_act": (lambda x, w, b, be: linear_bias_act(x, w, b, "relu", backend=be),
                        (7, 13), (11, 13), (11,)),
    "bias_relu": (lambda x, w, b, be: bias_relu(x, b, dim=1, backend=be), (3, 5, 4), None, (5,)),
}


def _backends(device):
    out = []
    for be in ("aten", "cpu", "cuda", "triton"):
        if device.type == "cpu" and be == "triton":
            continue  # the interpreter does not run bf16 dots
        if unavailable_reason(be, device) is None:
            out.append(be)
    return out


def _devices():
    devs = [torch.device("cpu")]
    if torch.cuda.is_available():
        devs.append(torch.device("cuda"))
    return devs


@pytest.mark.parametrize("device", _devices(), ids=str)
@pytest.mark.parametrize("op", sorted(CASES))
def test_autocast_casts_like_aten(op, device):
    fn, xs, ws, bs = CASES[op]
    g = torch.Generator().manual_seed(3)
    for backend in _backends(device):
        x = torch.randn(xs, generator=g).to(device).requires_grad_()
        w = None if ws is None else torch.randn(ws, generator=g).to(device).requires_grad_()
        b = torch.randn(bs, generator=g).to(device).requires_grad_()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = fn(x, w, b, backend)
        assert out.dtype == torch.bfloat16, (backend, out.dtype)
        grads = torch.autograd.grad(out.float().sum(), [t for t in (x, w, b) if t is not None])
        # The same op on inputs cast by hand, outside autocast.
        leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b)]
        cast = [t.to(torch.bfloat16) if t is not None else None for t in leaves]
        ref = fn(*cast, backend)
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
        ref_grads = torch.autograd.grad(ref.float().sum(), [t for t in leaves if t is not None])
        for got, want in zip(grads, ref_grads):
            assert got.dtype == torch.float32
            torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("device", _devices(), ids=str)
def test_autocast_accepts_a_lower_precision_activation(device):
    """An ATen layer's bf16 output feeding a fused layer with fp32 weights (mixed models)."""
    x = torch.randn(4, 9, device=device).to(torch.bfloat16)
    w = torch.randn(6, 9, device=device)
    b = torch.randn(6, device=device)
    with pytest.raises(TypeError, match="weight dtype"):
        linear_bias_act(x, w, b)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = linear_bias_act(x, w, b)
    torch.testing.assert_close(out, torch.relu(torch.nn.functional.linear(x, w.bfloat16(), b.bfloat16())),
                               rtol=2e-2, atol=2e-2)

