"""Tests for lightning_tpsgd/data/sequences.py, on tiny synthetic ``.npz`` files (plus real-data checks)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_tpsgd.data import (
    DatasetUnavailableError,
    EEGSeizureDataModule,
    Sentiment140DataModule,
    SeqMNISTDataModule,
)
from lightning_tpsgd.data.sequences import tokenize

SHARED_DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


@pytest.fixture(autouse=True)
def _offline_env(monkeypatch, tmp_path):
    monkeypatch.delenv("TPSGD_DATA_DIR", raising=False)
    monkeypatch.setenv("TPSGD_CACHE_DIR", str(tmp_path / "tpsgd_cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def _write_mnist(folder: Path) -> None:
    rng = np.random.default_rng(0)
    np.savez(
        folder / "mnist.npz",
        x_train=rng.integers(0, 256, (60, 28, 28), dtype=np.uint8),
        y_train=(np.arange(60) % 10).astype(np.uint8),
        x_test=rng.integers(0, 256, (20, 28, 28), dtype=np.uint8),
        y_test=(np.arange(20) % 10).astype(np.uint8),
    )


def _write_eeg(folder: Path) -> None:
    rng = np.random.default_rng(0)
    y_train, y_test = np.repeat(np.arange(1, 6), 8).astype(np.uint8), np.repeat(np.arange(1, 6), 4).astype(np.uint8)
    np.savez(
        folder / "epileptic_seizure.npz",
        x_train=rng.integers(-500, 500, (40, 178)).astype(np.int16),
        y_train=y_train,
        x_test=rng.integers(-500, 500, (20, 178)).astype(np.int16),
        y_test=y_test,
    )


TWEETS = [
    "@bob I hate mondays http://t.co/x so bad",
    "love love love this, can't wait!",
    "worst day ever",
    "what a lovely sunny day",
    "I hate rain and I hate wind and I hate the cold and I hate being wet every single day",
    "www.spam.com good vibes",
    "so sad",
    "happy happy",
]


def _write_tweets(folder: Path, copies: int = 5) -> None:
    texts = TWEETS * copies
    encoded = [t.encode("utf-8") for t in texts]
    offsets = np.concatenate([[0], np.cumsum([len(e) for e in encoded])]).astype(np.int64)
    labels = np.array([0, 1, 0, 1, 0, 1, 0, 1] * copies, dtype=np.uint8)
    np.savez(
        folder / "sentiment140_100k.npz",
        x_train_utf8=np.frombuffer(b"".join(encoded), dtype=np.uint8),
        x_train_offsets=offsets,
        y_train=labels,
    )


# ---------------------------------------------------------------- Sequential MNIST
@pytest.mark.parametrize(
    ("kwargs", "dims"),
    [({"mode": "rows"}, (28, 28)), ({"mode": "pixels"}, (49, 1)), ({"mode": "pixels", "pixel_pool": 1}, (784, 1))],
)
def test_seq_mnist_shapes(tmp_path, kwargs, dims):
    _write_mnist(tmp_path)
    dm = SeqMNISTDataModule(data_dir=str(tmp_path), val_size=10, batch_size=8, **kwargs)
    assert dm.dims == dims and (dm.seq_len, dm.input_size) == dims
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, *dims) and x.dtype == torch.float32 and y.dtype == torch.long
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (50, 10, 20)
    assert 0.0 <= x.min() and x.max() <= 1.0


def test_seq_mnist_rows_and_pooled_pixels_are_the_image(tmp_path):
    _write_mnist(tmp_path)
    raw = np.load(tmp_path / "mnist.npz")["x_test"][0].astype(np.float32) / 255
    rows = SeqMNISTDataModule(mode="rows", data_dir=str(tmp_path), val_size=0)
    rows.setup()
    torch.testing.assert_close(rows.test_dataset[0][0], torch.from_numpy(raw))
    pixels = SeqMNISTDataModule(mode="pixels", data_dir=str(tmp_path), val_size=0)
    pixels.setup()
    expected = raw.reshape(7, 4, 7, 4).mean(axis=(1, 3)).reshape(49, 1)
    torch.testing.assert_close(pixels.test_dataset[0][0], torch.from_numpy(expected))


def test_seq_mnist_bad_options():
    with pytest.raises(ValueError, match="Unknown mode 'columns'"):
        SeqMNISTDataModule(mode="columns")
    with pytest.raises(ValueError, match="pixel_pool must divide 28"):
        SeqMNISTDataModule(mode="pixels", pixel_pool=3)


# ---------------------------------------------------------------- EEG seizure
def test_eeg_binary_balanced_pooled_and_standardised(tmp_path):
    _write_eeg(tmp_path)
    dm = EEGSeizureDataModule(data_dir=str(tmp_path), val_size=4, batch_size=4)
    assert dm.dims == (45, 1)
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 45, 1)
    test_y = dm.test_dataset.tensors[1]
    assert len(test_y) == 8 and int(test_y.sum()) == 4  # 4 seizure rows, 4 of the 16 others
    assert len(dm.train_dataset) + len(dm.val_dataset) == 16
    pool = torch.cat([dm.train_dataset.tensors[0], dm.val_dataset.tensors[0]])
    assert abs(float(pool.mean())) < 1e-5 and abs(float(pool.std()) - 1) < 0.05


def test_eeg_window_average_and_raw_values(tmp_path):
    _write_eeg(tmp_path)
    arrays = np.load(tmp_path / "epileptic_seizure.npz")
    dm = EEGSeizureDataModule(data_dir=str(tmp_path), val_size=0, balance=False, normalize=False)
    dm.setup()
    x_raw = arrays["x_test"][0].astype(np.float32)
    expected = np.append(x_raw[:176].reshape(44, 4).mean(1), x_raw[176:].mean())  # last window: 2 samples
    torch.testing.assert_close(dm.test_dataset.tensors[0][0, :, 0], torch.from_numpy(expected))
    assert dm.test_dataset.tensors[1].tolist() == [int(v == 1) for v in arrays["y_test"]]
    assert EEGSeizureDataModule(pool=1).dims == (178, 1)


# ---------------------------------------------------------------- Sentiment140
def test_tokenize_drops_urls_and_mentions():
    assert tokenize("@bob I hate mondays http://t.co/x so BAD") == ["i", "hate", "mondays", "so", "bad"]
    assert tokenize("can't wait!! www.x.com") == ["can't", "wait"]


def test_sentiment_one_hot_sequences(tmp_path):
    _write_tweets(tmp_path)
    dm = Sentiment140DataModule(data_dir=str(tmp_path), vocab_size=6, seq_len=4, test_size=8, val_size=4, batch_size=5)
    assert dm.dims == (4, 6)
    dm.setup()
    assert len(dm.vocabulary) == 6 and set(dm.vocabulary[:2]) == {"i", "hate"}
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (28, 4, 8)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (5, 4, 6) and x.dtype == torch.float32 and y.shape == (5,)
    assert set(x.sum(-1).unique().tolist()) <= {0.0, 1.0}  # one word (or nothing) per step
    single, label = dm.train_dataset[0]
    assert single.shape == (4, 6) and label.dtype == torch.long


@pytest.mark.parametrize(("padding", "truncating"), [("pre", "pre"), ("post", "post"), ("pre", "post")])
def test_sentiment_padding_and_truncation(tmp_path, padding, truncating):
    _write_tweets(tmp_path, copies=1)
    dm = Sentiment140DataModule(
        data_dir=str(tmp_path), vocab_size=6, seq_len=4, test_size=1, val_size=0, padding=padding, truncating=truncating
    )
    dm.setup()
    index = {word: i + 1 for i, word in enumerate(dm.vocabulary)}

    def expected(text: str) -> tuple[int, ...]:
        seq = [index.get(word, 0) for word in tokenize(text)]  # 0: out of the vocabulary
        seq = seq[-4:] if truncating == "pre" else seq[:4]
        pad = [0] * (4 - len(seq))
        return tuple(pad + seq if padding == "pre" else seq + pad)

    rows = torch.cat([dm.train_dataset.ids, dm.test_dataset.ids]).tolist()
    assert sorted(map(tuple, rows)) == sorted(expected(t) for t in TWEETS)
    kept = ["wet", "every", "single", "day"] if truncating == "pre" else ["i", "hate", "rain", "and"]
    assert expected(TWEETS[4]) == tuple(index.get(word, 0) for word in kept)  # 21 tokens, 4 kept


def test_sentiment_bad_options():
    with pytest.raises(ValueError, match="Invalid padding 'middle'"):
        Sentiment140DataModule(padding="middle")
    with pytest.raises(ValueError, match="vocab_size must be >= 1"):
        Sentiment140DataModule(vocab_size=0)


# ---------------------------------------------------------------- shared behaviour
@pytest.mark.parametrize(
    ("cls", "filename"),
    [(EEGSeizureDataModule, "epileptic_seizure.npz"), (Sentiment140DataModule, "sentiment140_100k.npz")],
)
def test_missing_file_says_how_to_fix_it(cls, filename, tmp_path, monkeypatch):
    with pytest.raises(
        DatasetUnavailableError, match=rf"TPSGD_DATA_DIR is not set.*data_dir=<folder containing {filename}>"
    ):
        cls().setup()
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path / filename} does not exist"):
        cls(data_dir=str(tmp_path)).prepare_data()
    monkeypatch.setenv("TPSGD_DATA_DIR", str(tmp_path))
    with pytest.raises(DatasetUnavailableError, match="does not exist"):
        cls().setup()


def test_data_dir_may_be_the_file_and_subsets_are_seeded(tmp_path):
    _write_eeg(tmp_path)
    path = str(tmp_path / "epileptic_seizure.npz")
    a = EEGSeizureDataModule(data_dir=path, val_size=2, train_subset=5, test_subset=3, seed=1)
    b = EEGSeizureDataModule(data_dir=path, val_size=2, train_subset=5, test_subset=3, seed=1)
    a.setup()
    b.setup()
    assert len(a.train_dataset) == 5 and len(a.test_dataset) == 3
    for split in ("train_dataset", "val_dataset", "test_dataset"):
        torch.testing.assert_close(getattr(a, split).tensors[0], getattr(b, split).tensors[0])
    with pytest.raises(ValueError, match="train_subset=50 exceeds"):
        EEGSeizureDataModule(data_dir=path, train_subset=50, val_size=2).setup()
    with pytest.raises(ValueError, match="val_size=16 leaves no training data"):
        EEGSeizureDataModule(data_dir=path, val_size=16).setup()


# ---------------------------------------------------------------- the real files (shared/data)
@pytest.mark.shared_data
def test_real_seq_mnist():
    if not (SHARED_DATA / "mnist.npz").is_file():
        pytest.skip("shared/data/mnist.npz is not available")
    dm = SeqMNISTDataModule(mode="pixels", data_dir=str(SHARED_DATA), source="npz")
    dm.setup()
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (55000, 5000, 10000)
    assert dm.test_dataset.tensors[0].shape == (10000, 49, 1)


@pytest.mark.shared_data
def test_real_eeg_matches_table_6():
    if not (SHARED_DATA / "epileptic_seizure.npz").is_file():
        pytest.skip("shared/data/epileptic_seizure.npz is not available")
    dm = EEGSeizureDataModule(data_dir=str(SHARED_DATA))
    dm.setup()
    assert len(dm.train_dataset) + len(dm.val_dataset) == 3680 and len(dm.test_dataset) == 920
    assert dm.test_dataset.tensors[0].shape == (920, 45, 1)
    assert float(dm.test_dataset.tensors[1].float().mean()) == 0.5


@pytest.mark.shared_data
def test_real_sentiment140_matches_table_6():
    if not (SHARED_DATA / "sentiment140_100k.npz").is_file():
        pytest.skip("shared/data/sentiment140_100k.npz is not available")
    dm = Sentiment140DataModule(data_dir=str(SHARED_DATA))
    dm.setup()
    assert len(dm.train_dataset) + len(dm.val_dataset) == 75000 and len(dm.test_dataset) == 25000
    assert len(dm.vocabulary) == 1000
    x, _ = dm.test_dataset[0]
    assert x.shape == (15, 1000)
    assert 0.45 < float(dm.test_dataset.labels.float().mean()) < 0.55
