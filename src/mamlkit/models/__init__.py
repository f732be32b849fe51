"""The paper's networks."""

from .conv import ADAPT_ALL_BUT_NORM, Conv4, MLPNet, miniimagenet_conv4, omniglot_conv4
from .layers import BatchNorm
from .mlp import mlp, official_init_

__all__ = [
    "BatchNorm",
    "mlp",
    "official_init_",
    "Conv4",
    "MLPNet",
    "omniglot_conv4",
    "miniimagenet_conv4",
    "ADAPT_ALL_BUT_NORM",
]
