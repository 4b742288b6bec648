"""lightning_tpsgd.engine.forward: the state of a training step and the hooks that end each block."""

import pytest
import torch
from _nets import mlp
from torch import nn

from lightning_tpsgd import find_blocks
from lightning_tpsgd.config import TPSGDConfig
from lightning_tpsgd.engine.configure import configure_blocks
from lightning_tpsgd.engine.forward import BoundaryHooks, StepState, StopForward, local_context, require_graph
from lightning_tpsgd.engine.store import ProjectionStore
from lightning_tpsgd.nn import RNN


def _plan(model):
    blocks = find_blocks(model)
    hidden = [b for b in blocks if not b.is_output]
    configure_blocks(blocks, hidden, TPSGDConfig(rule="l2"), num_classes=10)
    return blocks, hidden


def test_a_step_accumulates_a_block_run_twice_and_commit_writes_and_clears():
    blocks, hidden = _plan(mlp())
    state = StepState()
    state.begin(torch.tensor([1, 2], dtype=torch.int32), batch=3)
    assert state.labels.dtype == torch.long and state.batch == 3
    block = hidden[0]
    ones = [torch.ones_like(p) for p in block.params]
    state.record(block, ones, torch.tensor(1.0))
    state.record(block, [ones[0], None], torch.tensor(2.0))
    assert float(state.losses["1"]) == 3.0
    state.end()
    assert state.labels is None and state.pending  # the gradients wait for the commit
    state.commit(blocks, scale=0.5, first_step=True)
    assert torch.equal(block.params[0].grad, torch.full_like(block.params[0], 1.0))  # (1 + 1) * 0.5
    assert torch.equal(block.params[1].grad, torch.full_like(block.params[1], 0.5))
    assert not state.pending
    state.begin(torch.tensor([0]), batch=None)
    assert state.losses == {}  # a new forward starts without losses


def test_commit_refuses_gradients_the_models_loss_put_into_a_hidden_block():
    blocks, hidden = _plan(mlp())
    state = StepState()
    block = hidden[0]
    state.record(block, [torch.ones_like(p) for p in block.params], torch.tensor(0.0))
    block.params[0].grad = torch.ones_like(block.params[0])
    with pytest.raises(RuntimeError, match="back-propagated into hidden block '1'"):
        state.commit(blocks, scale=None, first_step=True)
    state.commit(blocks, scale=None, first_step=False)  # checked on the first step only


def test_keep_drops_the_other_blocks():
    blocks, hidden = _plan(mlp())
    state = StepState()
    for block in hidden:
        state.record(block, [None] * len(block.params), torch.tensor(1.0))
    state.keep({hidden[1].index}, {hidden[1].name})
    assert list(state.pending) == [hidden[1].index] and list(state.losses) == [hidden[1].name]


def test_boundary_hooks_step_each_hidden_block_and_detach_its_output():
    model = mlp()
    blocks, hidden = _plan(model)
    state, seen, ended = StepState(), [], []
    hooks = BoundaryHooks(state, lambda b, h, z: seen.append((b.name, h)), lambda b, x, h: None, ended.append)
    handles = hooks.attach(blocks, hidden, blockwise=False, explicit=lambda b: False)
    x = torch.rand(4, 1, 8, 8)
    model(x)  # outside a training step: the hooks do nothing
    assert seen == [] and all(p.grad is None for p in model.parameters())
    state.begin(torch.tensor([0, 1, 2, 3]), batch=None)
    out = model(x)
    state.end()
    assert [name for name, _ in seen] == ["1", "3"] and [b.name for b in ended] == ["1", "3"]
    assert all(h.requires_grad for _, h in seen)  # each block's own graph, for its local step
    out.sum().backward()
    assert model[6].weight.grad is not None and model[1].weight.grad is None  # nothing crosses a block
    for handle in handles:
        handle.remove()


def test_a_frozen_block_is_not_stepped_and_a_block_without_graph_is_an_error():
    model = mlp()
    blocks, hidden = _plan(model)
    state, seen = StepState(), []
    hooks = BoundaryHooks(state, lambda b, h, z: seen.append(b.name), lambda b, x, h: None, lambda b: None)
    hooks.attach(blocks, hidden, blockwise=False, explicit=lambda b: False)
    model[1].requires_grad_(False)
    state.begin(torch.tensor([0]), batch=None)
    model(torch.rand(1, 1, 8, 8))
    assert seen == ["3"]
    state.end()
    model[1].requires_grad_(True)
    state.begin(torch.tensor([0]), batch=None)
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"'1' ran under torch.no_grad\(\)"):
        model(torch.rand(1, 1, 8, 8))
    state.end()
    with pytest.raises(RuntimeError, match="no_grad"):
        require_graph(hidden[0], torch.zeros(1))


def test_lean_blocks_run_without_a_graph_and_grad_mode_comes_back():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 10))
    blocks, hidden = _plan(model)
    state, explicit = StepState(), []
    hooks = BoundaryHooks(state, lambda b, h, z: None, lambda b, x, h: explicit.append(h.requires_grad), lambda b: None)
    hooks.attach(blocks, hidden, blockwise=False, explicit=lambda b: not b.is_output)
    state.begin(torch.tensor([0]), batch=None)
    model(torch.rand(1, 1, 8, 8))
    assert explicit == [False] and torch.is_grad_enabled()
    model[2].register_forward_pre_hook(lambda m, i: 1 / 0)  # an error between the pre-hook and the tap
    with pytest.raises(ZeroDivisionError):
        model(torch.rand(1, 1, 8, 8))
    assert not torch.is_grad_enabled()
    state.end()
    assert torch.is_grad_enabled()


def test_a_local_modules_submissions_are_checked():
    rnn = RNN(4, 6, batch_first=True)
    blocks = find_blocks(nn.Sequential(rnn, nn.Linear(6, 3)), strict=False)  # (the RNN's output is a tuple)
    block = blocks[0]
    configure_blocks(blocks, [block], TPSGDConfig(rule="l1"), num_classes=3)
    submitted = []
    context = local_context(block, torch.tensor([0, 2]), 3, ProjectionStore(0, False), lambda *a: submitted.append(a))
    assert context.projection("w", (5, 6)).shape == (3, 5, 6)
    with pytest.raises(ValueError, match="submitted 1 gradients for 4 trainable parameters"):
        context.submit([None], torch.tensor(0.0))
    with pytest.raises(ValueError, match="readout gradients"):
        context.submit([None] * 4, torch.tensor(0.0), {"w": torch.zeros(1)})
    context.submit([None] * 4, torch.tensor(1.0, requires_grad=True))
    ((got_block, grads, loss),) = submitted
    assert got_block is block and grads == [None] * 4 and not loss.requires_grad


def test_stop_forward_is_an_ordinary_exception():
    assert issubclass(StopForward, Exception)
