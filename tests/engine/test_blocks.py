"""lightning_tpsgd.engine.blocks: blocks, taps, the trace of the first batch and its locality checks."""

import pytest
import torch
import torch.nn.functional as F
from _nets import batch, cnn, local_grads, mlp, sgd
from torch import nn

from lightning_tpsgd import LocalLearner, find_blocks
from lightning_tpsgd.engine.blocks import NORM_LAYERS, is_activation, register_activation
from lightning_tpsgd.functional import tpsgd_l2


def test_blocks_of_a_cnn():
    blocks = find_blocks(cnn())
    assert [b.name for b in blocks] == ["0", "4", "7"]
    assert [b.is_output for b in blocks] == [False, False, True]
    assert [n for n, _ in blocks[0].followers] == ["1", "2", "3"]
    assert len(blocks[0].params) == 4  # conv weight/bias + batch-norm weight/bias


@pytest.mark.parametrize(
    ("target", "rule", "tap"),
    [("post", "ce", nn.LeakyReLU), ("post", "auto", nn.MaxPool2d), ("pre", "auto", nn.BatchNorm2d)],
)
def test_tap_is_after_or_before_the_activation(target, rule, tap):
    """A learned readout (rule auto) reads the block after the pooling that follows its activation."""
    learner = LocalLearner(cnn(), target=target, rule=rule)
    assert isinstance(learner.hidden[0].tap, tap)
    learner.close()


def test_nested_modules_and_frozen_layers_pass_through():
    torch.manual_seed(0)
    frozen = nn.Linear(64, 64).requires_grad_(False)
    model = nn.Sequential(nn.Flatten(), frozen, nn.Sequential(nn.Linear(64, 8), nn.ReLU()), nn.Linear(8, 3))
    blocks = find_blocks(model)
    assert [b.name for b in blocks] == ["2.0", "3"]


@pytest.mark.parametrize(
    ("model", "error", "match"),
    [
        (nn.Sequential(nn.LSTM(4, 4), nn.Linear(4, 2)), TypeError, "Use lightning_tpsgd.nn.RNN"),
        (nn.Sequential(nn.Embedding(4, 4), nn.Linear(4, 2)), TypeError, r"'0' \(Embedding\) has trainable parameters"),
        (nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 2)), ValueError, "comes before any trainable layer"),
        (nn.Sequential(nn.ReLU()), ValueError, "no trainable layer"),
    ],
)
def test_unsupported_models_are_rejected_by_name(model, error, match):
    with pytest.raises(error, match=match):
        find_blocks(model)


def test_direct_parameters_are_rejected():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    model.register_parameter("gain", nn.Parameter(torch.ones(1)))
    with pytest.raises(TypeError, match="Parameter 'gain' is trainable but belongs to no supported layer"):
        find_blocks(model)


def test_norm_after_pooling_is_rejected():
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(18, 2)
    )
    learner = LocalLearner(model, num_classes=2, rule="ce")  # found when the first batch shows the call order
    with pytest.raises(ValueError, match="Norm layer '3' in block '0' comes after"):
        learner.step(torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 0, 1]))
    learned = LocalLearner(model, num_classes=2, optimizer=sgd())  # a learned readout reads after pool and norm
    learned.step(torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 0, 1]))
    assert learned.hidden[0].tap is model[3]


def test_unknown_output_layer():
    with pytest.raises(ValueError, match="output layer 'fc' is not a trainable layer"):
        find_blocks(mlp(), output_layers=["fc"])


def test_no_graph_crosses_blocks():
    model = cnn()
    learner = LocalLearner(model, rule="ce")  # a fixed projection: no optimizer needed for local_training
    x, y = batch()
    with learner.local_training(y):
        out = model(x)
    # the only parameters reachable from the output are the output layer's
    reachable = set()
    stack = [out.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None:
            continue
        if hasattr(fn, "variable"):
            reachable.add(id(fn.variable))
        stack.extend(f for f, _ in fn.next_functions)
    assert reachable == {id(p) for p in model[7].parameters()}


def test_a_layer_called_twice_is_an_error():
    torch.manual_seed(0)
    shared = nn.Linear(8, 8)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared, self.act, self.out = shared, nn.Tanh(), nn.Linear(8, 3)

        def forward(self, x):
            return self.out(self.act(self.shared(self.act(self.shared(x)))))

    learner = LocalLearner(Twice(), optimizer=sgd())
    with pytest.raises(ValueError, match="Layer 'shared' \\(Linear\\) is called more than once in one forward"):
        learner.step(torch.rand(4, 8), torch.tensor([0, 1, 2, 0]))


def test_skip_connection_across_blocks_is_detected():
    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.act, self.b = nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)

        def forward(self, x):
            z = self.a(x)
            return self.b(self.act(z)) + z  # z still carries block a's graph

    learner = LocalLearner(Skip(), num_classes=4, optimizer=sgd())
    with pytest.raises(RuntimeError, match="skip connection across blocks"):
        learner.step(torch.rand(3, 4), torch.tensor([0, 1, 2]))


class FunctionalRelu(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.out = nn.Linear(64, 32), nn.Linear(32, 16), nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.fc1(x.flatten(1)))
        return self.out(F.relu(self.fc2(x)))


class ActivationsDeclaredLast(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.out = nn.Linear(64, 32), nn.Linear(32, 16), nn.Linear(16, 10)
        self.act1, self.act2 = nn.ReLU(), nn.Tanh()

    def forward(self, x):
        return self.out(self.act2(self.fc2(self.act1(self.fc1(x.flatten(1))))))


class SharedRelu(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.out = nn.Linear(64, 32), nn.Linear(32, 16), nn.Linear(16, 10)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.out(self.relu(self.fc2(self.relu(self.fc1(x.flatten(1))))))


def _post_activation(model, x):
    """The hidden outputs after their activation, computed by hand."""
    h1 = torch.relu(model.fc1(x.flatten(1)))
    act2 = torch.tanh if isinstance(model, ActivationsDeclaredLast) else torch.relu
    return [h1, act2(model.fc2(h1.detach()))]


@pytest.mark.parametrize("make", [FunctionalRelu, ActivationsDeclaredLast, SharedRelu])
@pytest.mark.parametrize("traced", [True, False], ids=["first-batch", "later-batch"])
def test_hidden_targets_are_post_activation_however_the_activation_is_written(make, traced):
    model = make()
    learner = LocalLearner(model, rule="l2")
    x, y = batch()
    if not traced:  # the first batch is traced and trained from the graphs it kept; later ones by the hooks
        with learner.local_training(y):
            model(x)
        learner.discard()
    with learner.local_training(y):
        model(x)
    assert [b.name for b in learner.blocks] == ["fc1", "fc2", "out"]
    grads = local_grads(learner)
    for block, h in zip(learner.hidden, _post_activation(model, x), strict=True):
        expected = torch.autograd.grad(tpsgd_l2(h, block.projection.P[y]), list(block.layer.parameters()))
        for g, e in zip(grads[block.index], expected, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-7)


def test_functional_activation_taps_the_next_layers_input():
    learner = LocalLearner(FunctionalRelu())
    learner.step(*batch())
    assert [b.tap for b in learner.hidden] == [None, None] and all(b.functional_activation for b in learner.hidden)
    learner = LocalLearner(FunctionalRelu(), target="pre")  # "pre" stays on the layer
    learner.step(*batch())
    assert [b.tap for b in learner.hidden] == [learner.model.fc1, learner.model.fc2]


def test_a_head_registered_first_is_the_output_layer_and_gives_num_classes():
    class HeadFirst(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.head = nn.Linear(16, 3)
            self.body = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU())

        def forward(self, x):
            return self.head(self.body(x))

    model = HeadFirst()
    learner = LocalLearner(model, optimizer=sgd())
    logs = learner.step(torch.rand(6, 8), torch.tensor([0, 1, 2, 0, 1, 2]))
    assert [b.name for b in learner.blocks] == ["body.0", "body.2", "head"]
    assert learner.num_classes == 3 and set(logs) == {"body.0", "body.2", "loss"}
    assert learner.hidden[1].projection.P.shape == (3, 16)
    learner.step(torch.rand(6, 8), torch.tensor([0, 1, 2, 0, 1, 2]))  # the traced plan runs the next batches
    with pytest.raises(ValueError, match=r"Labels must lie in \[0, 3\)"):
        learner.step(torch.rand(2, 8), torch.tensor([0, 3]))


@pytest.mark.parametrize("library", ["torchvision", "timm"])
def test_resnet18_skip_connections_are_an_error_on_the_first_batch(library):
    if library == "timm":
        timm = pytest.importorskip("timm")
        model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    else:
        torchvision = pytest.importorskip("torchvision")
        model = torchvision.models.resnet18(weights=None, num_classes=10)
    learner = LocalLearner(model, optimizer=sgd())
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(
        RuntimeError,
        match=r"The output of block 'layer1\.0\.conv2' .* on block\(s\) \['conv1'\] .* skip connection across blocks",
    ):
        learner.step(torch.rand(2, 3, 32, 32), torch.tensor([0, 1]))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))  # nothing was trained


class TwoTowers(nn.Module):
    def __init__(self, functional):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.out = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(8, 3)
        self.act_a, self.act_b = nn.ReLU(), nn.ReLU()
        self.functional = functional

    def forward(self, x):
        if self.functional:  # the towers' outputs end only at the head's input: they cannot be told apart
            return self.out(torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], dim=1))
        return self.out(torch.cat([self.act_a(self.a(x)), self.act_b(self.b(x))], dim=1))


def test_parallel_towers_joined_at_a_layer_train_locally():
    model = TwoTowers(functional=False)
    learner = LocalLearner(model, optimizer=sgd())
    x, y = torch.rand(3, 4), torch.tensor([0, 1, 2])
    for _ in range(2):
        assert set(learner.step(x, y)) == {"a", "b", "loss"}
    with pytest.raises(RuntimeError, match=r"The output of block 'b' .* depends on block\(s\) \['a'\]"):
        LocalLearner(TwoTowers(functional=True)).step(x, y)


def test_a_skip_into_the_loss_is_an_error():
    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.act, self.b = nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)

        def forward(self, x):
            z = self.act(self.a(x))
            return self.b(z) + self.a.weight.sum()  # a regulariser on a hidden layer's weights

    with pytest.raises(RuntimeError, match=r"The model's loss depends on hidden block\(s\) \['a'\]"):
        LocalLearner(Skip(), num_classes=4).step(torch.rand(3, 4), torch.tensor([0, 1, 2]))


class FunctionalCNN(nn.Module):
    def __init__(self, pool):
        super().__init__()
        torch.manual_seed(0)
        self.pool = pool
        self.c1, self.c2 = nn.Conv2d(1, 4, 3), nn.Conv2d(4, 6, 3)
        self.fc = nn.Linear(6 * (2 if pool else 4) ** 2, 10)

    def forward(self, x):
        x = F.relu(self.c2(F.relu(self.c1(x))))
        return self.fc((F.max_pool2d(x, 2) if self.pool else x).flatten(1))


@pytest.mark.parametrize("pool", [False, True])
def test_a_cnn_with_functional_activations_trains_post_activation(pool):
    model = FunctionalCNN(pool)
    learner = LocalLearner(model, rule="l2", optimizer=sgd())
    x, y = batch()
    learner.step(x, y)  # traced
    learner.optimizer.zero_grad()
    with learner.local_training(y):
        model(x)
    c1, c2 = learner.hidden
    # a flatten alone keeps the conv map (filter projection); pooling first leaves the flat vector (dense projection)
    assert c1.projection.name == "filter" and c1.projection.P.shape == (10, 4, 6, 6)
    assert (c2.projection.name, c2.projection.P.shape) == (("uniform", (10, 24)) if pool else ("filter", (10, 6, 4, 4)))
    h1 = F.relu(model.c1(x))
    h2 = F.relu(model.c2(h1.detach()))
    h2 = F.max_pool2d(h2, 2).flatten(1) if pool else h2
    grads = local_grads(learner)
    for block, h in ((c1, h1), (c2, h2)):
        expected = torch.autograd.grad(tpsgd_l2(h, block.projection.P[y]), list(block.layer.parameters()))
        for g, e in zip(grads[block.index], expected, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-7)


def test_frozen_layers_pass_through_and_uncalled_layers_are_named():
    class WithAuxiliaryHead(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.frozen = nn.Linear(64, 64).requires_grad_(False)
            self.body = nn.Sequential(nn.Linear(64, 8), nn.ReLU())
            self.head, self.aux = nn.Linear(8, 3), nn.Linear(8, 3)  # aux: used only outside training

        def forward(self, x):
            return self.head(self.body(torch.relu(self.frozen(x.flatten(1)))))

    model = WithAuxiliaryHead()
    frozen, aux = model.frozen.weight.clone(), model.aux.weight.clone()
    learner = LocalLearner(model, optimizer=sgd())
    with pytest.warns(UserWarning, match=r"Trainable layers \['aux'\] were not called by the training forward"):
        logs = learner.step(torch.rand(6, 64), torch.tensor([0, 1, 2, 0, 1, 2]))
    assert set(logs) == {"body.0", "loss"} and [b.name for b in learner.blocks] == ["body.0", "head"]
    assert torch.equal(model.frozen.weight, frozen) and torch.equal(model.aux.weight, aux)


@pytest.mark.parametrize("detach", [False, True])
def test_a_residual_trains_once_its_skip_is_detached_as_the_error_says(detach):
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.inp, self.fc, self.out, self.act = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3), nn.ReLU()

        def forward(self, x):
            a = self.act(self.inp(x))
            return self.out(self.act(self.fc(a) + (a.detach() if detach else a)))

    learner = LocalLearner(Residual(), optimizer=sgd())
    x, y = torch.rand(6, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    if not detach:
        with pytest.raises(RuntimeError, match=r"block 'fc' \(at its tap 'act'\) depends on block\(s\) \['inp'\]"):
            learner.step(x, y)
        return
    for _ in range(2):
        assert set(learner.step(x, y)) == {"inp", "fc", "loss"}


class _Packed:
    """A saved tensor held by autograd, counted while alive."""

    alive = 0

    def __init__(self, t):
        self.t = t
        _Packed.alive += 1

    def __del__(self):
        _Packed.alive -= 1


@pytest.mark.parametrize("num_classes", [None, 10])
def test_the_traced_batch_frees_each_blocks_graph_when_the_next_layer_is_called(num_classes):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(64, 32), nn.LeakyReLU(), nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 10)
    )
    learner = LocalLearner(model, rule="l2", num_classes=num_classes)
    seen = []
    model[5].register_forward_pre_hook(lambda m, i: seen.append(_Packed.alive))  # after the engine's own hook
    x, y = batch()
    with torch.autograd.graph.saved_tensors_hooks(_Packed, lambda p: p.t):
        with learner.local_training(y):
            model(x)
    # when the output layer is called, the hidden blocks' graphs are gone: nothing they saved is alive
    assert seen == [0]


def test_timm_activations_are_taps_like_torchs():
    layers = pytest.importorskip("timm.layers")
    for act in (layers.GELU(), layers.Swish(), layers.get_act_layer("hard_mish")()):
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), act, nn.Dropout(0.0), nn.Linear(16, 10))
        learner = LocalLearner(model, rule="ce")
        learner.step(*batch())
        assert learner.hidden[0].tap is act, type(act)


def test_register_activation_makes_a_custom_module_a_tap():
    class Squash(nn.Module):
        def forward(self, x):
            return x / (1 + x.abs())

    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), Squash(), nn.Linear(16, 10))
    learner = LocalLearner(model, rule="ce")
    learner.step(*batch())
    assert learner.hidden[0].tap is model[1]  # not an activation yet: the layer itself (no functional activation)
    register_activation(Squash)
    learner = LocalLearner(model, rule="ce")
    learner.step(*batch())
    assert learner.hidden[0].tap is model[2] and is_activation(model[2])
    with pytest.raises(TypeError, match="register_activation takes nn.Module classes"):
        register_activation(torch.tanh)


@pytest.mark.parametrize("norm", ["SyncBatchNorm", "InstanceNorm1d", "LayerNorm", "GroupNorm", "RMSNorm"])
def test_norms_are_recognised_from_torchs_public_classes(norm):
    if not hasattr(nn, norm):
        pytest.skip(f"torch has no nn.{norm}")
    make = {"GroupNorm": lambda: nn.GroupNorm(2, 16), "InstanceNorm1d": lambda: nn.InstanceNorm1d(16, affine=True)}
    module = make.get(norm, lambda: getattr(nn, norm)(16))()
    assert isinstance(module, NORM_LAYERS)
    blocks = find_blocks(nn.Sequential(nn.Linear(8, 16), module, nn.ReLU(), nn.Linear(16, 3)))
    assert len(blocks[0].params) == 2 + len(list(module.parameters()))
