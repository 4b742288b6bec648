"""In-memory LightningDataModules for the tpSGD examples and benchmarks.

- :class:`DigitsDataModule`: scikit-learn's bundled 8x8 digits; fully offline, the quickstart data.
- :class:`MNISTDataModule`, :class:`CIFAR10DataModule`: read from a ``.npz`` file, a torchvision root
  or Hugging Face ``datasets`` (``source="auto"`` picks the first available), decoded once and kept in
  memory as normalized float tensors.
- :class:`SeqMNISTDataModule`, :class:`EEGSeizureDataModule`, :class:`Sentiment140DataModule`: the
  sequence tasks of the paper's recurrent experiments (Table 6), as batch-first ``(B, T, F)`` sequences.
- :class:`ImagenetteDataModule`: Imagenette for the adaptor experiments, from the offline JPEG ``.npz`` or
  Hugging Face, normalized with the backbone's mean/std.

``data_dir=None`` falls back to the ``TPSGD_DATA_DIR`` environment variable (see :func:`resolve_data_dir`).
"""

from lightning_tpsgd.data._common import (
    CACHE_DIR_ENV,
    DATA_DIR_ENV,
    DatasetUnavailableError,
    load_npz_arrays,
    resolve_cache_dir,
    resolve_data_dir,
)
from lightning_tpsgd.data.digits import DigitsDataModule
from lightning_tpsgd.data.imagenette import ImagenetteDataModule
from lightning_tpsgd.data.sequences import (
    SEQ_MNIST_MODES,
    EEGSeizureDataModule,
    Sentiment140DataModule,
    SeqMNISTDataModule,
)
from lightning_tpsgd.data.vision import VALID_SOURCES, CIFAR10DataModule, MNISTDataModule

__all__ = [
    "CACHE_DIR_ENV",
    "DATA_DIR_ENV",
    "VALID_SOURCES",
    "CIFAR10DataModule",
    "DatasetUnavailableError",
    "DigitsDataModule",
    "EEGSeizureDataModule",
    "ImagenetteDataModule",
    "MNISTDataModule",
    "SEQ_MNIST_MODES",
    "SeqMNISTDataModule",
    "Sentiment140DataModule",
    "load_npz_arrays",
    "resolve_cache_dir",
    "resolve_data_dir",
]
