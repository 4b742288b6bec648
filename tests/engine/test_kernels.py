"""lightning_tpsgd.engine.kernels: the local gradient of every path equals autograd of the local loss."""

import pytest
import torch
import torch.nn.functional as F
from _nets import batch, cnn, local_grads, sgd
from torch import nn

from lightning_tpsgd import LocalLearner
from lightning_tpsgd.engine import kernels
from lightning_tpsgd.engine.kernels import local_grad
from lightning_tpsgd.rules import CallableRule, create_rule


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
    got = local_grads(learner)[0]
    P = learner.hidden[0].projection.P
    h = model[1](model[0](x))
    expected = torch.autograd.grad(learner.hidden[0].rule.projected_loss(h, y, P), list(model[0].parameters()))
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-7)


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
        grads.append(local_grads(learner)[0])
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
    assert [kernels.explicit_grad_ok(b) for b in learner.hidden] == [False, True]  # only block "4" builds no graph


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["ce", "l2", "learned"])
def test_compiled_local_gradient_matches_the_eager_one(rule):
    """``compile=True`` fuses loss, gradient, scale and activation derivative; the gradients stay the same."""
    grads = []
    for compiled in (False, True):
        model = cnn()
        learner = LocalLearner(model, rule=rule, compile=compiled, optimizer=sgd(lr=0.0))
        learner.step(*batch())
        grads.append([p.grad.clone() for p in [*model.parameters(), *learner.learned_projections()]])
    assert len(grads[0]) == len(list(cnn().parameters())) + (2 if rule == "learned" else 0)
    for eager, fused in zip(*grads, strict=True):
        torch.testing.assert_close(fused, eager, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_compiled_default_rule_trains_as_the_eager_one():
    """The default rule (``learned`` readouts) with ``compile=True``: parameters and readouts after a few steps."""
    trained = []
    torch.compiler.reset()  # the variants other tests compiled count towards the compiler's limit per function
    for compiled in (False, True):
        model = cnn()
        learner = LocalLearner(model, compile=compiled, validate=False, optimizer=sgd(lr=0.1))
        for seed in range(4):
            learner.step(*batch(seed=seed))
        trained.append([p.detach().clone() for p in [*model.parameters(), *learner.learned_projections()]])
    assert len(trained[0]) == len(list(cnn().parameters())) + 2  # two hidden blocks, one readout each
    for eager, fused in zip(*trained, strict=True):
        torch.testing.assert_close(fused, eager, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("slope", [None, 0.0, 0.1])
@pytest.mark.parametrize("into_buffer", [False, True], ids=["new", "out"])
def test_fused_readout_kernel_equals_the_eager_one(slope, into_buffer):
    """``local_grad(..., fused=True)`` for rule ``learned``: the same loss and gradients as the eager closed form."""
    g = torch.Generator().manual_seed(2)
    h, y = F.leaky_relu(torch.randn(6, 3, 4, 4, generator=g), slope or 0.0), torch.randint(0, 5, (6,), generator=g)
    W = (0.1 * torch.randn(5, 3, 4, 4, generator=g)).requires_grad_()
    rule = create_rule("learned")
    steps = []
    for fused in (False, True):
        out = torch.empty_like(h) if into_buffer else None
        steps.append(local_grad(rule, h, y, W, slope=slope, out=out, fused=fused))
        assert not into_buffer or steps[-1].grad.data_ptr() == out.data_ptr()
    eager, fused = steps
    assert eager.scale is None and fused.scale is None
    for a, b in [(eager.loss, fused.loss), (eager.grad, fused.grad), (eager.grad_P, fused.grad_P)]:
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("rule", ["l2", "l1", "ce", "drtp"])
@pytest.mark.parametrize("slope", [None, 0.0, 0.1])
def test_every_kernel_of_the_dispatch_gives_autograds_gradient(rule, slope):
    """local_grad: the closed form (into a buffer or not) and the autograd kernel agree with autograd."""
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(6, 5, generator=g), torch.randint(0, 3, (6,), generator=g)
    P = torch.randn(3, 5, generator=g)
    rule = create_rule(rule)
    leaf = z.clone().requires_grad_()
    h = leaf if slope is None else F.leaky_relu(leaf, slope)
    (expected,) = torch.autograd.grad(rule.projected_loss(h, y, P), leaf)
    h = h.detach()
    for kwargs in ({}, {"out": torch.empty_like(h)}):
        step = local_grad(rule, h, y, P, slope=slope, **kwargs)
        torch.testing.assert_close(step.grad * step.scale, expected)
    autograd = local_grad(CallableRule(lambda out, t: rule.projected_loss(out, y, P)), h, y, P, slope=slope)
    torch.testing.assert_close(autograd.grad, expected)
    assert autograd.scale is None and autograd.grad_P is None


@pytest.mark.parametrize("slope", [None, 0.0, 0.1])
@pytest.mark.parametrize("into_buffer", [False, True], ids=["new", "out"])
def test_learned_readouts_closed_form_gives_autograds_gradients(slope, into_buffer):
    """Rule ``learned``: the closed-form kernel gives autograd's gradient for the block output (through the (leaky)
    ReLU when ``slope`` is given) and for the readout, already scaled; a frozen readout gets none."""
    g = torch.Generator().manual_seed(3)
    z, y = torch.randn(7, 2, 3, 3, generator=g), torch.randint(0, 4, (7,), generator=g)
    W = torch.randn(4, 2, 3, 3, generator=g).requires_grad_()
    rule = create_rule("learned")
    leaf = z.clone().requires_grad_()
    h = leaf if slope is None else F.leaky_relu(leaf, slope)
    loss = rule.projected_loss(h, y, W)
    expected = torch.autograd.grad(loss, [leaf, W])
    out = torch.empty_like(z) if into_buffer else None
    step = local_grad(rule, h.detach(), y, W, slope=slope, out=out)
    assert step.scale is None and (not into_buffer or step.grad.data_ptr() == out.data_ptr())
    torch.testing.assert_close(step.loss, loss.detach())
    torch.testing.assert_close(step.grad, expected[0])
    torch.testing.assert_close(step.grad_P, expected[1])
    assert local_grad(rule, h.detach(), y, W.detach(), slope=slope).grad_P is None


def test_the_target_form_and_a_learned_projection():
    g = torch.Generator().manual_seed(1)
    h, t = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    step = local_grad(create_rule("l2"), h, target=t.clone())
    torch.testing.assert_close(step.grad * step.scale, 2 * (h - t) / h.numel())
    P = torch.randn(3, 6, generator=g).requires_grad_()
    y = torch.tensor([0, 1, 2, 0])
    step = local_grad(create_rule("learned"), h, y, P)
    leaf = h.clone().requires_grad_()
    expected = torch.autograd.grad(create_rule("learned").projected_loss(leaf, y, P), [leaf, P])
    torch.testing.assert_close(step.grad, expected[0])
    torch.testing.assert_close(step.grad_P, expected[1])


def test_the_recurrent_cells_readout_kernel_gives_autograds_gradients():
    """readout_ce_grad_: the summed per-step cross-entropy of a readout per time step, a chunk of steps at once."""
    g = torch.Generator().manual_seed(2)
    h, readout = torch.randn(3, 5, 4, generator=g), torch.randn(3, 6, 4, generator=g)
    y = torch.randint(0, 6, (5,), generator=g)
    grad_h, grad_readout = torch.empty_like(h), torch.ones_like(readout)
    loss = kernels.readout_ce_grad_(h, y, readout, grad_h, grad_readout)
    leaf, W = h.clone().requires_grad_(), readout.clone().requires_grad_()
    expected = sum(F.cross_entropy(leaf[s] @ W[s].T, y) for s in range(3))
    grads = torch.autograd.grad(expected, [leaf, W])
    torch.testing.assert_close(loss, expected.detach())
    torch.testing.assert_close(grad_h, grads[0])
    torch.testing.assert_close(grad_readout, 1 + grads[1])  # added to what was there
