"""Small models for the planner tests."""
from torch import nn


def tiny_chain(c=(3, 8, 12), hidden=10, classes=5):
    """conv-relu-conv-relu-pool-flatten-linear-relu-dropout-linear: 4 weight layers."""
    return nn.Sequential(
        nn.Conv2d(c[0], c[1], 3, padding=1), nn.ReLU(),
        nn.Conv2d(c[1], c[2], 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(1),
        nn.Linear(c[2] * 4 * 4, hidden), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(hidden, classes),
    )


class ResBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + x)


class TinyResNet(nn.Module):
    """A residual DAG: stem conv, two residual blocks, pooled linear head."""

    def __init__(self, c=8, classes=5):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.block1 = ResBlock(c)
        self.block2 = ResBlock(c)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        x = self.block2(self.block1(self.stem(x)))
        return self.fc(self.pool(x).flatten(1))
