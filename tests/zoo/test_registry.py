"""Tests for zoo/_registry.py: register_model, create_model, list_models and is_model, as in timm."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import zoo
from zoo import create_model, is_model, list_models

ROOT = Path(__file__).resolve().parents[2]


def test_every_registered_model_is_exported():
    assert set(list_models()) <= set(zoo.__all__)


def test_create_model_drops_none_kwargs():
    model = create_model("cnn2", filters=None, input_size=None, in_chans=None)
    assert model[0].out_channels == 32 and model.default_cfg["input_size"] == (1, 28, 28)


def test_unknown_model_lists_valid_names():
    with pytest.raises(
        ValueError, match=re.escape("Unknown model 'cnn3'. Did you mean 'cnn2'? Valid names: birnn1, cnn2,")
    ):
        create_model("cnn3")
    with pytest.raises(ValueError, match="Valid names: birnn1, cnn2, convgrid, convnet4, mlp, mlp2, resnet20, "):
        create_model("vgg16")


def test_bad_kwargs_list_the_accepted_ones():
    with pytest.raises(TypeError, match=r"Invalid arguments for model 'cnn2'.*accepts: num_classes"):
        create_model("cnn2", filtres=3)


def test_list_models_and_is_model():
    assert list_models("cnn*") == ["cnn2"]
    assert list_models("mlp*") == ["mlp", "mlp2"]
    assert list_models("nothing*") == []
    assert is_model("vgg11") and not is_model("vgg16")


def test_register_model():
    """Registering changes the process-wide registry, so it runs in a fresh interpreter."""
    code = textwrap.dedent(
        """
        import sys, warnings
        from torch import nn
        import zoo
        from zoo import create_model, is_model, list_models, register_model

        module = sys.modules[__name__]

        @register_model
        def tiny(num_classes: int = 10) -> nn.Module:
            return nn.Linear(2, num_classes)

        assert is_model("tiny") and "tiny" in list_models("t*") and module.__all__ == ["tiny"]
        assert create_model("tiny", num_classes=3).out_features == 3

        def cnn2() -> nn.Module:  # same name as zoo.paper.cnn2, different module
            return nn.Identity()

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            register_model(cnn2)
        assert any("Model 'cnn2' from zoo.paper is overwritten" in str(w.message) for w in caught), caught
        assert isinstance(create_model("cnn2"), nn.Identity)
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
