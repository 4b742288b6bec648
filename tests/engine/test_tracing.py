"""lightning_tpsgd.engine.tracing: the first training forward finds the blocks in call order and trains them."""

import pytest
import torch
from torch import nn

from lightning_tpsgd import find_blocks
from lightning_tpsgd.config import TPSGDConfig
from lightning_tpsgd.engine.configure import configure_block
from lightning_tpsgd.engine.schedule import Schedule
from lightning_tpsgd.engine.tracing import Tracer


class HeadFirst(nn.Module):
    """The head registered before the hidden layers, called after them."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Linear(8, 3)
        self.fc1, self.fc2 = nn.Linear(5, 16), nn.Linear(16, 8)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _tracer(schedule=None):
    model = HeadFirst()
    blocks = find_blocks(model, strict=False)  # registration order: "head" first
    updates = []
    tracer = Tracer(schedule or Schedule("simultaneous", None, 3), lambda b, h: updates.append((b.name, h)), False)

    def start(immediate=True):
        configure = lambda b: configure_block(b, TPSGDConfig(rule="l2"), num_classes=3)  # noqa: E731
        tracer.start(model, blocks, configure, output_layers=None, blockwise=False, immediate=immediate)

    return model, blocks, tracer, updates, start


def test_the_trace_finds_the_call_order_and_trains_each_hidden_block_on_the_way():
    model, blocks, tracer, updates, start = _tracer()
    assert tracer.due
    start()
    out = model(torch.rand(4, 5))
    assert [name for name, _ in updates] == ["fc1", "fc2"] and all(h.requires_grad for _, h in updates)
    trace, (found, outputs) = tracer.finish()
    assert [b.name for b in found] == ["fc1", "fc2", "head"] and [b.index for b in found] == [0, 1, 2]
    assert outputs == ["head"] and [b.is_output for b in found] == [False, False, True]
    trace.check_output(found, out, outputs)  # the loss reaches the hidden blocks only through the head
    tracer.attach([])
    assert not tracer.due and tracer.trace is None


def test_updates_can_wait_for_the_end_of_the_forward():
    model, blocks, tracer, updates, start = _tracer()
    start(immediate=False)
    model(torch.rand(4, 5))
    assert updates == []
    _, (found, _) = tracer.finish()
    tracer.train_deferred({found[1].index})  # e.g. a layer-wise stage trains the second block only
    assert [name for name, _ in updates] == ["fc2"]


def test_a_layerwise_stage_trains_its_block_only():
    schedule = Schedule("layerwise", 1, 3)
    schedule.set_epoch(1, [], [])
    model, blocks, tracer, updates, start = _tracer(schedule)
    start()
    model(torch.rand(4, 5))
    assert [name for name, _ in updates] == ["fc2"]


def test_an_aborted_trace_leaves_the_provisional_plan_and_traces_again():
    model, blocks, tracer, updates, start = _tracer()
    start()
    model.fc2.register_forward_hook(lambda m, i, o: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        model(torch.rand(4, 5))
    tracer.abort()
    assert [b.index for b in blocks] == [0, 1, 2] and blocks[0].name == "head"  # registration order again
    assert tracer.due and tracer.trace is None


def test_close_removes_every_hook():
    model, blocks, tracer, updates, start = _tracer()
    start()
    tracer.close()
    model(torch.rand(4, 5))
    assert updates == [] and not tracer.due
