"""One-shot device check: peak memory and throughput of BP vs tpSGD, fp32 and bf16.

Models: the paper's shallow CNN (MNIST size), the 4-layer conv net of the core benchmark (32 channels,
64x64) and the zoo adaptor on a frozen ``tf_efficientnet_lite0`` (random weights: speed and memory do
not depend on them). On CUDA it reports ``torch.cuda.max_memory_allocated`` above the memory held
before the measured steps; on CPU (a smaller, slower run that CI exercises) the peak RSS increase.

Usage::

    python -m benchmarks.gpu_check                 # CUDA if available, full size (≈ 2-3 minutes on one H100)
    python -m benchmarks.gpu_check --device cpu --quick

Writes ``benchmarks/results/gpu_check.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_tpsgd import LocalLearner

from ._memory import reset_peak_rss, status_bytes

RESULTS = Path(__file__).resolve().parent / "results"


def _models(quick: bool) -> dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], int, list[str] | None]]:
    """name -> (factory, input shape, batch size, output layers)."""
    from zoo import create_model

    batch = 16 if quick else 128
    convnet_size = 32 if quick else 64

    def adaptor() -> nn.Module:
        from zoo import TimmAdaptor

        return TimmAdaptor("tf_efficientnet_lite0", num_classes=10, pretrained=False, img_size=112)

    return {
        "cnn2": (lambda: create_model("cnn2", num_classes=10, in_chans=1, input_size=28), (1, 28, 28), batch, None),
        "convnet4": (
            lambda: create_model("convnet4", num_classes=10, in_chans=3, input_size=convnet_size, channels=32),
            (3, convnet_size, convnet_size),
            batch,
            None,
        ),
        "adaptor": (adaptor, (3, 112, 112), 8 if quick else 64, None),
    }


def _bp_step(model: nn.Module, autocast: Callable[[], Any]) -> Callable[[torch.Tensor, torch.Tensor], None]:
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()

    return step


def _tpsgd_step(
    model: nn.Module, autocast: Callable[[], Any], lean: bool
) -> Callable[[torch.Tensor, torch.Tensor], None]:
    outputs = getattr(model, "tpsgd_output_layers", None)
    learner = LocalLearner(model, lean=lean, output_layers=outputs, optimizer=lambda p: torch.optim.Adam(p, lr=1e-3))

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with autocast():
            learner.step(x, y)

    return step


def _peak_tracker(device: torch.device) -> tuple[Callable[[], None], Callable[[], int]]:
    if device.type == "cuda":

        def reset() -> None:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            reset.base = torch.cuda.memory_allocated()  # type: ignore[attr-defined]

        return reset, lambda: torch.cuda.max_memory_allocated() - reset.base  # type: ignore[attr-defined]

    def reset_cpu() -> None:
        reset_cpu.base = reset_peak_rss()  # type: ignore[attr-defined]

    return reset_cpu, lambda: status_bytes("VmHWM") - reset_cpu.base  # type: ignore[attr-defined]


def measure(name: str, method: str, dtype: str, device: torch.device, quick: bool, steps: int) -> dict[str, float]:
    factory, shape, batch, _ = _models(quick)[name]
    torch.manual_seed(0)
    model = factory().to(device)
    x = torch.randn(batch, *shape, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    if dtype == "bf16":

        def autocast() -> Any:
            return torch.autocast(device.type, dtype=torch.bfloat16)
    else:
        autocast = contextlib.nullcontext
    run = _bp_step(model, autocast) if method == "bp" else _tpsgd_step(model, autocast, lean=method.endswith("lean"))
    run(x, y)  # warm-up: optimizer state, projections, kernels
    run(x, y)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    reset, peak = _peak_tracker(device)
    reset()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        run(x, y)
    sync()
    seconds = time.perf_counter() - start
    return {"samples_per_s": steps * batch / seconds, "peak_bytes": peak(), "batch": batch}


def _ratio(value: int, reference: int) -> str:
    """A memory ratio, or "–" when the reference is under 1 MiB (too small to compare on CPU)."""
    return f"{value / reference:.2f}" if reference >= 2**20 else "–"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small inputs and batches (CI on CPU)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--models", nargs="+", default=["cnn2", "convnet4", "adaptor"])
    parser.add_argument("--out", default=str(RESULTS / "gpu_check.md"))
    args = parser.parse_args()
    device = torch.device(args.device)
    steps = args.steps or (2 if args.quick else 20)
    rows, results = [], {}
    for name in args.models:
        for dtype in ("fp32", "bf16"):
            bp = measure(name, "bp", dtype, device, args.quick, steps)
            for method in ("tpsgd-ce", "tpsgd-ce-lean"):
                r = measure(name, method, dtype, device, args.quick, steps)
                results[f"{name}/{dtype}/{method}"] = r
                rows.append(
                    f"| {name} | {dtype} | {r['batch']} | {bp['samples_per_s']:.0f} | {r['samples_per_s']:.0f} | "
                    f"{r['samples_per_s'] / bp['samples_per_s']:.2f}× | {bp['peak_bytes'] / 2**20:.0f} | "
                    f"{r['peak_bytes'] / 2**20:.0f} | {_ratio(r['peak_bytes'], bp['peak_bytes'])} | {method} |"
                )
                print(rows[-1], flush=True)
            results[f"{name}/{dtype}/bp"] = bp
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    memory = "CUDA max_memory_allocated above the pre-step allocation" if device.type == "cuda" else "peak RSS increase"
    lines = [
        f"# Device check on {device_name}",
        "",
        f"Command: `python -m benchmarks.gpu_check {shlex.join(sys.argv[1:])}`; "
        f"{steps} timed steps after 2 warm-up steps; peak memory = {memory}.",
        "",
        "| model | precision | batch | BP samples/s | tpSGD samples/s | speed ratio | BP peak MB | tpSGD peak MB "
        "| memory ratio | tpSGD mode |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    Path(args.out).with_suffix(".json").write_text(json.dumps(results, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
