"""Model factories for the MNIST demo (plain PyTorch, no other dependency).

Both models take float images [B, 1, 28, 28] scaled to [0, 1] and return logits
[B, 10]. Load this file by path (importlib) or with data/ on sys.path:

    import sys; sys.path.insert(0, "data")
    from mnist_models import resnet_teacher, cnn_student
"""

import torch
from torch import nn


def conv_bn(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),  # BN supplies the bias
        nn.BatchNorm2d(c_out),
    )


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv-BN layers plus a skip connection (1x1
    projection when the shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv_bn(c_in, c_out, stride)
        self.conv2 = conv_bn(c_out, c_out)
        self.skip = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.skip = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.conv1(x))
        return torch.relu(self.conv2(out) + self.skip(x))


class ResNetTeacher(nn.Module):
    """Four residual blocks, 28x28 -> 14x14 -> 7x7, ~150k parameters."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(1, 16), nn.ReLU())
        self.blocks = nn.Sequential(
            BasicBlock(16, 16),
            BasicBlock(16, 32, stride=2),
            BasicBlock(32, 64, stride=2),
            BasicBlock(64, 64),
        )
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.fc(x.mean(dim=(2, 3)))  # global average pooling


class CNNStudent(nn.Module):
    """Three plain conv layers of ``widths`` channels (default 8, 16, 32: 6,274 parameters): small
    enough that it clearly benefits from a teacher's soft labels."""

    def __init__(self, num_classes: int = 10, widths: tuple[int, int, int] = (8, 16, 32)):
        super().__init__()
        w1, w2, w3 = widths
        self.features = nn.Sequential(
            conv_bn(1, w1), nn.ReLU(), nn.MaxPool2d(2),    # 14x14
            conv_bn(w1, w2), nn.ReLU(), nn.MaxPool2d(2),   # 7x7
            conv_bn(w2, w3), nn.ReLU(),
        )
        self.fc = nn.Linear(w3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


def resnet_teacher(num_classes: int = 10) -> nn.Module:
    return ResNetTeacher(num_classes)


def cnn_student(num_classes: int = 10) -> nn.Module:
    return CNNStudent(num_classes)


def cnn_student_small(num_classes: int = 10) -> nn.Module:
    """The student at half the width (4, 8, 16 channels: 1,702 parameters)."""
    return CNNStudent(num_classes, widths=(4, 8, 16))
