"""lightning_tpsgd.engine.checks: label and local-loss checks, and no host reads in a steady step."""

import pytest
import torch
from _nets import aten_counts, batch, cnn, mlp, sgd
from torch import nn

from lightning_tpsgd import LocalLearner


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


def _host_reads(counts):
    return counts.get("aten::_local_scalar_dense", 0) + counts.get("aten::item", 0)


@pytest.mark.parametrize("validate", [False, True])
def test_a_steady_step_reads_nothing_from_the_device(validate):
    """SGD reads no scalar either, so every host read would come from the engine; ``validate`` reads only every
    ``check_every`` steps (here never inside the profiled steps)."""
    learner = LocalLearner(cnn(), validate=validate, check_every=1000, optimizer=sgd())
    x, y = batch()
    assert _host_reads(aten_counts(lambda: learner.step(x, y))) == 0


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


def test_lean_mode_restores_grad_mode_after_an_error():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 10))
    learner = LocalLearner(model, lean=True)
    x, y = batch()
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError):
        learner.step(x, y)
    assert torch.is_grad_enabled()


def test_a_steps_labels_are_range_checked_once_the_classes_are_known():
    from lightning_tpsgd.engine.checks import DeferredChecks

    checks = DeferredChecks(every=1)
    labels = torch.tensor([0, 12])
    checks.start_step(labels, num_classes=10, batch=0, classes_known=False)  # the trace may still change them
    with pytest.raises(ValueError, match=r"lie in \[0, 12\]"):
        checks.start_step(labels, num_classes=10, batch=0)
    with pytest.raises(TypeError, match="integer class indices"):
        checks.start_step(labels.float(), num_classes=10, batch=0, classes_known=False)


def test_the_narrowest_linear_layer_is_the_guess_for_num_classes():
    from lightning_tpsgd import find_blocks
    from lightning_tpsgd.engine.checks import guess_num_classes

    head_first = nn.ModuleDict({"head": nn.Linear(8, 3), "body": nn.Linear(5, 8)})
    assert guess_num_classes(find_blocks(head_first)) == 3
    assert guess_num_classes(find_blocks(nn.Sequential(nn.Conv2d(1, 4, 3)))) is None
