"""lightning_tpsgd.engine.configure: each hidden block's rule, tap and projection from the options."""

import pytest
import torch
from _nets import batch, cnn, mlp
from torch import nn

from lightning_tpsgd import LocalLearner, find_blocks
from lightning_tpsgd.config import TPSGDConfig
from lightning_tpsgd.engine.configure import (
    AUTO_RULES,
    auto_rule,
    check_overrides,
    configure_block,
    configure_blocks,
    may_learn_projection,
)


def _hidden(model):
    blocks = find_blocks(model)
    return blocks, [b for b in blocks if not b.is_output]


def test_configure_blocks_sets_rule_target_tap_and_projection_from_the_options():
    blocks, hidden = _hidden(mlp())
    config = TPSGDConfig(rule="l2", overrides={"3": {"rule": "drtp", "target": "pre", "target_scale": 2.0}})
    configure_blocks(blocks, hidden, config, num_classes=10)
    first, second = hidden
    assert (first.rule.name, first.target, first.target_scale) == ("l2", "post", 1.0)
    assert isinstance(first.tap, nn.LeakyReLU) and first.projection.num_classes == 10
    assert (second.rule.name, second.target, second.target_scale) == ("drtp", "pre", 2.0)
    assert second.tap is second.layer  # "pre": the layer's own output
    assert blocks[-1].rule is None and blocks[-1].projection is None  # the output block has no local target


@pytest.mark.parametrize(("rule", "tap"), [("auto", nn.MaxPool2d), ("learned", nn.MaxPool2d), ("ce", nn.ReLU)])
def test_a_learned_readout_reads_the_block_after_its_pooling(rule, tap):
    """A learned readout reads what the next layer receives (after MaxPool); fixed projections the activation."""
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(0.1),
        nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10),
    )  # fmt: skip
    learner = LocalLearner(model, rule=rule, optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    learner.step(torch.randn(8, 1, 8, 8), torch.arange(8))
    first, second = learner.hidden
    assert isinstance(first.tap, tap)  # not over the dropout after the pooling
    assert isinstance(second.tap, nn.ReLU)  # adaptive (global) pooling is left to the head
    if tap is nn.MaxPool2d:
        assert tuple(learner.learned_projections()[0].shape) == (10, 4, 4, 4)
    learner.close()


def test_auto_resolves_per_block_kind_and_lean_mode():
    blocks, hidden = _hidden(nn.Sequential(cnn()[:7], nn.Linear(54, 20), nn.ReLU(), nn.Linear(20, 10)))
    assert [auto_rule(b, lean=False) for b in hidden] == [AUTO_RULES["conv"], AUTO_RULES["conv"], AUTO_RULES["linear"]]
    assert {auto_rule(b, lean=True) for b in hidden} == {AUTO_RULES["lean"]}


@pytest.mark.parametrize(
    ("options", "learns"),
    [
        ({}, True),  # "auto" picks "learned" for Linear/Conv blocks
        ({"lean": True}, False),
        ({"rule": "l2"}, False),
        ({"rule": "l2", "overrides": {"3": {"rule": "learned"}}}, True),
    ],
)
def test_may_learn_projection(options, learns):
    assert may_learn_projection(TPSGDConfig(**options)) is learns


def test_a_built_projection_is_kept_for_the_same_kind_and_classes():
    blocks, hidden = _hidden(mlp())
    config = TPSGDConfig(rule="l2")
    block = hidden[0]
    configure_block(block, config, num_classes=10)
    block.projection.build((32,), key=0, device=torch.device("cpu"), dtype=torch.float32)
    built = block.projection
    configure_block(block, config, num_classes=10)
    assert block.projection is built
    configure_block(block, config, num_classes=5)  # other classes: a new projection
    assert block.projection is not built and block.projection.num_classes == 5


def test_overrides_must_name_hidden_blocks():
    blocks, hidden = _hidden(mlp())
    check_overrides(TPSGDConfig(overrides={"[13]": {"rule": "l1"}}), hidden)
    with pytest.raises(ValueError, match=r"not hidden trainable layers: \['6'\]. Hidden layers: \['1', '3'\]"):
        check_overrides(TPSGDConfig(overrides={"6": {"rule": "l1"}}), hidden)
    check_overrides(TPSGDConfig(overrides={"6": {"rule": "l1"}}), hidden, candidates=blocks)  # before the trace


def test_a_learned_rule_needs_a_stored_projection():
    blocks, hidden = _hidden(mlp())
    with pytest.raises(ValueError, match="learns its projection"):
        configure_block(hidden[0], TPSGDConfig(rule="learned", lean=True), num_classes=10)


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

    recurrent = LocalLearner(Recurrent(RNN(4, 6, batch_first=True)))
    assert rules(recurrent) == {"rnn": "learned"}  # its tpsgd_auto_rule, with readouts starting at the projection
    assert recurrent.hidden[0].rule.init == "projection" and LocalLearner(model).hidden[0].rule.init == "zeros"
    assert rules(LocalLearner(Recurrent(RNN(4, 6, batch_first=True)), lean=True)) == {"rnn": "ce"}

    class L1RNN(RNN):
        tpsgd_auto_rule = "l1"  # a LocalModule names its own

    assert rules(LocalLearner(Recurrent(L1RNN(4, 6, batch_first=True)))) == {"rnn": "l1"}


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
    assert learner.hidden[0].projection.P.shape == (10, 4, 3, 3)  # a learned readout: after the MaxPool
