"""The paper's networks."""

from .conv import ADAPT_ALL_BUT_NORM, Conv4, MLPNet, miniimagenet_conv4, omniglot_conv4
from .layers import BatchNorm
from .mlp import mlp, official_init_

# The few-shot classifiers by name (``model.arch``): ``n_way -> nn.Module``, and the dataset each expects.
CLASSIFIERS = {"omniglot_conv4": omniglot_conv4, "miniimagenet_conv4": miniimagenet_conv4, "mlp": MLPNet}
CLASSIFIER_DATASET = {"omniglot_conv4": "omniglot", "miniimagenet_conv4": "miniimagenet", "mlp": "omniglot"}

__all__ = [
    "BatchNorm",
    "mlp",
    "official_init_",
    "Conv4",
    "MLPNet",
    "omniglot_conv4",
    "miniimagenet_conv4",
    "ADAPT_ALL_BUT_NORM",
    "CLASSIFIERS",
    "CLASSIFIER_DATASET",
]
