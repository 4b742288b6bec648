"""CPU proxies for kernel launches and host synchronisation: aten ops dispatched per training step.

On an accelerator a small network's step is bound by kernel launches and device-to-host reads, not by
arithmetic. This script counts, with ``torch.profiler`` on the CPU, the aten ops one steady training step
dispatches (each a kernel launch on a GPU, views aside) and the host reads among them
(``aten::_local_scalar_dense`` / ``aten::item``), for backpropagation and for ``LocalLearner.step`` on the
same module (SGD for both, so every host read comes from the training step itself).

Usage::

    python -m benchmarks.step_ops            # writes benchmarks/results/step_ops.md (about a minute)
"""

from __future__ import annotations

import argparse
import copy
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

from lightning_tpsgd import LocalLearner

RESULTS = Path(__file__).resolve().parent / "results"
HOST_READS = ("aten::_local_scalar_dense", "aten::item")


def count_ops(step: Callable[[], object], repeats: int = 3) -> tuple[float, float]:
    """(aten ops, host reads) per call of ``step``, after two warm-up calls."""
    step(), step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            step()
    names = [e.name for e in prof.events() if e.name.startswith("aten::")]
    return len(names) / repeats, sum(n in HOST_READS for n in names) / repeats


def _models() -> dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], dict]]:
    from zoo import create_model

    return {
        "cnn2": (lambda: create_model("cnn2", num_classes=10, in_chans=1, input_size=28), (1, 28, 28), {}),
        "convnet4": (
            lambda: create_model("convnet4", num_classes=10, in_chans=3, input_size=32, channels=32),
            (3, 32, 32),
            {},
        ),
        "rnn1": (
            lambda: create_model("rnn1", num_classes=10, input_size=28, hidden_size=128),
            (28, 28),
            {"overrides": {"0": {"rule": "l1"}}},
        ),
    }


def measure(name: str, batch: int = 32) -> list[tuple[str, float, float]]:
    factory, shape, options = _models()[name]
    torch.manual_seed(0)
    x, y = torch.randn(batch, *shape), torch.randint(0, 10, (batch,))
    model = factory()
    bp_model = copy.deepcopy(model)
    optimizer = torch.optim.SGD(bp_model.parameters(), lr=0.01)

    def bp_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(bp_model(x), y).backward()
        optimizer.step()

    rows = [("backprop", *count_ops(bp_step))]
    variants = {
        "tpSGD ce, validate=True": {"rule": "ce"},
        "tpSGD ce, validate=False": {"rule": "ce", "validate": False},
        "tpSGD ce, compile=True, validate=False": {"rule": "ce", "compile": True, "validate": False},
        "tpSGD default rule, validate=False": {"validate": False},
        "tpSGD default rule, compile=True, validate=False": {"compile": True, "validate": False},
    }
    for label, extra in variants.items():
        options_here = {**options, **extra}
        learner = LocalLearner(copy.deepcopy(model), optimizer=lambda p: torch.optim.SGD(p, lr=0.01), **options_here)
        rows.append((label, *count_ops(lambda learner=learner: learner.step(x, y))))
        learner.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(_models()))
    parser.add_argument("--out", default=str(RESULTS / "step_ops.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    lines = [
        "# aten ops and host reads per training step (CPU, torch.profiler)",
        "",
        f"Command: `python -m benchmarks.step_ops {shlex.join(sys.argv[1:])}` (torch {torch.__version__}); batch 32, "
        "SGD for both methods, one steady step (after two warm-up steps; with `validate=True` no step of the "
        "profiled ones reads the deferred checks). `compile=True` fuses each block's local gradient with "
        '`torch.compile`. Rule `ce` (closed form) and the default rule (`"auto"`: `learned` readouts on '
        "Linear/Conv blocks, `ce` on the recurrent layer).",
        "",
        "| model | method | aten ops / step | vs backprop | host reads / step |",
        "|---|---|---|---|---|",
    ]
    for name in args.models:
        rows = measure(name)
        base = rows[0][1]
        for label, ops, reads in rows:
            lines.append(f"| {name} | {label} | {ops:.0f} | {ops / base:.2f}× | {reads:.0f} |")
            print(lines[-1], flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
