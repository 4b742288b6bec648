import pytest
import torch

from lightning_tpsgd.projections import FilterProjection, create_projection, list_projections

DENSE = [p for p in list_projections() if p != "filter"]


def _built(name, shape, seed=0, num_classes=10, scale=1.0):
    proj = create_projection(name, num_classes, scale=scale)
    proj.build(shape, seed, torch.device("cpu"), torch.float32)
    return proj


def test_registry():
    assert list_projections() == ["binary", "filter", "normal", "orthogonal", "uniform"]
    with pytest.raises(ValueError, match="Unknown projection 'gauss'. Valid names: binary, filter"):
        create_projection("gauss", 10)


@pytest.mark.parametrize("name", list_projections())
def test_shape_determinism_and_gather(name):
    shape = (8, 6, 6)
    a, b, c = _built(name, shape, seed=1), _built(name, shape, seed=1), _built(name, shape, seed=2)
    assert a.P.shape == (10, *shape)
    assert torch.equal(a.P, b.P)
    assert not torch.equal(a.P, c.P)
    y = torch.tensor([3, 3, 7])
    targets = a(y)
    assert targets.shape == (3, *shape)
    assert torch.equal(targets[0], a.P[3]) and torch.equal(targets[2], a.P[7])


@pytest.mark.parametrize("name", DENSE)
def test_dense_projections_have_unit_rms_times_scale(name):
    proj = _built(name, (4096,), scale=2.0)
    rms = proj.P.pow(2).mean().sqrt().item()
    assert rms == pytest.approx(2.0, rel=0.05)


def test_orthogonal_rows_are_orthogonal():
    P = _built("orthogonal", (64,)).P
    gram = P @ P.T / 64
    torch.testing.assert_close(gram, torch.eye(10), atol=1e-5, rtol=0)


def test_binary_entries_are_plus_minus_one():
    assert set(_built("binary", (100,)).P.unique().tolist()) == {-1.0, 1.0}


def test_filter_projection_std_grows_with_filter_index():
    P = _built("filter", (16, 32, 32)).P  # (C, K, H, W)
    std = P.transpose(0, 1).reshape(16, -1).std(dim=1)
    expected = torch.arange(1, 17) / 16
    torch.testing.assert_close(std, expected, rtol=0.05, atol=0)


def test_filter_projection_rejects_dense_shapes():
    with pytest.raises(ValueError, match="needs a conv output shape"):
        _built("filter", (32,))


def test_unbuilt_projection_errors():
    with pytest.raises(RuntimeError, match="before build"):
        FilterProjection(10)(torch.tensor([0]))


@pytest.mark.parametrize(("kwargs", "match"), [({"num_classes": 0}, "num_classes"), ({"scale": -1.0}, "scale")])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_projection("normal", **{"num_classes": 10, **kwargs})
