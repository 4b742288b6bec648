"""Tests for zoo/_cache.py: the content-addressed ``FeatureCache`` of a frozen backbone's features.

Training with the cache (``ImageClassifier(cache_features=...)``) is tested in test_classifier.py.
"""

from __future__ import annotations

import tempfile

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from zoo import Adaptor, FeatureCache
from zoo._cache import fingerprint


def _flat(x: torch.Tensor) -> list[torch.Tensor]:
    return [x.flatten(1)]


def test_fingerprint_is_per_sample_and_exact():
    x = torch.randn(10, 3, 8, 8)
    keys = fingerprint(x)
    assert keys.shape == (10, 2) and keys.dtype == torch.int64
    assert torch.equal(keys[3:7], fingerprint(x[3:7])) and torch.equal(keys[5], fingerprint(x[5:6])[0])
    y = x.clone()
    y[4, 1, 2, 3] = torch.nextafter(y[4, 1, 2, 3], torch.tensor(10.0))  # one ulp in one pixel
    changed = (fingerprint(y) != keys).any(1)
    assert changed.tolist() == [i == 4 for i in range(10)]
    assert len({tuple(k) for k in keys.tolist()}) == 10


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("directory", [False, True])
def test_cache_returns_each_samples_own_features(shuffle, directory, tmp_path):
    cache = FeatureCache(tmp_path if directory else None, chunk_rows=4)  # batches straddle storage chunks
    torch.manual_seed(0)
    net = Adaptor("test_efficientnet", num_classes=3, taps=(2, 4), img_size=32)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(30, 3, 32, 32, generator=g))
    loader = DataLoader(data, batch_size=7, shuffle=shuffle, generator=torch.Generator().manual_seed(1))
    for epoch in range(2):
        for (x,) in loader:
            got = cache.get(x, net.extract)
            want = net.extract(x)
            for g, w in zip(got, want, strict=True):  # a batch of other samples may round differently (1 thread)
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)
        assert (cache.misses, cache.hits) == (30, 30 * epoch)
    row_bytes = (32 * 4 * 4 + 64) * 4
    assert len(cache) == 30 and cache.nbytes == 8 * 4 * row_bytes  # 8 chunks of 4 rows: no over-allocation
    assert bool(list(tmp_path.glob("features-*.bin"))) == directory


def test_cache_failure_midway_removes_its_files_at_once(tmp_path, monkeypatch):
    cache = FeatureCache(tmp_path, chunk_rows=4)
    x = torch.randn(10, 3, 4, 4)
    cache.get(x[:2], _flat)
    kept = set(tmp_path.glob("features-*.bin"))
    assert len(kept) == 1
    made = []
    mkstemp = tempfile.mkstemp

    def failing_mkstemp(*args, **kwargs):  # the disk fills up while the batch straddles new chunks
        made.append(1)
        if len(made) == 2:
            raise OSError(28, "No space left on device")
        return mkstemp(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", failing_mkstemp)
    with pytest.raises(OSError, match="No space left"):
        cache.get(x, _flat)  # 8 new rows: the first new chunk is written, the second cannot be created
    assert set(tmp_path.glob("features-*.bin")) == kept  # the first new chunk's file is gone
    assert len(cache) == 2 and cache.nbytes == 4 * 48 * 4
    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    feats = cache.get(x, _flat)  # the cache still works, and serves the right rows
    assert torch.equal(feats[0], x.flatten(1)) and len(cache) == 10 and cache.hits == 2


def test_disk_cache_reads_the_rows_back_from_its_files(tmp_path):
    cache = FeatureCache(tmp_path, chunk_rows=16)
    x = torch.randn(20, 3, 4, 4)
    feats = cache.get(x, lambda x: [x.flatten(1), x.mean((2, 3))])
    files = sorted(tmp_path.glob("features-*.bin"))
    assert cache.nbytes == 2 * 16 * (48 + 3) * 4 and len(files) == 4
    assert sum(f.stat().st_size for f in files) == 20 * (48 + 3) * 4  # every stored row is in the files
    again = cache.get(x.flip(0), lambda x: pytest.fail("all cached"))
    assert all(torch.equal(a, b.flip(0)) for a, b in zip(again, feats, strict=True))
    for f in files:  # the features live in the files, not in memory: truncated files cannot be served
        f.write_bytes(b"")
    with pytest.raises(OSError, match="is shorter than expected"):
        cache.get(x, lambda x: pytest.fail("all cached"))
    cache.clear()
    assert not list(tmp_path.glob("features-*.bin")) and len(cache) == 0


def test_changed_input_size_and_other_backbones_raise():
    cache = FeatureCache()
    cache.get(torch.randn(2, 3, 4, 4), _flat)
    with pytest.raises(ValueError, match="the input size changed between batches"):
        cache.get(torch.randn(2, 3, 5, 5), _flat)
    cache.bind("a|taps=[4]|0")
    cache.bind("a|taps=[4]|0")
    with pytest.raises(ValueError, match="holds features of 'a|taps=\\[4\\]|0' but is now used with 'b"):
        cache.bind("b|taps=[4]|0")


def test_bad_options():
    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype"):
        FeatureCache(dtype=torch.int32)
    with pytest.raises(ValueError, match="chunk_rows must be a positive int"):
        FeatureCache(chunk_rows=0)
    half = FeatureCache(dtype=torch.float16)
    assert half.get(torch.randn(2, 3), lambda x: [x])[0].dtype == torch.float16
