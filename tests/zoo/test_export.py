"""Tests for zoo/export.py: the ONNX graph of an adaptor (backbone + adaptors) matches PyTorch."""

from __future__ import annotations

import pytest
import torch

from zoo import Adaptor, TimmAdaptor, export_onnx

BACKBONE = "test_efficientnet"
SIZE = 32
C = 3


@pytest.mark.parametrize(
    ("cls", "kwargs"), [(TimmAdaptor, {"taps": (2, 3, 4)}), (TimmAdaptor, {"adaptor": "transfer"}), (Adaptor, {})]
)
def test_export_onnx_matches_pytorch(tmp_path, cls, kwargs):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    module = cls(BACKBONE, num_classes=C, img_size=SIZE, **kwargs).train()
    path = export_onnx(module, tmp_path / "m.onnx")
    assert module.training  # restored
    x = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        want = module.eval()(x).numpy()
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": x.numpy()})[0]
    assert got.shape == (3, C)
    torch.testing.assert_close(torch.from_numpy(got), torch.from_numpy(want), rtol=1e-4, atol=1e-4)


def test_export_needs_an_image_size(tmp_path):
    with pytest.raises(ValueError, match=r"has no img_size attribute; pass export_onnx\(..., img_size=N\)"):
        export_onnx(torch.nn.Conv2d(3, 2, 3), tmp_path / "m.onnx")
