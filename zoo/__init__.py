"""Model zoo for lightning-tpsgd: the tpSGD paper's networks and a LightningModule to train them.

Models are looked up by architecture name through a timm-style registry::

    >>> import zoo
    >>> zoo.list_models()
    ['cnn2', 'convgrid', 'convnet4', 'mlp', 'mlp2', 'vgg11']
    >>> net = zoo.create_model("cnn2", num_classes=10, in_chans=1, input_size=28)

Importing ``zoo`` registers every model in :mod:`zoo.paper`.
"""

from zoo._registry import create_model, is_model, list_models, register_model
from zoo.classifier import ImageClassifier
from zoo.paper import cnn2, convgrid, convnet4, mlp, mlp2, vgg11

__all__ = [
    "ImageClassifier",
    "cnn2",
    "convgrid",
    "convnet4",
    "create_model",
    "is_model",
    "list_models",
    "mlp",
    "mlp2",
    "register_model",
    "vgg11",
]
