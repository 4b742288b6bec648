import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_tpsgd import LocalLearner, find_blocks
from lightning_tpsgd.engine import kernels
from lightning_tpsgd.engine.kernels import explicit_grad_ok as _explicit_grad_ok
from lightning_tpsgd.functional import readout_ce, tpsgd_l2


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, 32),
        nn.LeakyReLU(),
        nn.Linear(32, 16),
        nn.Tanh(),
        nn.Dropout(0.0),
        nn.Linear(16, 10),
    )


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.BatchNorm2d(4),
        nn.LeakyReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1),
        nn.LeakyReLU(),
        nn.Flatten(),
        nn.Linear(6 * 3 * 3, 10),
    )


def batch(n=8, shape=(1, 8, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, *shape), generator=g), torch.randint(0, 10, (n,), generator=g)


def sgd(lr=0.1):
    return lambda params: torch.optim.SGD(params, lr=lr)


# ---------------------------------------------------------------- block discovery
def test_blocks_of_a_cnn():
    blocks = find_blocks(cnn())
    assert [b.name for b in blocks] == ["0", "4", "7"]
    assert [b.is_output for b in blocks] == [False, False, True]
    assert [n for n, _ in blocks[0].followers] == ["1", "2", "3"]
    assert len(blocks[0].params) == 4  # conv weight/bias + batch-norm weight/bias


@pytest.mark.parametrize(("target", "tap"), [("post", nn.LeakyReLU), ("pre", nn.BatchNorm2d)])
def test_tap_is_after_or_before_the_activation(target, tap):
    learner = LocalLearner(cnn(), target=target)
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
    learner = LocalLearner(model, num_classes=2)  # found when the first batch shows the call order
    with pytest.raises(ValueError, match="Norm layer '3' in block '0' comes after"):
        learner.step(torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 0, 1]))


def test_unknown_output_layer():
    with pytest.raises(ValueError, match="output layer 'fc' is not a trainable layer"):
        find_blocks(mlp(), output_layers=["fc"])


# ---------------------------------------------------------------- locality
def test_hidden_gradients_come_only_from_the_local_loss():
    model = mlp()
    learner = LocalLearner(model, rule="l2", optimizer=sgd())
    x, y = batch()
    block = learner.hidden[1]  # Linear(32, 16) -> Tanh
    expected_input = model[2](model[1](model[0](x))).detach()
    h = model[4](model[3](expected_input))
    t = block.projection.P[y] if block.projection.is_built else None
    learner.step(x, y)
    t = block.projection.P[y]
    expected = torch.autograd.grad(tpsgd_l2(h, t), list(model[3].parameters()))
    # the step applied w -= lr * grad; recover the gradient from the parameter change
    # (weights were cloned before the step by re-seeding the model)
    before = mlp()[3]
    for p_before, p_after, g in zip(before.parameters(), model[3].parameters(), expected, strict=True):
        torch.testing.assert_close((p_before - p_after) / 0.1, g, atol=1e-6, rtol=1e-4)


def test_scaling_the_model_loss_leaves_hidden_layers_bit_identical():
    runs = []
    for factor in (1.0, 1000.0):
        model = cnn()
        learner = LocalLearner(model, optimizer=sgd(0.05), loss_fn=lambda out, y, f=factor: f * F.cross_entropy(out, y))
        for step in range(4):
            learner.step(*batch(seed=step))
        runs.append(model)
    hidden = [n for n, _ in runs[0].named_parameters() if not n.startswith("7.")]
    for name in hidden:
        assert torch.equal(runs[0].get_parameter(name), runs[1].get_parameter(name)), name
    assert not torch.equal(runs[0][7].weight, runs[1][7].weight)


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


def test_auto_rule_follows_the_block_kind():
    def rules(learner):
        return {b.name: b.rule.name for b in learner.hidden}

    model = nn.Sequential(cnn()[:7], nn.Linear(54, 20), nn.ReLU(), nn.Linear(20, 10))
    assert rules(LocalLearner(model)) == {"0.0": "learned", "0.4": "learned", "1": "learned"}  # Conv, Linear
    assert rules(LocalLearner(model, lean=True)) == {"0.0": "ce", "0.4": "ce", "1": "ce"}  # lean: no learned P
    pinned = LocalLearner(model, rule="l2", overrides={"0.4": {"rule": "auto"}})
    assert rules(pinned) == {"0.0": "l2", "0.4": "learned", "1": "l2"}
    learner = LocalLearner(model)  # the default trains end to end like an explicit rule="learned"
    learner.step(*batch())
    assert len(learner.learned_projections()) == 3

    from lightning_tpsgd.nn import RNN

    class Recurrent(nn.Module):
        def __init__(self, rnn):
            super().__init__()
            self.rnn, self.head = rnn, nn.Linear(6, 10)

        def forward(self, x):
            return self.head(self.rnn(x)[1][-1])

    assert rules(LocalLearner(Recurrent(RNN(4, 6, batch_first=True)))) == {"rnn": "ce"}  # RNN.tpsgd_auto_rule

    class L1RNN(RNN):
        tpsgd_auto_rule = "l1"  # a LocalModule names its own

    assert rules(LocalLearner(Recurrent(L1RNN(4, 6, batch_first=True)))) == {"rnn": "l1"}


def test_learns_digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16
    y = torch.tensor(data.target)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.LeakyReLU(), nn.Linear(128, 10))
    learner = LocalLearner(model, optimizer=lambda p: torch.optim.Adam(p, lr=3e-3))
    for _ in range(15):
        for i in range(0, 1500, 50):
            learner.step(x[i : i + 50], y[i : i + 50])
    accuracy = (model(x[1500:]).argmax(1) == y[1500:]).float().mean().item()
    assert accuracy > 0.85


@pytest.mark.parametrize("rule", ["l1", "l2", "drtp", "ce", F.smooth_l1_loss])
def test_every_rule_trains_every_block(rule):
    model = cnn()
    before = [p.clone() for p in model.parameters()]
    learner = LocalLearner(model, rule=rule, optimizer=sgd())
    logs = learner.step(*batch())
    assert set(logs) == {"0", "4", "loss"}
    changed = [not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True)]
    assert changed[0] and all(changed[2:])  # changed[1]: a conv bias before batch norm has zero gradient


def test_per_layer_overrides():
    learner = LocalLearner(mlp(), rule="l2", overrides={"3": {"rule": "drtp", "target": "pre"}})
    assert learner.hidden[0].rule.name == "l2"
    assert learner.hidden[1].rule.name == "drtp" and isinstance(learner.hidden[1].tap, nn.Linear)
    with pytest.raises(ValueError, match="not hidden trainable layers"):  # the output layer: known at batch 1
        LocalLearner(mlp(), overrides={"6": {"rule": "l1"}}).step(*batch())
    with pytest.raises(ValueError, match="not hidden trainable layers"):
        LocalLearner(mlp(), overrides={"fc": {"rule": "l1"}})  # no such layer: at once
    with pytest.raises(ValueError, match="unknown keys"):
        LocalLearner(mlp(), overrides={"1": {"lr": 1.0}})


def test_conv_projection_choice():
    learner = LocalLearner(cnn(), conv_projection="naive", projection="binary")
    learner.step(*batch())
    assert learner.hidden[0].projection.name == "binary"
    assert learner.hidden[0].projection.P.shape == (10, 4, 6, 6)


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


# ---------------------------------------------------------------- layer-wise schedule
def test_layerwise_trains_one_block_at_a_time_and_skips_later_blocks():
    model = cnn()
    calls = []
    model[7].register_forward_pre_hook(lambda m, i: calls.append("out"))
    learner = LocalLearner(model, schedule="layerwise", epochs_per_layer=2, optimizer=sgd())
    assert learner.num_stages == 3
    assert [learner.stage_of_epoch(e) for e in range(8)] == [0, 0, 1, 1, 2, 2, 2, 2]
    learner.step(*batch())  # the first batch is traced: its forward runs to the end once
    calls.clear()
    snapshot = [p.clone() for p in model.parameters()]

    learner.set_epoch(2)  # stage 1: block "4" only
    logs = learner.step(*batch())
    assert set(logs) == {"4"} and calls == []
    changed = [not torch.equal(a, b) for a, b in zip(snapshot, model.parameters(), strict=True)]
    assert changed == [False] * 4 + [True, True] + [False, False]

    learner.set_epoch(5)  # output stage
    logs = learner.step(*batch())
    assert set(logs) == {"loss"} and calls == ["out"]


def test_layerwise_needs_epochs_per_layer():
    with pytest.raises(ValueError, match="needs epochs_per_layer"):
        LocalLearner(mlp(), schedule="layerwise")
    with pytest.raises(ValueError, match="3 positive ints"):
        LocalLearner(mlp(), schedule="layerwise", epochs_per_layer=[1, 2])
    with pytest.raises(ValueError, match="only applies to schedule='layerwise'"):
        LocalLearner(mlp(), epochs_per_layer=2)


# ---------------------------------------------------------------- learned projections
def test_learned_projection_starts_at_the_fixed_one_and_trains_with_its_block():
    fixed = LocalLearner(cnn(), rule="ce", seed=2)
    fixed.step(*batch())
    model = cnn()
    learner = LocalLearner(model, rule="learned", seed=2, optimizer=sgd())
    x, y = batch()
    inputs = model[3](model[2](model[1](model[0](x)))).detach()  # what block "4" sees
    learner.step(x, y)
    groups = learner.optimizer.param_groups
    assert len(groups) == 3 and [g["params"] for g in groups[1:]] == [[P] for P in learner.learned_projections()]
    for block, ref in zip(learner.hidden, fixed.hidden, strict=True):
        W, P = block.projection.P, ref.projection.P
        assert isinstance(W, nn.Parameter) and block.params[-1] is W
        assert not torch.equal(W, P / P[0].numel() ** 0.5)  # one SGD step moved it
        torch.testing.assert_close(W + 0.1 * W.grad, P / P[0].numel() ** 0.5)
    # the gradients of block "4" and its readout are those of its own loss on its detached input
    block = learner.hidden[1]
    W0 = (block.projection.P + 0.1 * block.projection.P.grad).detach().requires_grad_()
    before = cnn()
    conv = nn.Sequential(before[4], before[5])
    expected = torch.autograd.grad(readout_ce(conv(inputs), y, W0), [*conv.parameters(), W0])
    for p, g in zip(block.params, expected, strict=True):
        torch.testing.assert_close(p.grad, g, atol=1e-6, rtol=1e-4)


def test_learned_projection_needs_an_optimizer_and_a_stored_projection():
    learner = LocalLearner(mlp(), rule="learned")
    with pytest.raises(RuntimeError, match="attach_optimizer"):
        learner.run(lambda: learner.model(batch()[0]), batch()[1])
    with pytest.raises(ValueError, match="learns its projection"):
        LocalLearner(mlp(), rule="learned", lean=True)
    opt = torch.optim.SGD(learner.model.parameters(), lr=0.1)
    learner.attach_optimizer(opt)
    learner.attach_optimizer(opt)  # idempotent
    learner.run(lambda: learner.model(batch()[0]), batch()[1])
    assert len(opt.param_groups) == 3
    learner.attach_optimizer(opt)  # already there: not added twice
    later = torch.optim.SGD(learner.model.parameters(), lr=0.1)
    learner.attach_optimizer(later)  # attached after the build: gets the existing readouts now
    assert len(later.param_groups) == 3 and len(opt.param_groups) == 3


def test_learned_projection_and_its_optimizer_state_resume_exactly():
    adam = lambda p: torch.optim.Adam(p, lr=1e-2)  # noqa: E731
    reference = LocalLearner(cnn(), rule="learned", optimizer=adam)
    for step in range(2):
        reference.step(*batch(seed=step))
    state = copy.deepcopy(reference.state_dict())  # the optimizer's state_dict holds its live tensors
    assert isinstance(state["projections"]["0"], torch.Tensor) and not state["projections"]["0"].requires_grad
    resumed_model = cnn()
    resumed_model.load_state_dict(reference.model.state_dict())
    resumed = LocalLearner(resumed_model, rule="learned", optimizer=adam)
    resumed.load_state_dict(state)  # builds the readouts now, so the optimizer state fits
    assert len(resumed.optimizer.param_groups) == 3
    for step in range(2, 4):
        reference.step(*batch(seed=step))
        resumed.step(*batch(seed=step))
    for a, b in zip(reference.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(reference.learned_projections(), resumed.learned_projections(), strict=True):
        assert torch.equal(a, b)


def test_layerwise_schedule_freezes_learned_projections():
    learner = LocalLearner(mlp(), rule="learned", schedule="layerwise", epochs_per_layer=1, optimizer=sgd())
    learner.step(*batch())
    assert len(learner.learned_projections()) == 1  # block "3" has not run yet
    learner.set_epoch(1)
    assert not learner.learned_projections()[0].requires_grad
    learner.step(*batch())
    first, second = learner.learned_projections()
    assert second.requires_grad and first.grad is None


# ---------------------------------------------------------------- state
def test_state_dict_restores_projections_before_and_after_build():
    learner = LocalLearner(cnn(), rule="ce", seed=3)  # fixed projections: they stay equal across steps
    learner.step(*batch())
    state = learner.state_dict()
    assert set(state["projections"]) == {"0", "4"}

    fresh = LocalLearner(cnn(), rule="ce", seed=3)  # unbuilt: projections wait for the first batch
    fresh.load_state_dict(state)
    fresh.step(*batch())
    for name in ("0", "4"):
        assert torch.equal(fresh.state_dict()["projections"][name], state["projections"][name])
    with pytest.raises(ValueError, match="seed=3 but this learner has seed=4"):
        LocalLearner(cnn(), seed=4).load_state_dict(state)


def test_projections_are_seeded_and_independent_of_global_rng():
    def projection(seed, global_seed):
        torch.manual_seed(global_seed)
        learner = LocalLearner(cnn(), seed=seed)
        learner.step(*batch())
        return learner.hidden[0].projection.P

    assert torch.equal(projection(1, 0), projection(1, 99))
    assert not torch.equal(projection(1, 0), projection(2, 0))


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("labels", "error", "match"),
    [
        (torch.rand(8), TypeError, "integer class indices"),
        (torch.full((8,), 10), ValueError, r"Labels must lie in \[0, 10\)"),
        (torch.zeros(8, 10, dtype=torch.long), ValueError, r"shape \(B,\)"),
        ([1, 2], TypeError, "must be a tensor"),
    ],
)
def test_bad_labels(labels, error, match):
    learner = LocalLearner(mlp())
    with pytest.raises(error, match=match):
        learner.step(batch()[0], labels)


def test_out_of_range_labels_name_the_batch_and_only_the_fixes_that_apply():
    learner = LocalLearner(mlp())
    with pytest.raises(ValueError) as info:
        learner.run(lambda: None, torch.tensor([0, 3, 11]), batch=7)
    message = str(info.value)
    assert "those of batch 7 lie in [0, 11]" in message and "fix them in the data" in message
    assert "12 or more classes" in message and "set num_classes to match" in message
    with pytest.raises(ValueError) as info:  # -1 is never a class: only the labels can be wrong
        learner.step(batch()[0], torch.tensor([-1, 0, 1, 2, 3, 4, 5, 6]))
    assert "those of this batch lie in [-1, 6]" in str(info.value) and "or more classes" not in str(info.value)


def test_out_of_range_labels_after_the_first_step_are_still_named():
    """Only the first step reads the labels (no host synchronisation later); a later bad batch fails in the
    indexing ops, and that error is turned into the named one."""
    learner = LocalLearner(mlp(), optimizer=sgd())
    x, y = batch()
    learner.step(x, y)
    with pytest.raises(ValueError, match=r"those of this batch lie in \[0, 10\].*11 or more classes") as info:
        learner.step(x, torch.tensor([0, 1, 2, 3, 4, 5, 6, 10]))
    assert isinstance(info.value.__cause__, (IndexError, RuntimeError))


def test_num_classes_below_the_output_size_is_allowed():
    assert LocalLearner(mlp(), num_classes=5).num_classes == 5  # e.g. a 10-output head on 5-class data


def test_non_finite_local_loss_names_the_block():
    learner = LocalLearner(mlp())
    x, y = batch()
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="Local loss of block '1' is nan"):
        learner.step(x, y)


def test_more_classes_than_the_output_layer_has_outputs():
    match = r"num_classes=20 but the output layer '6' \(Linear\) has 10 outputs.*Leave num_classes unset"
    learner = LocalLearner(mlp(), num_classes=20)  # the output layer is the last one called: known at batch 1
    with pytest.raises(ValueError, match=match):
        learner.step(*batch())
    with pytest.raises(ValueError, match=match):  # named output layers: at once
        LocalLearner(mlp(), num_classes=20, output_layers=["6"])


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


def test_close_removes_hooks_and_unfreezes():
    model = cnn()
    learner = LocalLearner(model, schedule="layerwise", epochs_per_layer=1)
    assert not model[7].weight.requires_grad
    learner.close()
    assert all(p.requires_grad for p in model.parameters())
    x, y = batch()
    with learner.local_training(y):
        out = model(x)
    out.sum().backward()
    assert model[0].weight.grad is not None  # plain backpropagation again


@pytest.mark.parametrize(
    "activation", [nn.LeakyReLU(0.1), nn.ReLU(), nn.LeakyReLU(0.1, inplace=True), nn.Tanh()], ids=repr
)
@pytest.mark.parametrize("rule", ["l2", "ce"])
def test_local_gradients_equal_autograd_of_the_local_loss(activation, rule):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), activation, nn.Flatten(), nn.Linear(3 * 6 * 6, 10))
    learner = LocalLearner(model, rule=rule)
    x, y = batch()
    with learner.local_training(y):
        model(x)
    got = learner._pending[0]
    P = learner.hidden[0].projection.P
    h = model[1](model[0](x))
    expected = torch.autograd.grad(learner.hidden[0].rule.projected_loss(h, y, P), list(model[0].parameters()))
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------- lean-memory mode
@pytest.mark.parametrize("rule", ["l2", "ce", "l1", "drtp"])
@pytest.mark.parametrize(
    "layers",
    [
        lambda: [nn.Conv2d(1, 3, 3, padding=1, stride=2), nn.LeakyReLU(0.1), nn.Flatten(), nn.Linear(48, 10)],
        lambda: [nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)],
        lambda: [nn.Conv1d(8, 4, 3), nn.Flatten(), nn.Linear(24, 10)],
    ],
    ids=["conv2d-leaky", "linear-relu", "conv1d-no-activation"],
)
@pytest.mark.parametrize("slice_bytes", [None, 1], ids=["one-slice", "five-slices"])
def test_lean_mode_gives_the_same_gradients_without_a_graph(rule, layers, slice_bytes, monkeypatch):
    if slice_bytes is not None:  # slices of an eighth of the batch (rounded up: 2 of 10 samples)
        monkeypatch.setattr(kernels, "LEAN_SLICE_BYTES", slice_bytes)
    x, y = batch(n=10, shape=(1, 8, 8))
    if isinstance(layers()[0], nn.Conv1d):
        x = x.view(10, 8, 8)
    grads = []
    for lean in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(*layers())
        learner = LocalLearner(model, rule=rule, lean=lean)
        with learner.local_training(y):  # the traced first batch always builds graphs
            model(x)
        learner.discard()
        with learner.local_training(y):
            out = model(x)
        grads.append(learner._pending[0])
        if lean:
            assert learner.state_dict()["projections"] == {}  # regenerated from the seed, never stored
            assert learner.hidden[0].projection.P is None
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert out.requires_grad  # the output layer still trains by backpropagation of the model's loss


def test_lean_mode_falls_back_to_autograd_for_other_blocks():
    learner = LocalLearner(cnn(), lean=True)  # block 0 has a batch norm between conv and activation
    logs = learner.step(*batch())
    assert set(logs) == {"0", "4", "loss"}
    assert [_explicit_grad_ok(b) for b in learner.hidden] == [False, True]  # only block "4" builds no graph


def test_lean_mode_restores_grad_mode_after_an_error():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 10))
    learner = LocalLearner(model, lean=True)
    x, y = batch()
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError):
        learner.step(x, y)
    assert torch.is_grad_enabled()


# ---------------------------------------------------------------- no host synchronisation, fused kernels
def _aten_counts(fn, steps=2):
    """aten ops dispatched by ``fn()`` per call, by name (after two warm-up calls)."""
    from torch.profiler import ProfilerActivity, profile

    fn(), fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
    counts: dict[str, float] = {}
    for event in prof.events():
        if event.name.startswith("aten::"):
            counts[event.name] = counts.get(event.name, 0) + 1 / steps
    return counts


def _host_reads(counts):
    return counts.get("aten::_local_scalar_dense", 0) + counts.get("aten::item", 0)


@pytest.mark.parametrize("validate", [False, True])
def test_a_steady_step_reads_nothing_from_the_device(validate):
    """SGD reads no scalar either, so every host read would come from the engine; ``validate`` reads only every
    ``check_every`` steps (here never inside the profiled steps)."""
    learner = LocalLearner(cnn(), validate=validate, check_every=1000, optimizer=sgd())
    x, y = batch()
    assert _host_reads(_aten_counts(lambda: learner.step(x, y))) == 0


def test_step_returns_device_tensors():
    logs = LocalLearner(mlp(), optimizer=sgd()).step(*batch())
    assert set(logs) == {"1", "3", "loss"} and all(isinstance(v, torch.Tensor) and v.ndim == 0 for v in logs.values())


def test_deferred_checks_catch_a_non_finite_loss_after_the_first_step():
    learner = LocalLearner(mlp(), check_every=2, optimizer=sgd())
    x, y = batch()
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    learner.step(x, y)
    learner.step(bad, y)  # not read yet: no stall on this step
    with pytest.raises(FloatingPointError, match=r"Local loss of block '1' is nan \(by step 2\)"):
        learner.step(x, y)  # the copy started after step 2 is read here
    learner = LocalLearner(mlp(), check_every=100, optimizer=sgd())
    learner.step(x, y)
    learner.step(bad, y)
    with pytest.raises(FloatingPointError, match="Local loss of block '1' is nan"):
        learner.flush_checks()


def test_validate_false_skips_the_checks():
    learner = LocalLearner(mlp(), validate=False, optimizer=sgd())
    x, y = batch()
    learner.step(x, y)
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    learner.step(bad, y)
    learner.flush_checks()  # nothing was checked, nothing to raise


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["ce", "l2"])
def test_compiled_local_gradient_matches_the_eager_one(rule):
    """``compile=True`` fuses loss, gradient, scale and activation derivative; the gradients stay the same."""
    grads = []
    for compiled in (False, True):
        model = cnn()
        learner = LocalLearner(model, rule=rule, compile=compiled, optimizer=sgd(lr=0.0))
        learner.step(*batch())
        grads.append([p.grad.clone() for p in model.parameters()])
    for eager, fused in zip(*grads, strict=True):
        torch.testing.assert_close(fused, eager, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_compiled_step_dispatches_no_more_ops_than_backprop():
    """The CPU proxy for kernel launches: aten ops per training step, tpSGD (``compile=True``) vs backprop."""
    from zoo import create_model

    x = torch.randn(16, 3, 32, 32)
    y = torch.randint(0, 10, (16,))
    model = create_model("convnet4", num_classes=10, in_chans=3, input_size=32, channels=8)
    bp_model = copy.deepcopy(model)
    optimizer = torch.optim.SGD(bp_model.parameters(), lr=0.01)

    def bp_step():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(bp_model(x), y).backward()
        optimizer.step()

    # rule "ce": compile fuses closed-form local gradients (the default's learned readouts train by autograd)
    learner = LocalLearner(model, rule="ce", compile=True, validate=False, optimizer=sgd(0.01))
    ours = sum(_aten_counts(lambda: learner.step(x, y)).values())
    theirs = sum(_aten_counts(bp_step).values())
    assert ours <= 1.1 * theirs, (ours, theirs)


def test_cuda_graph_needs_cuda_tensors_and_a_capturable_optimizer():
    with pytest.raises(ValueError, match="capturable=True"):
        LocalLearner(mlp(), cuda_graph=True, optimizer=lambda p: torch.optim.Adam(p, capturable=False)).step(*batch())
    with pytest.raises(ValueError, match="cuda_graph=True captures the step on a CUDA device"):
        LocalLearner(mlp(), cuda_graph=True).step(*batch())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_steps_match_eager_steps():
    x, y = (t.cuda() for t in batch(n=16))
    params = []
    for graphed in (False, True):
        model = cnn().cuda()
        learner = LocalLearner(model, cuda_graph=graphed, optimizer=lambda p: torch.optim.SGD(p, lr=0.05))
        for _ in range(6):  # three warm-up steps, the capture, two replays
            logs = learner.step(x, y)
        params.append([p.detach().clone() for p in model.parameters()])
        assert set(logs) == {"0", "4", "loss"}
    for eager, replayed in zip(*params, strict=True):
        torch.testing.assert_close(replayed, eager, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- blocks from the call order (issue 18)
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
    for block, h in zip(learner.hidden, _post_activation(model, x), strict=True):
        expected = torch.autograd.grad(tpsgd_l2(h, block.projection.P[y]), list(block.layer.parameters()))
        for g, e in zip(learner._pending[block.index], expected, strict=True):
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
    for block, h in ((c1, h1), (c2, h2)):
        expected = torch.autograd.grad(tpsgd_l2(h, block.projection.P[y]), list(block.layer.parameters()))
        for g, e in zip(learner._pending[block.index], expected, strict=True):
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


class _DevicesOfOps(TorchDispatchMode):
    """Records the device of every tensor an aten op returns."""

    def __init__(self):
        super().__init__()
        self.devices = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        self.devices.update((o.device.type, func.__name__) for o in outs if isinstance(o, torch.Tensor))
        return out


@pytest.mark.parametrize("projection", ["filter", "normal", "uniform", "binary", "orthogonal"])
def test_lean_mode_draws_each_projection_on_the_block_device_at_each_use(projection):
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10)).to("meta")
    conv_projection = projection if projection == "filter" else "naive"
    learner = LocalLearner(
        model,
        lean=True,
        projection=projection if projection != "filter" else "uniform",
        conv_projection=conv_projection,
    )
    block, h = learner.hidden[0], torch.empty(8, 4, 6, 6, device="meta")
    for _ in range(2):
        with _DevicesOfOps() as ops:
            P = learner._store.of(block, h, True)
        assert P.device.type == "meta" and P.shape == (10, 4, 6, 6)
        assert {device for device, _ in ops.devices} == {"meta"}, ops.devices  # no CPU draw, no copy
        assert block.projection.P is None  # not stored


def test_lean_and_default_modes_draw_the_same_projections():
    Ps = []
    for lean in (False, True):
        learner = LocalLearner(cnn(), lean=lean, seed=5, rule="ce")  # what "auto" picks in lean mode
        Ps.append(learner._store.of(learner.hidden[1], torch.empty(8, 6, 3, 3), True))
    assert torch.equal(*Ps)


def test_lean_mode_keeps_a_checkpoint_projection_the_seed_does_not_give():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    default = LocalLearner(copy.deepcopy(model), optimizer=sgd(), rule="ce")  # lean mode's rule under "auto"
    default.step(*batch())
    state = default.state_dict()
    lean = LocalLearner(copy.deepcopy(model), optimizer=sgd(), lean=True)
    lean.load_state_dict(state)  # reproducible from the seed: not kept
    lean.step(*batch())
    assert lean.hidden[0].projection.P is None and lean.state_dict()["projections"] == {}

    old = {**state, "projections": {"1": torch.randn(10, 16)}}  # as a checkpoint of version 0.1 would hold
    lean = LocalLearner(copy.deepcopy(model), optimizer=sgd(), lean=True)
    lean.load_state_dict(old)
    with pytest.warns(UserWarning, match="not the one the seed gives"):
        lean.step(*batch())
    lean.step(*batch(seed=1))
    assert torch.equal(lean.hidden[0].projection.P, old["projections"]["1"])
    assert torch.equal(lean.state_dict()["projections"]["1"], old["projections"]["1"])


class _Guarded(nn.Module):
    """A forward with its own error handling around the layers."""

    def __init__(self, swallow: bool):
        super().__init__()
        self.net, self.swallow, self.cleanups = mlp(), swallow, 0

    def forward(self, x):
        try:
            return self.net(x)
        except Exception:
            self.cleanups += 1
            if self.swallow:
                return None
            raise


def test_the_layerwise_stop_runs_the_forwards_cleanup_and_is_caught_by_the_engine():
    model = _Guarded(swallow=False)
    learner = LocalLearner(model, schedule="layerwise", epochs_per_layer=1, optimizer=sgd())
    learner.step(*batch())  # the traced batch runs the whole forward
    logs = learner.step(*batch())
    assert learner.stopped and set(logs) == {"net.1"} and model.cleanups == 1


def test_a_forward_that_swallows_the_layerwise_stop_is_an_error():
    learner = LocalLearner(_Guarded(swallow=True), schedule="layerwise", epochs_per_layer=1, optimizer=sgd())
    learner.step(*batch())
    with pytest.raises(RuntimeError, match="caught the engine's StopForward.*re-raise"):
        learner.step(*batch())
