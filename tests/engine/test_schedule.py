"""lightning_tpsgd.engine.schedule: the layer-wise stages, their freezing, and the stop after a stage's block."""

import pytest
import torch
from _nets import batch, cnn, mlp, sgd
from torch import nn

from lightning_tpsgd import LocalLearner


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
    learner.step(*batch())  # its first step moves only its zero-started readout
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


def test_layerwise_schedule_freezes_learned_projections():
    learner = LocalLearner(mlp(), rule="learned", schedule="layerwise", epochs_per_layer=1, optimizer=sgd())
    learner.step(*batch())
    assert len(learner.learned_projections()) == 1  # block "3" has not run yet
    learner.set_epoch(1)
    assert not learner.learned_projections()[0].requires_grad
    learner.step(*batch())
    first, second = learner.learned_projections()
    assert second.requires_grad and first.grad is None


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
