"""Tests for zoo/optimizers.py: the optimizers and schedules of the zoo's LightningModules, by name."""

from __future__ import annotations

import math

import pytest
import torch

from zoo.optimizers import (
    check_optimizer_args,
    create_optimizer,
    create_scheduler,
    list_optimizers,
    list_schedulers,
)


def _params() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.zeros(3))]


@pytest.mark.parametrize(
    ("name", "cls"), [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD)]
)
def test_create_optimizer(name, cls):
    opt = create_optimizer(name, _params(), lr=0.5, weight_decay=0.1, momentum=0.8)
    assert type(opt) is cls
    group = opt.param_groups[0]
    assert group["lr"] == 0.5 and group["weight_decay"] == 0.1
    if name == "sgd":
        assert group["momentum"] == 0.8


def test_parameter_groups_keep_their_own_rate():
    opt = create_optimizer("adam", [{"params": _params()}, {"params": _params(), "lr": 0.01}], lr=0.5)
    assert [g["lr"] for g in opt.param_groups] == [0.5, 0.01]


def test_cosine_schedule_anneals_over_max_epochs():
    opt = create_optimizer("sgd", _params(), lr=1.0)
    scheduler = create_scheduler("cosine", opt, max_epochs=4)
    assert isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingLR) and scheduler.T_max == 4
    assert create_scheduler(None, opt, max_epochs=None) is None


def test_names_are_listed():
    assert list_optimizers() == ["adam", "adamw", "sgd"] and list_schedulers() == ["cosine"]


BAD = [
    (dict(optimizer="rmsprop"), r"Unknown optimizer 'rmsprop'. Valid names: adam, adamw, sgd"),
    (dict(scheduler="step"), r"Unknown scheduler 'step'. Valid names: cosine, or None"),
    (dict(lr=-1.0), r"Invalid learning rate: -1.0"),
    (dict(lr=math.nan), r"Invalid learning rate: nan. It must be a finite number >= 0"),
    (dict(weight_decay=-0.1), r"Invalid weight_decay: -0.1"),
    (dict(momentum=-0.5), r"Invalid momentum: -0.5"),
]


@pytest.mark.parametrize(("kwargs", "match"), BAD)
def test_bad_arguments(kwargs, match):
    args = {"optimizer": "adam", "scheduler": None, "lr": 1e-3, "weight_decay": 0.0, "momentum": 0.9, **kwargs}
    with pytest.raises(ValueError, match=match):
        check_optimizer_args(args.pop("optimizer"), args.pop("scheduler"), **args)


def test_a_schedule_needs_max_epochs():
    opt = create_optimizer("adam", _params(), lr=1.0)
    with pytest.raises(ValueError, match=r"Set Trainer\(max_epochs=N\)"):
        create_scheduler("cosine", opt, max_epochs=None)
    with pytest.raises(ValueError, match=r"Unknown optimizer 'lion'"):
        create_optimizer("lion", _params(), lr=1.0)
