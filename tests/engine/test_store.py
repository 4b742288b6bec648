"""lightning_tpsgd.engine.store: projections built from the seed, regenerated in lean mode, restored."""

import copy

import pytest
import torch
from _nets import batch, cnn, sgd
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_tpsgd import LocalLearner
from lightning_tpsgd.engine.store import ProjectionStore


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
        learner = LocalLearner(cnn(), rule="ce", seed=seed)
        learner.step(*batch())
        return learner.hidden[0].projection.P

    assert torch.equal(projection(1, 0), projection(1, 99))
    assert not torch.equal(projection(1, 0), projection(2, 0))


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
    store = ProjectionStore(learner.seed, lean=True)
    for _ in range(2):
        with _DevicesOfOps() as ops:
            P = store.of(block, h, validate=True)
        assert P.device.type == "meta" and P.shape == (10, 4, 6, 6)
        assert {device for device, _ in ops.devices} == {"meta"}, ops.devices  # no CPU draw, no copy
        assert block.projection.P is None  # not stored


def test_lean_and_default_modes_draw_the_same_projections():
    Ps = []
    for lean in (False, True):
        learner = LocalLearner(cnn(), lean=lean, seed=5, rule="ce")  # what "auto" picks in lean mode
        store = ProjectionStore(learner.seed, lean=lean)
        Ps.append(store.of(learner.hidden[1], torch.empty(8, 6, 3, 3), validate=True))
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


def test_readout_lr_scales_a_learned_readout_by_its_block_kind():
    """``readout_lr="auto"``: a Linear block's readout learns at 3× its block's rate, a Conv block's at 1×;
    a number applies to every block."""
    from lightning_tpsgd.engine.store import readout_lr

    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 16), nn.ReLU(), nn.Linear(16, 10)
    )
    for option, conv, linear in (("auto", 1.0, 3.0), (0.5, 0.5, 0.5)):
        learner = LocalLearner(model, readout_lr=option, optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
        learner.step(torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,)))
        assert [readout_lr(b, option) for b in learner.hidden] == [conv, linear]
        assert [g["lr"] for g in learner.optimizer.param_groups[1:]] == pytest.approx([0.1 * conv, 0.1 * linear])
