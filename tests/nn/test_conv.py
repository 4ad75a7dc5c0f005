"""FusedConv2d as a drop-in for Conv2d+ReLU, and fuse_conv_relu on torchvision models."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pyowt.nn import FusedConv2d, fuse_conv_relu

from ..utils import assert_close_rel

torchvision = pytest.importorskip("torchvision")


def _alexnet_features_fused():
    """torchvision's alexnet().features with each Conv2d+ReLU as FusedConv2d+Identity."""
    return nn.Sequential(
        FusedConv2d(3, 64, kernel_size=11, stride=4, padding=2), nn.Identity(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        FusedConv2d(64, 192, kernel_size=5, padding=2), nn.Identity(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        FusedConv2d(192, 384, kernel_size=3, padding=1), nn.Identity(),
        FusedConv2d(384, 256, kernel_size=3, padding=1), nn.Identity(),
        FusedConv2d(256, 256, kernel_size=3, padding=1), nn.Identity(),
        nn.MaxPool2d(kernel_size=3, stride=2),
    )


def test_loads_torchvision_alexnet_checkpoint():
    torch.manual_seed(0)
    ref = torchvision.models.alexnet(weights=None).eval()
    fused = _alexnet_features_fused()
    fused.load_state_dict(ref.features.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    assert_close_rel(fused(x), ref.features(x), torch.float32, "alexnet features")


def test_same_init_and_names_as_conv2d():
    torch.manual_seed(3)
    conv = nn.Conv2d(5, 7, (3, 2), stride=2, padding=1, groups=1)
    torch.manual_seed(3)
    fused = FusedConv2d(5, 7, (3, 2), stride=2, padding=1)
    assert list(dict(fused.named_parameters())) == ["weight", "bias"]
    assert torch.equal(conv.weight, fused.weight) and torch.equal(conv.bias, fused.bias)
    assert isinstance(fused, nn.Conv2d)
    assert "activation='relu'" in repr(fused)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(stride=2, padding=1),
        dict(padding="same", dilation=2),
        dict(padding=2, padding_mode="reflect", bias=False),
        dict(groups=2, stride=(1, 2), padding=(0, 1)),
    ],
)
@pytest.mark.parametrize("activation", ["relu", None])
def test_matches_conv_then_relu(kwargs, activation):
    torch.manual_seed(1)
    fused = FusedConv2d(4, 6, 3, activation=activation, **kwargs)
    conv = nn.Conv2d(4, 6, 3, **kwargs)
    conv.load_state_dict(fused.state_dict())
    x = torch.randn(2, 4, 11, 9, requires_grad=True)
    ref = conv(x)
    ref = F.relu(ref) if activation == "relu" else ref
    out = fused(x)
    assert_close_rel(out, ref, torch.float32)
    g = torch.randn_like(ref)
    got = torch.autograd.grad(out, [x, fused.weight], g)
    want = torch.autograd.grad(ref, [x, conv.weight], g)
    for a, b in zip(got, want):
        assert_close_rel(a, b, torch.float32, "gradient")


def test_backend_argument_is_used(triton_device):
    torch.manual_seed(2)
    m = FusedConv2d(3, 4, 3, padding=1, backend="triton").to(triton_device)
    x = torch.randn(1, 3, 7, 7, device=triton_device)
    ref = F.relu(F.conv2d(x.double(), m.weight.double(), m.bias.double(), padding=1))
    assert_close_rel(m(x), ref, torch.float32)


def test_bad_backend_is_refused_where_it_is_given():
    # A misspelt name fails at construction, not at the first forward.
    with pytest.raises(ValueError, match=r"FusedConv2d: backend must be None or one of \('triton', 'cuda', "
                                         r"'cpu', 'aten'\), got 'tpu'"):
        FusedConv2d(3, 4, 3, backend="tpu")
    with pytest.raises(ValueError, match="got 1"):
        FusedConv2d(3, 4, 3, backend=1)
    with pytest.raises(ValueError, match="fuse_conv_relu: backend must be .* got 'cudnn'"):
        fuse_conv_relu(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), backend="cudnn")
    with pytest.raises(TypeError, match="fuse_conv_relu: model must be a torch.nn.Module, got int"):
        fuse_conv_relu(3)
    # A real backend that cannot run on the input's device is refused per call, naming why.
    m = FusedConv2d(3, 4, 3, backend="cuda")
    with pytest.raises(ValueError, match="backend='cuda' cannot run: backend 'cuda' needs CUDA tensors"):
        m(torch.randn(1, 3, 5, 5))


def _check_fused_model(model, x, n_convs):
    model.eval()
    fused = fuse_conv_relu(model)
    fused_convs = [m for m in fused.modules() if isinstance(m, FusedConv2d)]
    assert len(fused_convs) == n_convs
    assert not any(isinstance(m, FusedConv2d) for m in model.modules()), "original was modified"
    assert sum(isinstance(m, nn.ReLU) for m in model.modules()) > n_convs - 1
    assert fused.state_dict().keys() == model.state_dict().keys()
    # The fused model owns copies: training it leaves the original alone.
    assert all(p is not q for p, q in zip(fused.parameters(), model.parameters()))
    with torch.no_grad():
        assert_close_rel(fused(x), model(x), torch.float32, type(model).__name__)
    return fused


def test_fuse_alexnet():
    torch.manual_seed(0)
    model = torchvision.models.alexnet(weights=None)
    x = torch.randn(2, 3, 64, 64)  # 64x64 reaches the 1x1 map before the adaptive pool
    fused = _check_fused_model(model, x, 5)
    # The classifier's Linear+ReLU pairs are not convolutions and stay as they are.
    assert sum(isinstance(m, nn.ReLU) for m in fused.classifier) == 2


def test_fuse_vgg11_and_gradients():
    torch.manual_seed(0)
    model = torchvision.models.vgg11(weights=None)
    x = torch.randn(1, 3, 64, 64)
    fused = _check_fused_model(model, x, 8)
    # Gradients through the conv trunk agree as well (the 100M-parameter head is skipped
    # to keep the test short; it holds no fused layer).
    x.requires_grad_(True)
    want = torch.autograd.grad(model.features(x).square().sum(), [x, *model.features.parameters()])
    got = torch.autograd.grad(fused.features(x).square().sum(), [x, *fused.features.parameters()])
    for i, (a, b) in enumerate(zip(got, want)):
        assert_close_rel(a, b, torch.float32, f"gradient {i}")


def test_fuse_only_conv_relu_pairs():
    inner = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True))
    model = nn.Sequential(
        inner,
        nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU(),  # conv -> BN: not a pair
        nn.Conv2d(4, 2, 1, padding_mode="zeros"), nn.ReLU(),
        nn.ReLU(),  # a second ReLU stays
    ).eval()
    fused = fuse_conv_relu(model)
    assert isinstance(fused[0][0], FusedConv2d) and isinstance(fused[0][1], nn.Identity)
    assert type(fused[1]) is nn.Conv2d and isinstance(fused[3], nn.ReLU)
    assert isinstance(fused[4], FusedConv2d) and isinstance(fused[5], nn.Identity)
    assert isinstance(fused[6], nn.ReLU)
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        assert_close_rel(fused(x), model(x), torch.float32)
    # Fusing again changes nothing.
    again = fuse_conv_relu(fused)
    assert sum(isinstance(m, FusedConv2d) for m in again.modules()) == 2
