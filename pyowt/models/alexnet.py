"""AlexNet variants laid out like torchvision's (``features``, ``avgpool``, ``classifier``).

``AlexNetSmall`` is the one-tower AlexNet shrunk for CPU runs on small images: the same
five convolutions and three FC layers, the conv trunk holding few parameters and most of
the multiply-adds, the FC head holding most of the weights: the balance OWT exploits.
"""
from __future__ import annotations

import torch
from torch import nn


class AlexNetSmall(nn.Module):
    """AlexNet for ``(N, in_channels, size, size)`` inputs, ``size`` >= 16.

    Args:
        num_classes: logits per sample.
        in_channels: image channels (1 for digits).
        width: multiplier on AlexNet's conv widths 64-192-384-256-256.
        hidden: width of the two hidden FC layers (AlexNet: 4096).
        dropout: dropout before each hidden FC layer, as in AlexNet.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: float = 0.25,
                 hidden: int = 512, dropout: float = 0.5):
        super().__init__()
        c = [max(1, int(round(w * width))) for w in (64, 192, 384, 256, 256)]
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c[0], kernel_size=5, stride=1, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.Conv2d(c[0], c[1], kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.Conv2d(c[1], c[2], kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(c[2], c[3], kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(c[3], c[4], kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2, stride=2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((4, 4))
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout),
            nn.Linear(c[4] * 16, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) images -> (N, num_classes) logits."""
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def alexnet(num_classes: int = 1000) -> nn.Module:
    """torchvision's one-tower AlexNet (61.1M parameters at 1000 classes), untrained."""
    import torchvision

    return torchvision.models.alexnet(weights=None, num_classes=num_classes)
