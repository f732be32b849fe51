"""The paper's few-shot classification networks (Finn et al., 2017, Section 5.2)."""

from __future__ import annotations

from torch import Tensor, nn

from .layers import BatchNorm

# The official code learns BatchNorm's shift by the meta-optimiser but never adapts it in the
# inner loop (it is not in its list of fast weights): use this as MAML(adapt=...).
ADAPT_ALL_BUT_NORM = ["*", "!*.norm.bias", "!*.norm.weight"]


class ConvBlock(nn.Module):
    """3×3 conv → batch-statistics BatchNorm (shift only) → ReLU [→ 2×2 max-pool]."""

    def __init__(self, cin: int, cout: int, stride: int, pool: bool):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1)
        self.norm = BatchNorm(cout, affine="bias")
        self.act = nn.ReLU()
        self.pool = nn.MaxPool2d(2) if pool else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.act(self.norm(self.conv(x))))


class Conv4(nn.Module):
    """Four conv blocks and a linear head.

    ``pool=False``: the Omniglot net (stride-2 convs, spatial mean, 64 filters).
    ``pool=True``: the MiniImagenet net (stride-1 convs, 2×2 max-pool, flatten, 32 filters).
    Initialisation as in the official code: Xavier-uniform convs, zero biases, and a head
    drawn from N(0, 1) for Omniglot but Xavier-uniform for MiniImagenet.
    """

    def __init__(self, n_way: int, in_channels: int = 1, filters: int = 64, pool: bool = False, image_size: int = 28):
        super().__init__()
        stride = 1 if pool else 2
        self.blocks = nn.Sequential(
            *[ConvBlock(in_channels if i == 0 else filters, filters, stride, pool) for i in range(4)]
        )
        self.pool = pool
        size = image_size
        for _ in range(4):
            size = size // 2 if pool else (size + 1) // 2
        self.head = nn.Linear(filters * size * size if pool else filters, n_way)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        if pool:
            nn.init.xavier_uniform_(self.head.weight)
        else:
            nn.init.normal_(self.head.weight, std=1.0)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor) -> Tensor:
        h = self.blocks(x)
        h = h.flatten(1) if self.pool else h.mean(dim=(2, 3))
        return self.head(h)


class MLPNet(nn.Module):
    """The paper's no-convolution baseline: 256-128-64-64 with BatchNorm and ReLU, then linear."""

    def __init__(self, n_way: int, in_features: int = 784, hidden=(256, 128, 64, 64)):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            block = nn.Sequential()
            block.add_module("fc", nn.Linear(width, h))
            block.add_module("norm", BatchNorm(h, affine="bias"))
            block.add_module("act", nn.ReLU())
            layers.append(block)
            width = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, n_way)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def omniglot_conv4(n_way: int) -> Conv4:
    return Conv4(n_way, in_channels=1, filters=64, pool=False, image_size=28)


def miniimagenet_conv4(n_way: int) -> Conv4:
    return Conv4(n_way, in_channels=3, filters=32, pool=True, image_size=84)


def conv4(n_way: int, in_channels: int = 3, image_size: int = 84) -> Conv4:
    """The MiniImagenet network for square images of any side >= 16 (four 2x2 max-pools) and
    1 or 3 channels: what a folder of your own images trains (``data.dataset: folder``)."""
    if image_size < 16:
        raise ValueError(f"conv4 halves the image four times, so it needs a side >= 16; got {image_size}")
    return Conv4(n_way, in_channels=in_channels, filters=32, pool=True, image_size=image_size)
