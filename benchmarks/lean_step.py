"""Step time of lean mode against the default mode, on the 4-layer conv net of the core benchmark.

Both learners train the same model (``convnet4``: 32 channels, 64x64 inputs, 10 classes) on the same batch
with ``LocalLearner.step``; their steps alternate (default first on even steps, lean first on odd ones) so
that a busy machine slows both alike, and the medians of the timed steps are compared.

Usage::

    OMP_NUM_THREADS=1 python -m benchmarks.lean_step --threads 1          # CPU, batch 128, 12 timed steps
    python -m benchmarks.lean_step --device cuda --steps 50
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import zoo
from lightning_tpsgd import LocalLearner


def measure(device: str, batch: int, steps: int, warmup: int) -> dict[str, float]:
    """Median seconds per training step of the default and the lean learner."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 64, 64, generator=generator).to(device)
    y = torch.randint(0, 10, (batch,), generator=generator).to(device)
    learners = {}
    for mode in ("default", "lean"):
        torch.manual_seed(0)
        model = zoo.create_model("convnet4", num_classes=10, in_chans=3, input_size=64, channels=32).to(device)
        # rule "ce" in both: what rule="auto" picks in lean mode, so only the mode differs
        learners[mode] = LocalLearner(model, rule="ce", lean=mode == "lean")
    times: dict[str, list[float]] = {"default": [], "lean": []}
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for i in range(warmup + steps):
        for mode in ("default", "lean") if i % 2 == 0 else ("lean", "default"):
            sync()
            start = time.perf_counter()
            learners[mode].step(x, y)
            sync()
            if i >= warmup:
                times[mode].append(time.perf_counter() - start)
    return {mode: statistics.median(t) for mode, t in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=12, help="timed steps of each mode (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: unchanged)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    t = measure(args.device, args.batch, args.steps, args.warmup)
    print(
        f"convnet4 batch {args.batch} on {args.device} (torch {torch.__version__}, {torch.get_num_threads()} "
        f"threads), median of {args.steps} steps: default {t['default'] * 1e3:.1f} ms, lean {t['lean'] * 1e3:.1f} "
        f"ms, lean/default {t['lean'] / t['default']:.2f}"
    )


if __name__ == "__main__":
    main()
