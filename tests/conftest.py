"""Shared fixtures: tiny synthetic stand-ins for the datasets the benchmark scripts read."""

import io

import numpy as np
import pytest
from PIL import Image

SIZES = {
    "mnist": ((28, 28), 1200, 500),
    "cifar10": ((32, 32, 3), 256, 128),
    "imagenette_112_jpeg": ((40, 40, 3), 700, 350),
}


def _split(rng: np.random.Generator, patterns: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` uint8 images of a class-dependent pattern plus noise (learnable), and their labels."""
    y = rng.integers(0, 10, n)
    return (0.5 * patterns[y] + rng.uniform(0, 127, (n, *patterns.shape[1:]))).astype(np.uint8), y.astype(np.uint8)


def _jpegs(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    blobs = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG")
        blobs.append(np.frombuffer(buf.getvalue(), dtype=np.uint8))
    return np.concatenate(blobs), np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory):
    """A folder with ``mnist.npz``, ``cifar10.npz`` and ``imagenette_112_jpeg.npz`` in the real files' layout."""
    root, rng = tmp_path_factory.mktemp("data"), np.random.default_rng(0)
    for name, (shape, n_train, n_test) in SIZES.items():
        patterns, arrays = rng.uniform(0, 255, (10, *shape)), {}
        for split, n in (("train", n_train), ("test", n_test)):
            x, arrays[f"y_{split}"] = _split(rng, patterns, n)
            if name.startswith("imagenette"):
                arrays[f"x_{split}_jpeg"], arrays[f"x_{split}_offsets"] = _jpegs(x)
            else:
                arrays[f"x_{split}"] = x
        np.savez(root / f"{name}.npz", **arrays)
    return root
