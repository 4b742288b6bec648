"""lightning_tpsgd.engine.learner: LocalLearner end to end (rules, learned projections, step, close)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from _nets import aten_counts, batch, cnn, mlp, sgd
from torch import nn

from lightning_tpsgd import LocalLearner
from lightning_tpsgd.engine.store import ProjectionStore
from lightning_tpsgd.functional import readout_ce, tpsgd_l2
from lightning_tpsgd.projections import create_projection
from lightning_tpsgd.rules import LearnedCE


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


@pytest.mark.parametrize("init", ["zeros", "projection"])
def test_learned_projection_starts_at_zero_or_the_fixed_one_and_trains_with_its_block(init):
    fixed = LocalLearner(cnn(), rule="ce", seed=2)
    fixed.step(*batch())
    model = cnn()
    learner = LocalLearner(model, rule=LearnedCE(init=init), seed=2, optimizer=sgd())
    x, y = batch()
    inputs = model[3](model[2](model[1](model[0](x)))).detach()  # what block "4" sees
    learner.step(x, y)
    groups = learner.optimizer.param_groups
    assert len(groups) == 3 and [g["params"] for g in groups[1:]] == [[P] for P in learner.learned_projections()]
    for block in learner.hidden:
        W = block.projection.P
        assert isinstance(W, nn.Parameter) and block.params[-1] is W
    # block "0"'s readout reads the map after its MaxPool (rule ce meets the activation's); block "4"'s starts at
    # zero or at the fixed projection, and one SGD step moved it
    assert learner.hidden[0].projection.P.shape == (10, 4, 3, 3) and isinstance(learner.hidden[0].tap, nn.MaxPool2d)
    W, P = learner.hidden[1].projection.P, fixed.hidden[1].projection.P
    start = torch.zeros_like(P) if init == "zeros" else P / P[0].numel() ** 0.5
    assert not torch.equal(W, start)
    torch.testing.assert_close(W + 0.1 * W.grad, start)
    first = learner.hidden[0].projection
    fixed_first = create_projection(first.name, 10, 1.0)  # the fixed projection of the pooled map, from the seed
    fixed_first.build(tuple(first.P.shape[1:]), ProjectionStore(2, False, "auto").key("0"), x.device, torch.float32)
    P = fixed_first.P
    torch.testing.assert_close(first.P + 0.1 * first.P.grad, P * 0 if init == "zeros" else P / P[0].numel() ** 0.5)
    # the gradients of block "4" and its readout are those of its own loss on its detached input
    block = learner.hidden[1]
    W0 = (block.projection.P + 0.1 * block.projection.P.grad).detach().requires_grad_()
    before = cnn()
    conv = nn.Sequential(before[4], before[5])
    expected = torch.autograd.grad(readout_ce(conv(inputs), y, W0), [*conv.parameters(), W0])
    for p, g in zip(block.params, expected, strict=True):
        torch.testing.assert_close(p.grad, g, atol=1e-6, rtol=1e-4)
    # a zero-started readout gives its block no gradient on the first step; the second step trains both
    assert (block.params[0].grad.abs().max() == 0) == (init == "zeros")
    learner.step(x, y)
    assert block.params[0].grad.abs().max() > 0


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


def test_num_classes_below_the_output_size_is_allowed():
    assert LocalLearner(mlp(), num_classes=5).num_classes == 5  # e.g. a 10-output head on 5-class data


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


def test_step_returns_device_tensors():
    logs = LocalLearner(mlp(), optimizer=sgd()).step(*batch())
    assert set(logs) == {"1", "3", "loss"} and all(isinstance(v, torch.Tensor) and v.ndim == 0 for v in logs.values())


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["ce", "auto"])
def test_compiled_step_dispatches_no_more_ops_than_backprop(rule):
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

    # compile fuses each block's closed-form local gradient ("auto": learned readouts, with their own gradient)
    torch.compiler.reset()  # the variants other tests compiled count towards the compiler's limit per function
    learner = LocalLearner(model, rule=rule, compile=True, validate=False, optimizer=sgd(0.01))
    ours = sum(aten_counts(lambda: learner.step(x, y)).values())
    theirs = sum(aten_counts(bp_step).values())
    assert ours <= 1.1 * theirs, (ours, theirs)
