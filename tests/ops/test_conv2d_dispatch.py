"""Which backend conv2d_bias_act runs, and how an eager call reaches the C++ op: the
per-device defaults, the environment override, the CUDA first-layer default, and the
unboxed pybind entry (torch.ops under __torch_function__ modes). The Triton kernels' eager
path: test_triton_eager_path.py."""
import pytest
import torch

from pyowt import _extension
from pyowt.ops import conv2d_bias_act, resolve_backend
from pyowt.ops.conv2d import conv2d_bias_act_reference

from ..utils import assert_close_rel, record_calls, recorded_torch_functions

needs_ext = pytest.mark.skipif(not _extension.STATUS.loaded, reason="extension not built")


def test_default_backend_on_cpu():
    expected = "cpu" if _extension.STATUS.loaded else "aten"
    assert resolve_backend("conv2d_bias_act", torch.device("cpu")) == expected


def test_env_var_forces_backend(monkeypatch):
    monkeypatch.setenv("PYOWT_BACKEND_CONV2D_BIAS_ACT", "aten")
    assert resolve_backend("conv2d_bias_act", torch.device("cpu")) == "aten"
    monkeypatch.setenv("PYOWT_BACKEND_CONV2D_BIAS_ACT", "nonsense")
    with pytest.raises(ValueError, match="'nonsense' is not a backend"):
        conv2d_bias_act(torch.randn(1, 1, 3, 3), torch.randn(1, 1, 1, 1))


def test_cuda_kernel_preferred_only_where_measured_faster(monkeypatch):
    # On a GPU without the wgmma tiles (the next test has them).
    import pyowt.ops.conv2d as conv
    monkeypatch.setattr(conv, "_wgmma_tiles_on", lambda index: False)
    cuda_kernel_preferred = conv.cuda_kernel_preferred

    def x_(c, dtype=torch.bfloat16, cl=True):
        x = torch.empty(2, c, 32, 32, dtype=dtype)
        return x.contiguous(memory_format=torch.channels_last) if cl else x

    w11, w7, w3 = (torch.empty(64, 3, k, k) for k in (11, 7, 3))
    assert cuda_kernel_preferred(x_(3), w11, 1)                      # AlexNet conv1
    assert cuda_kernel_preferred(x_(3, torch.float16), w7, 1)        # ResNet-50 conv1
    assert not cuda_kernel_preferred(x_(3), w3, 1)                   # 3x3: not measured
    assert not cuda_kernel_preferred(x_(3, torch.float32), w11, 1)   # fp32: not measured
    assert not cuda_kernel_preferred(x_(3, cl=False), w11, 1)        # NCHW: not measured
    assert not cuda_kernel_preferred(x_(64), torch.empty(64, 64, 5, 5), 1)  # inner layer
    assert not cuda_kernel_preferred(x_(4), torch.empty(64, 2, 11, 11), 2)  # grouped
    assert not cuda_kernel_preferred(torch.empty(3, 32, 32), w11, 1)  # bad rank: no crash


@pytest.mark.parametrize("wgmma_tiles_on", [False, True])
def test_cuda_kernel_preferred_for_inner_layers_only_with_wgmma(monkeypatch, wgmma_tiles_on):
    # With the wgmma tiles (an sm_90 GPU, an sm_90a build) our kernel measured faster on
    # every AlexNet layer in bf16 channels_last: those layers default to it, the others
    # (fp32, NCHW, C_in not a multiple of 8, grouped) and PYOWT_CUDA_CONV_WGMMA=0 keep cuDNN.
    import pyowt.ops.conv2d as conv
    monkeypatch.setattr(conv, "_wgmma_tiles_on", lambda index: wgmma_tiles_on)

    def x_(c, dtype=torch.bfloat16, cl=True):
        x = torch.empty(2, c, 13, 13, dtype=dtype)
        return x.contiguous(memory_format=torch.channels_last) if cl else x

    w3 = torch.empty(384, 192, 3, 3)
    assert conv.cuda_kernel_preferred(x_(192), w3, 1) is wgmma_tiles_on            # AlexNet conv3
    assert conv.cuda_kernel_preferred(x_(192, torch.float16), w3, 1) is wgmma_tiles_on
    assert conv.cuda_kernel_preferred(x_(64), torch.empty(192, 64, 5, 5), 1) is wgmma_tiles_on
    assert not conv.cuda_kernel_preferred(x_(192, torch.float32), w3, 1)
    assert not conv.cuda_kernel_preferred(x_(192, cl=False), w3, 1)
    assert not conv.cuda_kernel_preferred(x_(12), torch.empty(64, 12, 3, 3), 1)   # C_in % 8
    assert not conv.cuda_kernel_preferred(x_(192), torch.empty(384, 96, 3, 3), 2)
    assert conv.cuda_kernel_preferred(x_(3), torch.empty(64, 3, 11, 11), 1)     # first layer: always
    monkeypatch.setenv("PYOWT_CUDA_CONV_WGMMA", "0")
    assert not conv.cuda_kernel_preferred(x_(192), w3, 1)


@pytest.mark.gpu
def test_default_backend_first_layer_gpu(monkeypatch):
    # The default runs our CUDA kernel on a bf16 channels_last RGB layer; forcing aten
    # (argument or environment) still gets cuDNN. Both match the float64 reference.
    x, w, b, ref = _bf16_channels_last_case(3, 16, 64, 11, 19, 4, 2)
    import pyowt.ops.conv2d as conv

    # Eager calls enter the C++ op through its unboxed entry, else through torch.ops: record both.
    calls = record_calls(monkeypatch, conv, "_conv_cpp", "_conv_direct")
    out = conv2d_bias_act(x, w, b, 4, 2)
    assert calls, "the default did not run the CUDA kernel on a bf16 RGB first layer"
    assert_close_rel(out, ref, torch.bfloat16, "default first layer")
    calls.clear()
    conv2d_bias_act(x, w, b, 4, 2, backend="aten")
    monkeypatch.setenv("PYOWT_BACKEND_CONV2D_BIAS_ACT", "aten")
    conv2d_bias_act(x, w, b, 4, 2)
    assert not calls, "a forced aten backend ran the CUDA kernel"


@pytest.mark.gpu
def test_default_backend_inner_layer_gpu(monkeypatch):
    # On an sm_90 GPU with the wgmma tiles the default runs our CUDA kernel on a bf16
    # channels_last inner layer (AlexNet conv3's channels), elsewhere cuDNN; both match the
    # float64 reference, and PYOWT_CUDA_CONV_WGMMA=0 hands the layer back to cuDNN.
    x, w, b, ref = _bf16_channels_last_case(192, 384, 13, 3, 41, 1, 1)
    import pyowt.ops.conv2d as conv
    calls = record_calls(monkeypatch, conv, "_conv_cpp", "_conv_direct")
    out = conv2d_bias_act(x, w, b, 1, 1)
    assert bool(calls) is conv.cuda_wgmma_tiles_enabled(), calls
    assert_close_rel(out, ref, torch.bfloat16, "default inner layer")
    calls.clear()
    monkeypatch.setenv("PYOWT_CUDA_CONV_WGMMA", "0")
    assert_close_rel(conv2d_bias_act(x, w, b, 1, 1), ref, torch.bfloat16, "PYOWT_CUDA_CONV_WGMMA=0")
    assert not calls, "PYOWT_CUDA_CONV_WGMMA=0 still ran the CUDA kernel on an inner layer"


def _bf16_channels_last_case(c_in, c_out, size, kernel, weight_scale, stride, padding):
    """x (4, c_in, size, size) channels_last, w, b in bf16 on the GPU (the test skipped
    where the cuda backend cannot run), and the float64 reference output."""
    if unavailable_reason_cuda() is not None:
        pytest.skip(unavailable_reason_cuda())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, c_in, size, size, generator=g).to("cuda", torch.bfloat16).contiguous(
        memory_format=torch.channels_last)
    w = (torch.randn(c_out, c_in, kernel, kernel, generator=g) / weight_scale).to("cuda", torch.bfloat16)
    b = torch.randn(c_out, generator=g).to("cuda", torch.bfloat16)
    ref = conv2d_bias_act_reference(x.double().cpu(), w.double().cpu(), b.double().cpu(), stride, padding)
    return x, w, b, ref


def unavailable_reason_cuda():
    from pyowt.ops.backend import unavailable_reason

    return unavailable_reason("cuda", torch.device("cuda"))


@needs_ext
def test_eager_calls_take_the_unboxed_entry_and_modes_still_see_the_op(monkeypatch):
    import pyowt.ops.conv2d as conv

    assert conv._conv_direct is not None, "the extension lacks conv2d_bias_act_direct"
    calls = record_calls(monkeypatch, conv, "_conv_direct")
    x, w, b = torch.randn(2, 3, 9, 9), torch.randn(4, 3, 3, 3), torch.randn(4)
    ref = conv2d_bias_act_reference(x, w, b, 2, 1)
    assert torch.allclose(conv2d_bias_act(x, w, b, 2, 1, backend="cpu"), ref, atol=1e-5) and calls

    calls.clear()
    with recorded_torch_functions() as seen:
        out = conv2d_bias_act(x, w, b, 2, 1, backend="cpu")
    assert torch.allclose(out, ref, atol=1e-5)
    assert not calls and torch.ops.pyowt.conv2d_bias_act.default in seen
