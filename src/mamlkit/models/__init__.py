"""The paper's networks."""

from torch import nn

from .conv import ADAPT_ALL_BUT_NORM, Conv4, MLPNet, conv4, miniimagenet_conv4, omniglot_conv4
from .layers import BatchNorm
from .mlp import mlp, official_init_

# The few-shot classifiers by name (``model.arch``): ``n_way -> nn.Module``, and the dataset each expects.
# ``conv4`` also takes the images' channels and side (``classifier`` passes them): a folder's images.
CLASSIFIERS = {
    "omniglot_conv4": omniglot_conv4,
    "miniimagenet_conv4": miniimagenet_conv4,
    "mlp": MLPNet,
    "conv4": conv4,
}
CLASSIFIER_DATASET = {
    "omniglot_conv4": "omniglot",
    "miniimagenet_conv4": "miniimagenet",
    "mlp": "omniglot",
    "conv4": "folder",
}


def classifier(arch: str, n_way: int, image_shape: tuple[int, int, int] | None = None) -> nn.Module:
    """The classifier ``arch`` for ``n_way`` classes; ``image_shape`` ``(C, H, W)`` sizes ``conv4``
    (the others have the fixed shape of their dataset)."""
    if arch == "conv4":
        if image_shape is None:
            raise ValueError("conv4 is sized by its images: pass image_shape=(channels, side, side)")
        return conv4(n_way, in_channels=image_shape[0], image_size=image_shape[-1])
    return CLASSIFIERS[arch](n_way)


__all__ = [
    "BatchNorm",
    "mlp",
    "official_init_",
    "Conv4",
    "MLPNet",
    "omniglot_conv4",
    "miniimagenet_conv4",
    "conv4",
    "classifier",
    "ADAPT_ALL_BUT_NORM",
    "CLASSIFIERS",
    "CLASSIFIER_DATASET",
]
