"""Export a trained adaptor (:class:`~zoo.TimmAdaptor` or :class:`~zoo.Adaptor`: frozen backbone + adaptors) to ONNX.

Needs the optional extra ``onnx`` (``pip install lightning-tpsgd[onnx]``) only to check the file; the export
itself uses ``torch.onnx`` (the TorchScript-based exporter, which needs no extra package).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import nn

__all__ = ["export_onnx"]


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    img_size: int | None = None,
    in_chans: int | None = None,
    opset: int = 17,
    dynamic_batch: bool = True,
) -> Path:
    """Write ``model`` (backbone + adaptors, in eval mode) as an ONNX graph ``images -> logits``.

    The exported graph is the model's ``forward``: it takes normalized images and never uses the feature cache.
    The model is put in eval mode for the export and restored afterwards.

    Args:
        model: a :class:`~zoo.TimmAdaptor` or :class:`~zoo.Adaptor` (or any module taking ``(B, C, H, W)`` images).
        path: the ``.onnx`` file to write (parent folders are created).
        img_size: square input size; default ``model.img_size``.
        in_chans: input channels; default ``model.in_chans`` or 3.
        opset: ONNX opset version.
        dynamic_batch: make the batch dimension dynamic (otherwise it is fixed to 1).

    Returns:
        The path written.

    Raises:
        ValueError: no ``img_size`` given and the model has none.

    Shape:
        - ONNX input ``images``: (B, C, img_size, img_size) float32
        - ONNX output ``logits``: (B, num_classes)

    Example:
        >>> export_onnx(model, "adaptor.onnx")  # doctest: +SKIP
        >>> import onnxruntime as ort  # doctest: +SKIP
        >>> ort.InferenceSession("adaptor.onnx").run(None, {"images": x.numpy()})  # doctest: +SKIP
    """
    size = img_size if img_size is not None else getattr(model, "img_size", None)
    if size is None:
        raise ValueError(f"{type(model).__name__} has no img_size attribute; pass export_onnx(..., img_size=N).")
    chans = in_chans if in_chans is not None else getattr(model, "in_chans", 3)
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    dummy = torch.zeros(1, chans, size, size, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            torch.onnx.export(
                model,
                (dummy,),
                str(path),
                input_names=["images"],
                output_names=["logits"],
                opset_version=opset,
                dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None,
                dynamo=False,
            )
    finally:
        model.train(was_training)
    return path
