import pytest
import torch

from lightning_tpsgd import _random
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


# ---------------------------------------------------------------- the counter-based generator
def _lowbias32(x):
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def _reference_bits(key, n):
    """The generator recomputed with Python integers (exact, no tensors, no device)."""
    z = (key + 0x9E3779B97F4A7C15) % 2**64  # splitmix64's finaliser
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    z ^= z >> 31
    k0, k1 = z & 0x7FFFFFFF, (z >> 32) & 0xFFFFFFFF
    return [_lowbias32(_lowbias32(i + k0) ^ k1) for i in range(n)]


@pytest.mark.parametrize("key", [0, 1, 12345, 2**40 + 7, 2**64 - 1])
@pytest.mark.parametrize("block", [None, 256], ids=["one-block", "cpu-blocks"])
def test_bits_equal_an_exact_integer_recomputation(key, block, monkeypatch):
    if block is not None:  # the CPU computes the hash block by block
        monkeypatch.setattr(_random, "_CPU_BLOCK", block)
    bits = _random.bits(key, 3000)
    assert bits.dtype == torch.int64
    assert bits.tolist() == _reference_bits(key, 3000)  # no int64 overflow, no sign trouble
    assert torch.equal(_random.bits(key, 3000), bits)  # deterministic


def test_uniform_and_signs_are_exact_functions_of_the_bits():
    key, bits = 5, _random.bits(5, 1000)
    assert torch.equal(_random.uniform(key, (10, 100)).flatten(), (bits >> 8).double().mul(2.0**-24).float())
    assert torch.equal(_random.signs(key, (1000,)), torch.where(bits >= 2**31, 1.0, -1.0))


def test_generator_moments():
    n = 1 << 20
    u = _random.uniform(1, (n,)).double()
    assert 0 <= u.min() and u.max() < 1
    assert u.mean().item() == pytest.approx(0.5, abs=2e-3) and u.var().item() == pytest.approx(1 / 12, rel=1e-2)
    z = _random.normal(2, (n,)).double()
    assert z.dtype == torch.float64 and z.shape == (n,)
    assert z.mean().item() == pytest.approx(0, abs=3e-3) and z.var().item() == pytest.approx(1, rel=1e-2)
    assert (z**3).mean().item() == pytest.approx(0, abs=1e-2) and (z**4).mean().item() == pytest.approx(3, rel=2e-2)
    s = _random.signs(3, (n,))
    assert set(s.unique().tolist()) == {-1.0, 1.0} and s.mean().item() == pytest.approx(0, abs=3e-3)
    bits = _random.bits(4, n)
    for b in range(32):  # every bit is balanced
        assert ((bits >> b) & 1).double().mean().item() == pytest.approx(0.5, abs=3e-3), b


def test_streams_of_different_keys_and_neighbouring_entries_are_uncorrelated():
    n = 1 << 18
    u = _random.uniform(0, (n + 1,))
    z = _random.normal(0, (n + 1,))
    uniform = [u[:-1], u[1:]] + [_random.uniform(k, (n,)) for k in (1, 2, 3, 2**32, 2**63)]
    normal = [z[:-1], z[1:]] + [_random.normal(k, (n,)) for k in (1, 2, 3)]
    for streams in (uniform, normal):
        corr = torch.corrcoef(torch.stack(streams).double())
        assert (corr - torch.eye(len(streams), dtype=torch.float64)).abs().max().item() < 0.01
    assert not torch.equal(_random.bits(0, 100), _random.bits(1, 100))


def test_a_prefix_does_not_depend_on_the_size_of_the_draw():
    assert torch.equal(_random.uniform(9, (50,)), _random.uniform(9, (80,))[:50])
    assert torch.equal(_random.signs(9, (50,)), _random.signs(9, (80,))[:50])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", list_projections())
def test_projections_are_the_same_on_cpu_and_cuda(name):
    shape, key = (16, 12, 12), 11
    proj = create_projection(name, 10)
    cpu = proj.sample(shape, key, torch.device("cpu"))
    cuda = proj.sample(shape, key, torch.device("cuda")).cpu()
    assert torch.equal(_random.bits(key, 4096, "cuda").cpu(), _random.bits(key, 4096))
    if name in ("uniform", "binary"):
        assert torch.equal(cuda, cpu)
    else:  # float64 log/cos/sin (and QR) may differ in a float64 ulp, so a float32 entry may differ in rare cases
        torch.testing.assert_close(cuda, cpu, rtol=1e-6, atol=1e-6)
        assert (cuda != cpu).float().mean().item() < 1e-3


@pytest.mark.parametrize("name", list_projections())
def test_projections_are_drawn_on_the_target_device(name):
    proj = create_projection(name, 10)
    proj.build((4, 6, 6), 0, torch.device("meta"), torch.float16)  # no CPU draw that is then copied
    assert proj.P.device.type == "meta" and proj.P.dtype == torch.float16 and proj.P.shape == (10, 4, 6, 6)


def test_blocks_of_the_cpu_path_give_the_same_numbers(monkeypatch):
    whole = {f: f(4, (3, 333)) for f in (_random.uniform, _random.normal, _random.signs)}
    monkeypatch.setattr(_random, "_CPU_BLOCK", 64)
    for f, expected in whole.items():
        assert torch.equal(f(4, (3, 333)), expected), f.__name__
    assert torch.equal(_random.bits(4, 100, start=900), _random.bits(4, 1000)[900:])
    with pytest.raises(ValueError, match="2\\*\\*31 entries"):
        _random.bits(4, 2, start=2**31 - 1)
