"""Model zoo for lightning-tpsgd: the tpSGD paper's networks and a LightningModule to train them.

Models are looked up by architecture name through a timm-style registry::

    >>> import zoo
    >>> zoo.list_models()  # doctest: +NORMALIZE_WHITESPACE
    ['birnn1', 'cnn2', 'convgrid', 'convnet4', 'mlp', 'mlp2', 'resnet20', 'resnet32', 'resnet44', 'resnet56',
     'rnn1', 'rnn2', 'timm_adaptor', 'vgg11']
    >>> net = zoo.create_model("cnn2", num_classes=10, in_chans=1, input_size=28)

Importing ``zoo`` registers every model in :mod:`zoo.paper`, :mod:`zoo.rnn`, :mod:`zoo.resnet_cifar` (the
CIFAR ResNets of He et al. 2016, with offline pretrained CIFAR-10 weights) and :mod:`zoo.adaptor` (the paper's
adaptors on a frozen timm backbone, whose backbone and weights come from :mod:`zoo._builder`).
:class:`ImageClassifier` (:mod:`zoo.classifier`) trains any of them; :class:`TimmAdaptor` is it with the
adaptor's options as arguments, and :func:`export_onnx` exports the result.
"""

from zoo._builder import (
    FeatureBackbone,
    WeightsUnavailableError,
    backbone_data_config,
    backbone_transform,
    create_backbone,
    create_feature_backbone,
)
from zoo._cache import FeatureCache
from zoo._registry import create_model, is_model, list_models, register_model
from zoo.adaptor import Adaptor, paper_adaptor, timm_adaptor
from zoo.classifier import FrozenFeatures, ImageClassifier, SequenceClassifier, TimmAdaptor
from zoo.export import export_onnx
from zoo.paper import cnn2, convgrid, convnet4, mlp, mlp2, vgg11
from zoo.resnet_cifar import CifarResNet, resnet20, resnet32, resnet44, resnet56
from zoo.rnn import LastHidden, birnn1, rnn1, rnn2

__all__ = [
    "Adaptor",
    "CifarResNet",
    "FeatureBackbone",
    "FeatureCache",
    "FrozenFeatures",
    "ImageClassifier",
    "LastHidden",
    "SequenceClassifier",
    "TimmAdaptor",
    "WeightsUnavailableError",
    "backbone_data_config",
    "backbone_transform",
    "birnn1",
    "cnn2",
    "convgrid",
    "convnet4",
    "create_backbone",
    "create_feature_backbone",
    "create_model",
    "export_onnx",
    "is_model",
    "list_models",
    "mlp",
    "mlp2",
    "paper_adaptor",
    "register_model",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "rnn1",
    "rnn2",
    "timm_adaptor",
    "vgg11",
]
