"""Shared plumbing of the paper-figure benchmarks (``fig3``, ``fig4``, ``vgg11_imagenette``).

Each run trains one model in a plain PyTorch loop over a DataModule's loaders: ``LocalLearner.step`` for tpSGD,
a standard Adam step for backpropagation, and the same Adam step on the last layer alone for the
random-feature control (hidden layers frozen at their random initialisation). Results are stored run by run
in the script's JSON file, so an interrupted benchmark resumes where it stopped (``--fresh`` starts over).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

RESULTS = Path(__file__).resolve().parent / "results"
QUICK_LABEL = "**QUICK RUN** (small subsets, few epochs and seeds: a smoke test, not the result)"


def parser(doc: str | None, seeds: int) -> argparse.ArgumentParser:
    """The options every paper-figure script takes."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=os.environ.get("TPSGD_DATA_DIR", "../shared/data"))
    p.add_argument("--seeds", type=int, default=seeds, help="random restarts per configuration")
    p.add_argument(
        "--quick", action="store_true", help="small subsets and budgets; writes to benchmarks/results/quick/"
    )
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch threads")
    p.add_argument("--fresh", action="store_true", help="ignore runs saved by an earlier invocation")
    p.add_argument("--out-dir", default=None, help="write here instead of benchmarks/results[/quick]")
    p.add_argument(
        "--only",
        nargs="+",
        metavar="PATTERN",
        help="train only the runs whose key (e.g. 'bp/2') matches one of these shell patterns; "
        "the report still shows every stored run",
    )
    return p


def out_dir(args: argparse.Namespace) -> Path:
    if args.out_dir:
        return Path(args.out_dir)
    return RESULTS / "quick" if args.quick else RESULTS


def command(module: str, argv: list[str] | None) -> str:
    args = sys.argv[1:] if argv is None else argv
    return f"OMP_NUM_THREADS=1 python -m benchmarks.{module} " + shlex.join(args)


class Store:
    """``<name>.json``: settings, command and one record per finished run (keyed by a string)."""

    def __init__(self, path: Path, fresh: bool, settings: dict[str, Any]) -> None:
        self.path = path
        data = {} if fresh or not path.exists() else json.loads(path.read_text())
        if data.get("settings") != settings:  # different budgets: earlier runs are not comparable
            data = {}
        self.data: dict[str, Any] = data
        self.data["settings"] = settings
        self.runs: dict[str, dict[str, Any]] = self.data.setdefault("runs", {})

    @property
    def commands(self) -> list[str]:
        """The command of the last full invocation, then those of the partial (``--only``) ones."""
        return [c for c in (self.data.get("command"), *self.data.get("partial_commands", [])) if c]

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=1, sort_keys=True))


Job = tuple[str, Callable[[], dict[str, Any]]]


def run_benchmark(
    name: str,
    argv: list[str] | None,
    doc: str | None,
    seeds: int,
    budgets: tuple[dict[str, Any], dict[str, Any], dict[str, Any]],
    jobs: Callable[[int, dict[str, Any], str], Iterator[Job]],
    write_report: Callable[[Store, Path, bool], None],
) -> None:
    """The ``main`` of a paper-figure script: parse the options, train every run not stored yet, then report.

    ``budgets`` is ``(full, quick, common)`` settings; ``jobs(seeds, settings, data_dir)`` yields ``(key, run)``
    pairs in training order, ``run()`` returning the run's record (with ``acc`` and ``fit_s``). Records are
    saved after every run, so an interrupted benchmark resumes where it stopped.
    """
    args = parser(doc, seeds).parse_args(argv)
    torch.set_num_threads(args.threads)
    out = out_dir(args)
    full, quick, common = budgets
    settings = {**(quick if args.quick else full), **common, "quick": args.quick}
    store = Store(out / f"{name}.json", args.fresh, settings)
    if args.only:  # a partial run: its command joins the full run's
        partial = store.data.setdefault("partial_commands", [])
        if command(name, argv) not in partial:
            partial.append(command(name, argv))
        store.data["seeds"] = max(store.data.get("seeds", 0), args.seeds)
    else:
        store.data["seeds"] = args.seeds
        store.data["command"] = command(name, argv)
    for key, run in jobs(args.seeds, settings, args.data_dir):
        if key in store.runs or (args.only and not any(fnmatch.fnmatchcase(key, p) for p in args.only)):
            continue
        store.runs[key] = record = run()
        print(f"{key}: {record['acc']:.2f}% in {record['fit_s']:.1f}s", flush=True)
        store.save()
    store.save()
    write_report(store, out, args.quick)


_DATAMODULES: dict[tuple, Any] = {}


def quiet_trainer(**kwargs: Any) -> Any:
    """A Lightning ``Trainer`` for a benchmark run: no logger, checkpoints, progress bar, model summary or sanity
    validation; ``kwargs`` set everything else (and may override these)."""
    import lightning as L

    quiet = dict(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    return L.Trainer(**{**quiet, **kwargs})


def cached_datamodule(cls: type, **kwargs: Any) -> Any:
    """``cls(**kwargs)`` after ``setup()``, reused by later runs with the same arguments (in-memory data)."""
    key = (cls.__name__, tuple(sorted(kwargs.items())))
    if key not in _DATAMODULES:
        _DATAMODULES.clear()  # keep one dataset in memory at a time
        dm = cls(**kwargs)
        dm.setup()
        _DATAMODULES[key] = dm
    return _DATAMODULES[key]


def datamodule(cls: type, settings: dict[str, Any], seed: int, data_dir: str, **extra: Any) -> Any:
    """The benchmark's DataModule from the local ``.npz``: no validation holdout, the settings' batch and subsets."""
    return cached_datamodule(
        cls,
        source="npz",
        data_dir=data_dir,
        batch_size=settings["batch_size"],
        val_size=0,
        seed=seed,
        train_subset=settings["train_subset"],
        test_subset=settings["test_subset"],
        **extra,
    )


def trainable_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]


def param_bytes(model: nn.Module) -> int:
    """Bytes of the trainable parameters (float32)."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable) -> float:
    """Test accuracy in %."""
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    model.train()
    return 100.0 * correct / max(total, 1)


def train(
    model: nn.Module,
    method: str,
    train_loader: Iterable,
    epochs: int,
    lr: float,
    seed: int,
    learner_kwargs: dict[str, Any] | None = None,
    test_loader: Iterable | None = None,
) -> dict[str, Any]:
    """Train ``model`` in place with ``method`` (``"tpsgd"``, ``"bp"`` or ``"control"``) and Adam(lr).

    Returns ``fit_s`` (training time, evaluation excluded), ``epoch_s`` (per epoch), ``train_acc`` (running
    accuracy of the training batches, per epoch) and, with ``test_loader``, ``test_curve`` (test accuracy
    after each epoch).
    """
    from lightning_tpsgd import LocalLearner

    torch.manual_seed(seed)  # shuffling order
    model.train()
    if method == "control":
        for layer in trainable_layers(model)[:-1]:
            layer.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    if method == "tpsgd":
        learner = LocalLearner(
            model, seed=seed, optimizer=lambda p: torch.optim.Adam(p, lr=lr), **(learner_kwargs or {})
        )
        out_box: list[torch.Tensor] = []
        handle = model.register_forward_hook(lambda m, i, o: out_box.append(o.detach()))

        def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            out_box.clear()
            learner.step(x, y)
            return out_box[-1]
    else:
        optimizer = torch.optim.Adam(params, lr=lr)

        def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            optimizer.zero_grad(set_to_none=True)
            out = model(x)
            F.cross_entropy(out, y).backward()
            optimizer.step()
            return out.detach()

    epoch_s, train_acc, test_curve = [], [], []
    for _ in range(epochs):
        start = time.perf_counter()
        correct = total = 0
        for x, y in train_loader:
            out = step(x, y)
            correct += int((out.argmax(1) == y).sum())
            total += len(y)
        epoch_s.append(time.perf_counter() - start)
        train_acc.append(100.0 * correct / max(total, 1))
        if test_loader is not None:
            test_curve.append(evaluate(model, test_loader))
    if method == "tpsgd":
        handle.remove()
        learner.close()
    out: dict[str, Any] = {"fit_s": sum(epoch_s), "epoch_s": epoch_s, "train_acc": train_acc}
    if test_loader is not None:
        out["test_curve"] = test_curve
    return out


def mean(values: list[float]) -> float:
    return statistics.mean(values) if values else float("nan")


def std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def mean_std(values: list[float], digits: int = 2) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f} (1 seed)"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend (benchmarks run headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> None:
    """Lay out, write (100 dpi) and close a figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def header(title: str, script: str, commands: list[str], quick: bool) -> list[str]:
    lines = [f"## {title} (benchmarks/{script}.py)", ""]
    if quick:
        lines += [QUICK_LABEL, ""]
    lines += [
        f"Machine: {os.cpu_count()} CPU cores shared with other jobs, torch {torch.__version__}, "
        "CPU, float32. Times are wall-clock on that shared machine: compare them within a table only.",
        "",
        "Command (repository root, `../shared/data` holding the `.npz` files)"
        + (", then the partial runs that added runs:" if len(commands) > 1 else ":"),
        "",
        *[f"    {cmd}" for cmd in commands],
        "",
    ]
    return lines
