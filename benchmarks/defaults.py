"""Defaults chosen by measurement: the strategy's defaults on models written as a user would write them.

Every row is a plain LightningModule (Adam, lr 1e-3, batch 128; none of the zoo's models) trained three ways
with the same epochs and optimizer:

- ``tpsgd``: ``Trainer(strategy="tpsgd")``, every option at its default;
- ``bp``: ``Trainer(strategy="auto")``, backpropagation (BPTT for the recurrent rows);
- ``control``: the hidden layers frozen at their random initialisation, only the last layer trained
  (backpropagation then reaches the last layer only).

Candidate defaults are measured as extra methods ``tpsgd-<rule>`` (``TPSGDStrategy(rule=<rule>)``, the
other options at their defaults); ``tpsgd-<rule>@<scale>`` also sets ``target_scale``, and
``tpsgd-<rule>,<key>=<JSON value>,...`` any other ``TPSGDStrategy`` option (e.g.
``tpsgd-ce,overrides={"rnn":{"projection":"orthogonal"}}``).

Usage::

    python -m benchmarks.defaults --data-dir ../shared/data                       # the matrix, 3 seeds
    python -m benchmarks.defaults --rows mnist/cnn cifar10/cnn --methods tpsgd-ce tpsgd-learned --seeds 0
    python -m benchmarks.defaults --quick --out /tmp/defaults_quick              # synthetic data, seconds

Results go to ``benchmarks/results/defaults.{json,md}`` (``--quick``: ``benchmarks/results/quick/``). Runs
are stored per (row, method, seed) and a rerun skips those already there, except ``tpsgd`` runs measured
under other library defaults (they are moved to ``"superseded"`` and measured again) and ``--force``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._paper_runs import quiet_trainer

RESULTS = Path(__file__).resolve().parent / "results"
BASE_METHODS = ("tpsgd", "bp", "control")
TRAIN_SUBSET = 20_000  # training images (sequences) per run; the full test set is used
BARS = {"control": 2.0, "feedforward": 1.5, "recurrent": 8.0}  # issue 18's bars, in points


# ---------------------------------------------------------------------------------------------------- the models
# Written as a user would write them, without regard for the strategy.


class Classifier(L.LightningModule):
    """``net`` trained with cross-entropy and Adam (lr 1e-3)."""

    def __init__(self, net: nn.Module | None = None) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def mlp(chans: int, size: int) -> Classifier:
    return Classifier(
        nn.Sequential(
            nn.Flatten(),
            nn.Linear(chans * size * size, 256),
            nn.ReLU(),
            nn.Linear(256, 256),
            nn.ReLU(),
            nn.Linear(256, 10),
        )
    )


def mlp_bn(chans: int, size: int) -> Classifier:
    return Classifier(
        nn.Sequential(
            nn.Flatten(),
            nn.Linear(chans * size * size, 256),
            nn.BatchNorm1d(256),
            nn.ReLU(),
            nn.Dropout(0.2),
            nn.Linear(256, 256),
            nn.BatchNorm1d(256),
            nn.ReLU(),
            nn.Dropout(0.2),
            nn.Linear(256, 10),
        )
    )


def cnn(chans: int, size: int) -> Classifier:
    """The issue's plain CNN without pooling."""
    return Classifier(
        nn.Sequential(
            nn.Conv2d(chans, 16, 5),
            nn.LeakyReLU(),
            nn.Conv2d(16, 16, 5),
            nn.LeakyReLU(),
            nn.Flatten(),
            nn.Linear(16 * (size - 8) ** 2, 10),
        )
    )


def cnn_bn(chans: int, size: int) -> Classifier:
    return Classifier(
        nn.Sequential(
            nn.Conv2d(chans, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * (size // 4) ** 2, 128),
            nn.ReLU(),
            nn.Linear(128, 10),
        )
    )


class TutorialNet(Classifier):
    """The PyTorch CIFAR-10 tutorial's network: activations are ``F.relu`` calls in ``forward``."""

    def __init__(self, chans: int, size: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(chans, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        k = ((size - 4) // 2 - 4) // 2  # side of the second pooled map
        self.fc1 = nn.Linear(16 * k * k, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class RNNClassifier(Classifier):
    """``lightning_tpsgd.nn.RNN`` and a Linear head on the final hidden state(s)."""

    def __init__(self, num_layers: int = 1, bidirectional: bool = False) -> None:
        from lightning_tpsgd.nn import RNN

        super().__init__()
        # tanh: torch.nn.RNN's default (the library's own default is changing to it; explicit until then)
        self.rnn = RNN(28, 256, num_layers=num_layers, bidirectional=bidirectional, batch_first=True,
                       nonlinearity="tanh")  # fmt: skip
        self.directions = 2 if bidirectional else 1
        self.head = nn.Linear(256 * self.directions, 10)

    def forward(self, x: Tensor) -> Tensor:
        _, h_n = self.rnn(x)
        return self.head(torch.cat(list(h_n[-self.directions :]), dim=1))


@dataclass(frozen=True)
class Row:
    dataset: str  # "mnist", "cifar10" or "seqmnist"
    build: Callable[[], Classifier]
    epochs: int
    recurrent: bool = False


def _image_rows(dataset: str, chans: int, size: int, epochs: int) -> dict[str, Row]:
    return {
        f"{dataset}/mlp": Row(dataset, lambda: mlp(chans, size), epochs),
        f"{dataset}/mlp_bn": Row(dataset, lambda: mlp_bn(chans, size), epochs),
        f"{dataset}/cnn": Row(dataset, lambda: cnn(chans, size), epochs),
        f"{dataset}/cnn_bn": Row(dataset, lambda: cnn_bn(chans, size), epochs),
        f"{dataset}/cnn_frelu": Row(dataset, lambda: TutorialNet(chans, size), epochs),
    }


ROWS: dict[str, Row] = {
    **_image_rows("mnist", 1, 28, 2),
    **_image_rows("cifar10", 3, 32, 2),
    "seqmnist/rnn": Row("seqmnist", lambda: RNNClassifier(), 3, recurrent=True),
    "seqmnist/rnn2": Row("seqmnist", lambda: RNNClassifier(num_layers=2), 3, recurrent=True),
    "seqmnist/birnn": Row("seqmnist", lambda: RNNClassifier(bidirectional=True), 3, recurrent=True),
}
ROW_TITLES = {
    "mlp": "MLP 256-256",
    "mlp_bn": "MLP 256-256, BatchNorm + Dropout",
    "cnn": "CNN, no pooling (the issue's)",
    "cnn_bn": "CNN, pooling + BatchNorm, hidden Linear",
    "cnn_frelu": "CNN with `F.relu` in forward (PyTorch tutorial)",
    "rnn": "RNN 256 + Linear",
    "rnn2": "RNN 256, 2 layers + Linear",
    "birnn": "bidirectional RNN 256 + Linear",
}


# ---------------------------------------------------------------------------------------------------- one run
def _strategy(method: str) -> Any:
    from lightning_tpsgd import TPSGDStrategy

    if method == "tpsgd":
        return "tpsgd"  # exactly what a user types
    if method.startswith("tpsgd-"):
        spec, *options = method.split("-", 1)[1].split(",")
        rule, _, scale = spec.partition("@")
        kwargs: dict[str, Any] = {"target_scale": float(scale)} if scale else {}
        for option in options:  # key=value, value as JSON (or a plain string)
            key, _, value = option.partition("=")
            try:
                kwargs[key] = json.loads(value)
            except json.JSONDecodeError:
                kwargs[key] = value
        return TPSGDStrategy(rule=rule, **kwargs)
    return "auto"


def _datamodule(row: Row, seed: int, data_dir: str | None, quick: bool) -> Any:
    from lightning_tpsgd.data import CIFAR10DataModule, MNISTDataModule, SeqMNISTDataModule

    kwargs: dict[str, Any] = dict(source="npz", data_dir=data_dir, batch_size=128, val_size=0, seed=seed)
    kwargs["train_subset"] = None if quick else TRAIN_SUBSET
    if row.dataset == "seqmnist":
        return SeqMNISTDataModule(mode="rows", **kwargs)
    return (MNISTDataModule if row.dataset == "mnist" else CIFAR10DataModule)(**kwargs)


def _freeze_hidden(module: Classifier) -> None:
    """The control: every trainable layer but the last one keeps its random initialisation."""
    layers = [m for m in module.modules() if any(True for _ in m.parameters(recurse=False))]
    for layer in layers[:-1]:
        layer.requires_grad_(False)


class _BlockRecorder(L.Callback):
    """Records how the strategy configured each block (rule, where the target is compared)."""

    def __init__(self) -> None:
        self.blocks: list[dict[str, str]] = []

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        learner = getattr(trainer.strategy, "learner", None)
        for block in getattr(learner, "blocks", []):
            tap = getattr(block, "tap", None)
            self.blocks.append(
                {
                    "name": block.name,
                    "layer": type(block.layer).__name__,
                    "rule": "output" if block.is_output else repr(block.rule),
                    "tap": type(tap).__name__ if tap is not None else "–",
                }
            )


@torch.no_grad()
def _test_accuracy(module: Classifier, loader: Any) -> float:
    module.eval()
    correct = total = 0
    for x, y in loader:
        correct += int((module(x).argmax(1) == y).sum())
        total += len(y)
    return 100.0 * correct / total


def run(row_name: str, method: str, seed: int, data_dir: str | None, quick: bool) -> dict[str, Any]:
    row = ROWS[row_name]
    L.seed_everything(seed, verbose=False)
    module = row.build()
    if method == "control":
        _freeze_hidden(module)
    dm = _datamodule(row, seed, data_dir, quick)
    recorder = _BlockRecorder()
    trainer = quiet_trainer(
        accelerator="cpu",
        max_epochs=1 if quick else row.epochs,
        strategy=_strategy(method),
        callbacks=[recorder],
        limit_val_batches=0,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    fit_s = time.perf_counter() - start
    dm.setup("test")
    out = {"acc": _test_accuracy(module, dm.test_dataloader()), "fit_s": fit_s, "epochs": trainer.current_epoch}
    out["train_size"], out["test_size"] = len(dm.train_dataset), len(dm.test_dataset)
    if recorder.blocks:
        out["blocks"] = recorder.blocks
    if method == "tpsgd":
        out["defaults"] = library_defaults()
    return out


def library_defaults() -> dict[str, str]:
    """The library defaults a ``tpsgd`` run depends on (a run under other defaults is measured again)."""
    from lightning_tpsgd import TPSGDStrategy

    # the RNN rows set their cell (nonlinearity="tanh") themselves, so the RNN's default is not one of them
    strategy = inspect.signature(TPSGDStrategy).parameters
    return {"rule": str(strategy["rule"].default), "target_scale": str(strategy["target_scale"].default)}


# ---------------------------------------------------------------------------------------------------- the store
def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {"runs": {}, "commands": []}


def _save(store: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(store, indent=1, sort_keys=True))


def _stale(record: dict[str, Any], method: str) -> bool:
    return method == "tpsgd" and record.get("defaults") != library_defaults()


def measure(args: argparse.Namespace, store: dict[str, Any], path: Path) -> None:
    runs, superseded = store.setdefault("runs", {}), store.setdefault("superseded", {})
    for seed in args.seeds:  # seed-major: every row gets its first seed before any row gets its third
        for row_name in args.rows:
            for method in args.methods:
                key = f"{row_name}/{method}/{seed}"
                if key in runs and not args.force and not _stale(runs[key], method):
                    continue
                if key in runs:
                    superseded[f"{key}@{len([k for k in superseded if k.startswith(key + '@')])}"] = runs.pop(key)
                runs[key] = run(row_name, method, seed, args.data_dir, args.quick)
                print(f"{key}: {runs[key]['acc']:.2f} % in {runs[key]['fit_s']:.0f} s", flush=True)
                _save(store, path)


# ---------------------------------------------------------------------------------------------------- the report
def _accs(runs: dict[str, Any], row: str, method: str) -> list[float]:
    prefix = f"{row}/{method}/"
    return [r["acc"] for k, r in runs.items() if k.startswith(prefix) and k[len(prefix) :].isdigit()]


def _cell(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.2f} (n=1)"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f} (n={len(values)})"


def _bar(delta: float | None, need: float, sign: int) -> str:
    """``sign`` +1: delta must be ≥ need; -1: delta must be ≥ -need (within ``need`` below)."""
    if delta is None:
        return "–"
    met = delta >= need if sign > 0 else delta >= -need
    return f"{delta:+.2f} {'✓' if met else '**✗**'}"


def report_lines(store: dict[str, Any]) -> list[str]:
    runs = store.get("runs", {})
    quick = bool(store.get("quick"))
    rows = [r for r in ROWS if any(k.startswith(r + "/") for k in runs)]
    defaults = {json.dumps(r["defaults"], sort_keys=True) for r in runs.values() if "defaults" in r}
    lines = [
        "# Defaults chosen by measurement: user-style models",
        "",
        *(["**QUICK RUN** (synthetic data, 1 epoch: a smoke test, not the result)", ""] if quick else []),
        "Plain LightningModules as a user writes them (`benchmarks/defaults.py`; Adam lr 1e-3, batch 128), each",
        'trained three ways with the same epochs: `Trainer(strategy="tpsgd")` with every option at its default,',
        'backpropagation (`strategy="auto"`, BPTT for the RNNs) and a control whose hidden layers stay at their',
        "random initialisation (only the last layer trains). "
        f"Training on a seeded random subset of {TRAIN_SUBSET:,} training images",
        "(sequences) per seed, no validation holdout; test accuracy (%) on the full test set (10,000), mean ± std",
        "over n seeds. RNN rows: Seq-MNIST rows (T = 28, F = 28), `lightning_tpsgd.nn.RNN(28, 256,",
        'batch_first=True, nonlinearity="tanh")`, head on the final state(s). One CPU thread per run.',
        "",
        "Library defaults of the `tpsgd` column: "
        + ("; ".join(f"`{d}`" for d in sorted(defaults)) if defaults else "–")
        + ".",
        "",
        "Commands (from the repository root):",
        "",
        *[f"- `{c}`" for c in store.get("commands", [])],
        "",
        *([*[f"- {note}" for note in store["notes"]], ""] if store.get("notes") else []),
        "## The matrix",
        "",
        "Bars (issue 18): default − control ≥ +2 points on every row; default − backprop ≥ −1.5 points",
        "(feedforward) or ≥ −8 points (RNN), at equal epochs.",
        "",
        "| row | epochs | tpsgd (defaults) | backprop | random features (control) | default − control "
        "| default − backprop |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        r = ROWS[row]
        cells = {m: _accs(runs, row, m) for m in BASE_METHODS}
        means = {m: statistics.mean(v) if v else None for m, v in cells.items()}
        d_control = None if None in (means["tpsgd"], means["control"]) else means["tpsgd"] - means["control"]
        d_bp = None if None in (means["tpsgd"], means["bp"]) else means["tpsgd"] - means["bp"]
        need_bp = BARS["recurrent" if r.recurrent else "feedforward"]
        title = f"{r.dataset} · {ROW_TITLES[row.split('/')[1]]}"
        lines.append(
            f"| {title} | {1 if quick else r.epochs} | {_cell(cells['tpsgd'])} | {_cell(cells['bp'])} | "
            f"{_cell(cells['control'])} | {_bar(d_control, BARS['control'], +1)} | {_bar(d_bp, need_bp, -1)} |"
        )
    misses = [m for row in rows for m in _misses(runs, row)]
    if misses:
        lines += ["", "Bars missed: " + "; ".join(misses) + "."]
    elif rows:
        lines += ["", "Every measured row meets both bars."]
    extra = sorted({k.split("/")[2] for k in runs if k.split("/")[2] not in BASE_METHODS})
    if extra:
        lines += [
            "",
            "## Candidate defaults",
            "",
            "`tpsgd-<rule>`: `TPSGDStrategy(rule=<rule>)`, everything else at its default "
            "(`@s`: `target_scale=s`; `,key=value`: that `TPSGDStrategy` option); same models, data and epochs. The",
            "differences are against the means of backprop and the control over all their seeds. The rows with",
            "`F.relu` were measured once the engine took blocks from the call order (their hidden targets are",
            "compared where the next layer reads its input; before, they silently became pre-activation targets).",
            "",
            "| row | method | accuracy | − backprop | − control | the default (`tpsgd`) |",
            "|---|---|---|---|---|---|",
        ]
        for row in rows:
            means = {m: statistics.mean(v) for m in BASE_METHODS if (v := _accs(runs, row, m))}
            for method in extra:
                accs = _accs(runs, row, method)
                if not accs:
                    continue
                mean = statistics.mean(accs)
                diffs = [f"{mean - means[m]:+.2f}" if m in means else "–" for m in ("bp", "control")]
                lines.append(
                    f"| {row} | `{method}` | {_cell(accs)} | {' | '.join(diffs)} | {_cell(_accs(runs, row, 'tpsgd'))} |"
                )
    blocks = {
        row: runs[k]["blocks"]
        for row in rows
        for k in sorted(runs)
        if k.startswith(f"{row}/tpsgd/") and "blocks" in runs[k]
    }
    if blocks:
        lines += [
            "",
            "How the default strategy configured each model's blocks (rule; module whose output meets the target):",
            "",
        ]
        for row, bl in blocks.items():
            taps = {"–": "the next layer's input"}  # a functional activation: compared where the next layer reads
            parts = [f"{b['name']} {b['rule']} @ {taps.get(b['tap'], b['tap'])}" for b in bl if b["rule"] != "output"]
            lines.append(f"- {row}: " + "; ".join(parts))
    lines += [
        "",
        "Fit times (s, mean over seeds; on a shared machine, not a speed benchmark): "
        + ", ".join(_fit_times(runs, rows))
        + ".",
    ]
    return lines


def _misses(runs: dict[str, Any], row: str) -> list[str]:
    """The bars ``row`` misses, as ``"<row>: default − <reference> <delta> (bar ...)"``."""
    means = {m: statistics.mean(v) for m in BASE_METHODS if (v := _accs(runs, row, m))}
    if "tpsgd" not in means:
        return []
    out = []
    if "control" in means and means["tpsgd"] - means["control"] < BARS["control"]:
        out.append(f"{row}: default − control {means['tpsgd'] - means['control']:+.2f} (bar ≥ +{BARS['control']})")
    need = BARS["recurrent" if ROWS[row].recurrent else "feedforward"]
    if "bp" in means and means["tpsgd"] - means["bp"] < -need:
        out.append(f"{row}: default − backprop {means['tpsgd'] - means['bp']:+.2f} (bar ≥ −{need})")
    return out


def _fit_times(runs: dict[str, Any], rows: list[str]) -> list[str]:
    out = []
    for row in rows:
        t = {m: [r["fit_s"] for k, r in runs.items() if k.startswith(f"{row}/{m}/")] for m in ("tpsgd", "bp")}
        if all(t.values()):
            out.append(f"{row} {statistics.mean(t['tpsgd']):.0f} / {statistics.mean(t['bp']):.0f} (tpsgd / bp)")
    return out


# ---------------------------------------------------------------------------------------------------- synthetic data
def write_synthetic_data(folder: Path, n_train: int = 512, n_test: int = 256) -> None:
    """Tiny ``mnist.npz`` / ``cifar10.npz`` with a class-dependent pattern plus noise (for ``--quick``)."""
    rng = np.random.default_rng(0)
    for name, shape in (("mnist", (28, 28)), ("cifar10", (32, 32, 3))):
        patterns = rng.uniform(0, 255, size=(10, *shape))
        arrays = {}
        for split, n in (("train", n_train), ("test", n_test)):
            y = rng.integers(0, 10, size=n)
            x = 0.5 * patterns[y] + rng.uniform(0, 127, size=(n, *shape))
            arrays[f"x_{split}"], arrays[f"y_{split}"] = x.astype(np.uint8), y.astype(np.int64)
        np.savez(folder / f"{name}.npz", **arrays)


# ---------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.environ.get("TPSGD_DATA_DIR"), help="folder with the .npz files")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS), metavar="ROW")
    parser.add_argument("--methods", nargs="+", default=list(BASE_METHODS), help="tpsgd, bp, control, tpsgd-<rule>")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--force", action="store_true", help="measure again runs that are stored already")
    parser.add_argument("--quick", action="store_true", help="synthetic data, 1 epoch: checks the script runs")
    parser.add_argument("--out", default=None, help="results stem (default benchmarks/results[/quick]/defaults)")
    parser.add_argument("--report-only", action="store_true", help="rewrite the .md from the .json")
    args = parser.parse_args(argv)
    for method in args.methods:
        if method not in BASE_METHODS and not method.startswith("tpsgd-"):
            parser.error(f"unknown method {method!r}: use tpsgd, bp, control or tpsgd-<rule>[@<target_scale>]")
    torch.set_num_threads(args.threads)
    stem = Path(args.out) if args.out else (RESULTS / "quick" if args.quick else RESULTS) / "defaults"
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    store = _load(json_path)
    store["quick"] = args.quick
    if not args.report_only:
        command = "python -m benchmarks.defaults " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
        if command not in store["commands"]:
            store["commands"].append(command)
        with tempfile.TemporaryDirectory() as tmp:
            if args.quick:
                write_synthetic_data(Path(tmp))
                args.data_dir = tmp
            measure(args, store, json_path)
        _save(store, json_path)
    md_path.write_text("\n".join(report_lines(store)) + "\n")
    print(f"wrote {md_path}")


if __name__ == "__main__":
    main()
