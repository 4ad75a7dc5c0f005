"""Small models and batches shared by the strategy tests (importable in worker processes)."""
import torch

from pyowt.models import AlexNetSmall


def small_alexnet(num_classes=10, dropout=0.5):
    # Odd widths so no K in 1..4 divides every layer evenly.
    return AlexNetSmall(num_classes=num_classes, in_channels=3, width=0.09, hidden=38, dropout=dropout)


def torchvision_alexnet(num_classes=10):
    import torchvision

    return torchvision.models.alexnet(weights=None, num_classes=num_classes)


MODELS = {
    # name: (constructor, input size)
    "small": (small_alexnet, 16),
    "torchvision": (torchvision_alexnet, 63),
}


def make_model(name, seed):
    torch.manual_seed(seed)
    ctor, size = MODELS[name]
    return ctor(), size


def global_batch(step, batch, size, num_classes=10, seed=1234):
    g = torch.Generator().manual_seed(seed + step)
    x = torch.randn(batch, 3, size, size, generator=g)
    y = torch.randint(0, num_classes, (batch,), generator=g)
    return x, y
