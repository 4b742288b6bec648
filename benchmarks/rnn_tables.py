"""Paper Tables 5, 7 and 8: recurrent classifiers trained with local targets vs random and BPTT baselines.

Usage::

    python -m benchmarks.rnn_tables --data-dir ../shared/data --seeds 3 --epochs 20      # everything
    python -m benchmarks.rnn_tables --data-dir ../shared/data --tables 5 --datasets rows  # one cell group
    python -m benchmarks.rnn_tables --parts speed memory                                  # no accuracy runs
    python -m benchmarks.rnn_tables --quick                                                # minutes, subsets
    python -m benchmarks.rnn_tables --parts                                                # report only
    python -m benchmarks.rnn_tables --parts accuracy --tables 5 --datasets rows --columns l1 --seed-ids 0 \
        --set rnn_fraction=0.5                                     # a validation probe with changed settings

Columns of every table (test accuracy, mean ± std over seeds):

- **random**: the untrained network (recurrent layer and classifier at their random initial weights);
- **random RNN + classifier**: the recurrent layer frozen at its random init, the classifier trained
  under ``Trainer(strategy="tpsgd")`` (its output layer by the module's cross-entropy, a hidden layer of
  the Table 7 perceptron by tpSGD-ℓ2);
- **RNN (DRTP) + classifier**, **RNN (tpSGD-ℓ1) + classifier**: the recurrent layer trained by its
  local rule (:class:`lightning_tpsgd.nn.RNN`), then the classifier, layer by layer (paper §2.2);
- **BP**: the same network trained by backpropagation through time (Lightning's default strategy), its
  gradient norm clipped at 1 (``bp_grad_clip``; without clipping 5 of 18 BPTT runs collapsed, to 10-55 %).

BP and DRTP have settings of their own where the dataset's, chosen for ℓ1, fail them (``COLUMN_SETTINGS``).

Every run is an ordinary ``Trainer.fit`` + ``Trainer.test`` of ``zoo.SequenceClassifier`` on a
``lightning_tpsgd.data`` DataModule, i.e. only the public API. Results are saved after every run in
``benchmarks/results/rnn_tables.json``; a rerun skips the runs already there (``--fresh`` starts over), so
an interrupted benchmark resumes where it stopped. The report is ``benchmarks/results/rnn_tables.md``
with ``rnn_tables.png`` (with ``--store FILE``: ``FILE`` with ``.md`` and ``.png``).

``--parts speed`` times training epochs of the local step and of BPTT on the same model in this process;
``--parts memory`` measures one training step at Seq-MNIST pixels without downsampling (T=784) in fresh
processes: the bytes autograd holds for backward and the extra peak RSS.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ._memory import SavedTensorMeter, reset_peak_rss, status_bytes
from ._paper_runs import quiet_trainer

RESULTS = Path(__file__).resolve().parent / "results"
NAME = "rnn_tables"

TABLES = {"5": "rnn1", "7": "rnn2", "8": "birnn1"}
TABLE_TITLES = {
    "5": "Table 5: single-layer RNN + linear classifier",
    "7": "Table 7: two-layer stacked RNN + two-layer perceptron",
    "8": "Table 8: single-layer bidirectional RNN + linear classifier",
}
COLUMNS = ("random", "random_rnn", "drtp", "l1", "bp")
COLUMN_TITLES = {
    "random": "Random",
    "random_rnn": "Random RNN + classifier",
    "drtp": "RNN (DRTP) + classifier",
    "l1": "RNN (tpSGD-ℓ1) + classifier",
    "bp": "BP",
}
DATASETS = ("rows", "pixels", "eeg", "twitter")
DATASET_TITLES = {
    "rows": "Seq. MNIST (rows)",
    "pixels": "Seq. MNIST (pixels)",
    "eeg": "EEG Seizure",
    "twitter": "Twitter (one-hot)",
}
# The paper's numbers (%), in COLUMNS order; UCF101 and Twitter (Word2Vec) need features we do not have.
PAPER: dict[tuple[str, str], tuple[float, ...]] = {
    ("5", "rows"): (9.58, 9.76, 83.39, 79.81, 92.53),
    ("5", "pixels"): (10.28, 11.35, 62.83, 66.46, 75.55),
    ("5", "eeg"): (48.35, 79.48, 89.57, 83.57, 94.14),
    ("5", "twitter"): (49.92, 50.08, 66.82, 67.72, 71.75),
    ("7", "rows"): (10.32, 19.02, 83.16, 79.96, 92.59),
    ("7", "pixels"): (10.32, 13.66, 68.60, 70.01, 82.04),
    ("7", "eeg"): (51.57, 80.87, 80.78, 80.87, 93.75),
    ("7", "twitter"): (50.08, 52.55, 67.04, 67.35, 69.94),
    ("8", "rows"): (11.35, 10.70, 83.13, 79.05, 92.10),
    ("8", "pixels"): (11.35, 10.32, 67.19, 68.01, 80.95),
    ("8", "eeg"): (48.52, 85.04, 84.09, 88.61, 90.53),
    ("8", "twitter"): (50.08, 51.07, 65.00, 66.41, 71.65),
}
# What the issue asks of the single-layer RNN (tpSGD-ℓ1 or DRTP), in %.
TARGETS = {"rows": 88.0, "pixels": 72.0, "eeg": 92.0, "twitter": 68.0}

# Settings shared by every column of a dataset, chosen on the validation split (quick probes: see the report).
# rnn_fraction: share of the epochs that train the recurrent layer in the layer-wise schedule (paper §2.2); the
# rest trains the head (split evenly between the two layers of the Table 7 perceptron). bp_grad_clip: the BP column's
# gradient-norm clipping (plain BPTT, kept in the report as "bp_grad_clip=null" probes, collapsed on 5 of 18 runs).
HIDDEN, BATCH = 512, 128
_DEFAULTS: dict[str, Any] = {
    "lr": 2e-3,
    "nonlinearity": "tanh",
    "init_scale": None,
    "target_scale": 1.0,
    "bp_grad_clip": 1.0,
}
SETTINGS: dict[str, dict[str, Any]] = {
    # rows: 3 of the 20 epochs for the RNN (0.25, i.e. 5, gave 85.6 % on validation and 0.15 gave 86.7 %, seed 0)
    "rows": {**_DEFAULTS, "rnn_fraction": 0.15},
    "pixels": {**_DEFAULTS, "rnn_fraction": 0.25},
    # EEG: seizures are told by the signal's amplitude, not its sign, so the units must sit on the curved part of tanh:
    # strong input weights and spread-out biases, weak recurrence (validation probes, see the report)
    "eeg": {
        **_DEFAULTS,
        "lr": 1e-3,
        "init_scale": 0.1,
        "input_init_scale": 1.0,
        "bias_init_scale": 1.0,
        "target_scale": 0.5,
        "rnn_fraction": 0.25,
    },
    "twitter": {**_DEFAULTS, "rnn_fraction": 0.25},
}

# Settings of one column that differ from its dataset's, chosen on the validation holdout like the rest (the probes
# table of the report shows each beside the run it replaced): {column: {dataset: {key: value}}}, and
# {column: {"<table>/<dataset>": {key: value}}} for one table alone, over the dataset's. Every method gets the settings
# that suit it; a column trained with the local rules' lr where it fails would compare nothing.
COLUMN_SETTINGS: dict[str, dict[str, dict[str, Any]]] = {
    # BPTT at the local rules' lr collapsed on pixels and on stacked rows; lr 2e-4, seed 0, validation: rows 86.0 ->
    # 97.2 %, pixels 9.4 -> 92.9 %, EEG (3 seeds) 92.8 -> 96.4 %, Twitter 67.8 -> 73.6 %
    "bp": {dataset: {"lr": 2e-4} for dataset in ("rows", "pixels", "eeg", "twitter")},
    # DRTP's pseudo-gradient never changes sign, so its tanh units saturate (benchmarks/rnn_saturation.py). Seed 0,
    # validation: pixels with the paper's sigmoid cell 59.5 % (tanh: 9.6 %, and 9.6-28.2 % with one RNN epoch at
    # rnn_lr 5e-4 to 3e-5); EEG (3 seeds) and Twitter with one RNN epoch at a small rnn_lr 89.9 % (83.6 %) and
    # 66.5 % (56.9 %). Rows keeps the dataset's settings (no probe). Pixels: DRTP's sigmoid units leave their
    # saturated start slowly (a linear probe on Table 7's first layer: 50.4 -> 60.1 % from the 4th to the 5th RNN
    # epoch), so 10 of the 20 epochs train the RNN: seed 0, validation, Table 5 59.5 -> 68.1 %, Table 7 49.6 -> 64.7 %.
    "drtp": {
        "pixels": {"nonlinearity": "sigmoid", "rnn_fraction": 0.5},
        "eeg": {"rnn_lr": 5e-4, "rnn_fraction": 0.05},
        "twitter": {"rnn_lr": 3e-5, "rnn_fraction": 0.05},
        # Table 7's head has a hidden layer trained by a local rule on DRTP's features, which vary little around a
        # large offset; standardised (feature_norm, seed 0, validation) Twitter 64.1 -> 66.7 % (Table 5's linear
        # classifier: 66.5 -> 66.6 %, so Table 5 keeps the paper's head). Pixels gained less than in Table 5
        # (49.6 -> 51.2 % against 59.5 -> 62.0 %): no change there.
        "7/twitter": {"feature_norm": "batch"},
    },
}


#: Settings a probe may change with ``--set KEY=VALUE`` (``scheduler``: ``"cosine"`` or null, the module's lr schedule;
#: ``bp_grad_clip``: clip the gradient norm of the BP column to this value, Lightning's ``gradient_clip_val``;
#: ``rnn_lr``: the recurrent layer's own learning rate, ``SequenceClassifier(layer_lr={"net.0": rnn_lr})``;
#: ``feature_norm``: ``"batch"`` standardises the final state before the head, the zoo models' ``feature_norm``).
SETTING_KEYS = (
    "lr",
    "nonlinearity",
    "init_scale",
    "input_init_scale",
    "bias_init_scale",
    "target_scale",
    "rnn_fraction",
    "scheduler",
    "bp_grad_clip",
    "rnn_lr",
    "feature_norm",
)


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["rnn_fraction=0.5", "scheduler=cosine"]`` -> ``{"rnn_fraction": 0.5, "scheduler": "cosine"}``."""
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or key not in SETTING_KEYS:
            raise SystemExit(f"--set expects KEY=VALUE with KEY one of {', '.join(SETTING_KEYS)}; got {pair!r}.")
        try:
            overrides[key] = json.loads(text)
        except json.JSONDecodeError:
            overrides[key] = text  # a bare word, e.g. scheduler=cosine
    return overrides


def column_settings(table: str, dataset: str, column: str) -> dict[str, Any]:
    """A column's own settings in one table (``COLUMN_SETTINGS``): the dataset's entry, then the table's."""
    own = COLUMN_SETTINGS.get(column, {})
    return {**own.get(dataset, {}), **own.get(f"{table}/{dataset}", {})}


def settings_for(table: str, dataset: str, column: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The settings a column's runs use: the dataset's, the column's own (:func:`column_settings`), then ``--set``."""
    return {**SETTINGS[dataset], **column_settings(table, dataset, column), **(overrides or {})}


def layerwise_epochs(settings: dict[str, Any], model: str, epochs: int) -> list[int]:
    """Epochs of each layer-wise stage: the recurrent layer, then each layer of the head."""
    head_layers = 2 if model == "rnn2" else 1
    rnn = min(max(1, round(settings["rnn_fraction"] * epochs)), epochs - head_layers)
    head = [(epochs - rnn) // head_layers] * head_layers
    head[-1] += epochs - rnn - sum(head)
    stages = [rnn, *head]
    if min(stages) < 1:
        raise ValueError(f"--epochs {epochs} is too few for the {len(stages)} layer-wise stages of {model}.")
    return stages


def model_kwargs(settings: dict[str, Any], input_size: int, **extra: Any) -> dict[str, Any]:
    """``create_model`` keyword arguments of the recurrent zoo models with a run's settings (:func:`settings_for`)."""
    return dict(
        input_size=input_size,
        hidden_size=HIDDEN,
        nonlinearity=settings["nonlinearity"],
        init_scale=settings["init_scale"],
        input_init_scale=settings.get("input_init_scale"),
        bias_init_scale=settings.get("bias_init_scale"),
        feature_norm=settings.get("feature_norm"),
        **extra,
    )


# ---------------------------------------------------------------------------------------------------- data
def make_datamodule(dataset: str, data_dir: str, seed: int, quick: bool, **overrides: Any) -> Any:
    """The dataset's LightningDataModule (``quick``: small seeded subsets)."""
    from lightning_tpsgd.data import EEGSeizureDataModule, Sentiment140DataModule, SeqMNISTDataModule

    common: dict[str, Any] = dict(data_dir=data_dir, batch_size=BATCH, seed=seed)
    if quick:  # a few batches per split: checks that everything runs, in about a minute for all runs
        common.update(train_subset=512, test_subset=256)
        if dataset != "eeg":  # EEG's default validation holdout is already small
            common.update(val_size=256)
    common.update(overrides)
    if dataset in ("rows", "pixels"):
        return SeqMNISTDataModule(mode=dataset, source="npz", **common)
    if dataset == "eeg":
        return EEGSeizureDataModule(**common)
    if dataset == "twitter":
        return Sentiment140DataModule(**common)
    raise ValueError(f"Unknown dataset {dataset!r}; choose from {', '.join(DATASETS)}.")


# ---------------------------------------------------------------------------------------------------- runs
class _EpochLog:
    """A Lightning callback recording the wall and CPU time of each training epoch and the validation accuracy."""

    def __new__(cls) -> Any:
        import lightning as L

        class EpochLog(L.Callback):
            def __init__(self) -> None:
                self.times: list[float] = []
                self.cpu_times: list[float] = []
                self.val_acc: list[float] = []
                self._start = self._start_cpu = 0.0

            def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
                self._start, self._start_cpu = time.perf_counter(), time.process_time()

            def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
                self.times.append(time.perf_counter() - self._start)
                self.cpu_times.append(time.process_time() - self._start_cpu)

            def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
                if not trainer.sanity_checking and "val_acc" in trainer.callback_metrics:
                    self.val_acc.append(100 * float(trainer.callback_metrics["val_acc"]))

        return EpochLog()


def _strategy(column: str, model: str, settings: dict[str, Any], epochs: int) -> Any:
    """Lightning's default strategy for BP; the tpSGD strategy (layer-wise for a trained RNN) otherwise."""
    from lightning_tpsgd import TPSGDStrategy

    if column == "bp":
        return "auto"
    if column == "random_rnn":  # the frozen RNN is no block: the head trains alone (hidden layers by l2)
        return TPSGDStrategy(rule="l2")
    return TPSGDStrategy(
        rule="l2",
        overrides={"net.0": {"rule": column, "target_scale": settings["target_scale"]}},
        schedule="layerwise",
        epochs_per_layer=layerwise_epochs(settings, model, epochs),
    )


def run_one(
    table: str,
    dataset: str,
    column: str,
    seed: int,
    epochs: int,
    data_dir: str,
    quick: bool,
    accelerator: str = "cpu",
    overrides: dict[str, Any] | None = None,
) -> dict:
    """Train (unless ``column == "random"``) and test one network; returns accuracy, timings and the device.

    ``overrides``: the ``--set`` settings of a probe, over :func:`settings_for`'s.
    """
    import lightning as L

    from zoo import SequenceClassifier

    L.seed_everything(seed, verbose=False)
    dm = make_datamodule(dataset, data_dir, seed, quick)
    settings = settings_for(table, dataset, column, overrides)
    module = SequenceClassifier(
        model=TABLES[table],
        num_classes=dm.num_classes,
        model_kwargs=model_kwargs(settings, dm.input_size, freeze_rnn=column == "random_rnn"),
        lr=settings["lr"],
        scheduler=settings.get("scheduler"),
        layer_lr={"net.0": settings["rnn_lr"]} if settings.get("rnn_lr") is not None else None,
    )
    log = _EpochLog()
    trainer = quiet_trainer(
        accelerator=accelerator,
        devices=1,
        max_epochs=epochs,
        strategy=_strategy(column, TABLES[table], settings, epochs),
        gradient_clip_val=settings.get("bp_grad_clip") if column == "bp" else None,
        callbacks=[log],
    )
    start = time.perf_counter()
    if column != "random":
        trainer.fit(module, datamodule=dm)
    fit_s = time.perf_counter() - start
    test = trainer.test(module, datamodule=dm, verbose=False)[0]
    return {
        "acc": 100 * test["test_acc"],
        "fit_s": fit_s,
        "epoch_s": log.times,
        "val_acc": log.val_acc,
        "device": _device_name(trainer.strategy.root_device),
        "settings": settings,
    }


def _device_name(device: torch.device) -> str:
    """E.g. ``"cpu, torch 2.14.1"`` or ``"NVIDIA H200, torch 2.11.0"``: where a run was measured."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return f"{name}, torch {torch.__version__.split('+')[0]}"


def _key(
    table: str, dataset: str, column: str, seed: int, epochs: int, quick: bool, overrides: dict | None = None
) -> str:
    """E.g. ``5/rows/l1/0/e20``; a probe with changed settings adds them: ``5/rows/l1/0/e20/rnn_fraction=0.5``."""
    probe = ",".join(f"{k}={json.dumps(v)}" for k, v in sorted((overrides or {}).items()))
    return f"{table}/{dataset}/{column}/{seed}/e{epochs}" + ("/quick" if quick else "") + (f"/{probe}" if probe else "")


def accuracy_part(args: argparse.Namespace, store: dict) -> None:
    results = store.setdefault("accuracy", {})
    for table in args.tables:
        for dataset in args.datasets:
            for column in args.columns:
                for seed in args.seed_ids or range(args.seeds):
                    key = _key(table, dataset, column, seed, args.epochs, args.quick, args.overrides)
                    if key in results:
                        continue
                    out = run_one(
                        table,
                        dataset,
                        column,
                        seed,
                        args.epochs,
                        args.data_dir,
                        args.quick,
                        args.accelerator,
                        args.overrides,
                    )
                    results[key] = out
                    print(f"{key}: {out['acc']:.2f}% in {out['fit_s']:.0f}s", flush=True)
                    _save(store, args.store)


def _probe_settings(suffix: str) -> dict[str, Any]:
    """``'lr=0.002,rnn_lr=null'`` (the end of a probe's key) -> ``{"lr": 0.002, "rnn_lr": None}``."""
    return {key: json.loads(value) for key, _, value in (pair.partition("=") for pair in suffix.split(","))}


def adopt_column_settings(store: dict) -> list[tuple[str, str]]:
    """Key the runs by ``COLUMN_SETTINGS``: returns the ``(old key, new key)`` moves.

    A table run of a column made before the column got its own settings moves to a probe key naming its
    settings then (``5/pixels/bp/0/e20`` -> ``5/pixels/bp/0/e20/lr=0.002``); a probe run with exactly the
    column's settings becomes the table run of its seed.
    """
    accuracy = store.get("accuracy", {})
    moves: list[tuple[str, str]] = []
    for key in sorted(accuracy):
        parts = key.split("/", 5)
        own = column_settings(*parts[:3])
        if not own or "/quick" in key:
            continue
        if len(parts) == 5:  # a run without recorded settings had the dataset's, as the tables assume
            then = {k: accuracy[key].get("settings", SETTINGS[parts[1]]).get(k) for k in own}
            if then != own:
                moves.append((key, _key(*parts[:3], int(parts[3]), int(parts[4][1:]), False, then)))
        elif _probe_settings(parts[5]) == own:
            base = "/".join(parts[:5])
            if accuracy.get(base) == accuracy[key]:  # merged again after an earlier move: a duplicate
                del accuracy[key]
            else:
                moves.append((key, base))
    staying = set(accuracy) - {old for old, _ in moves}  # table runs leave their keys, so a probe can take one
    news = [new for _, new in moves]
    for old, new in moves:
        if new in staying or news.count(new) > 1:
            raise ValueError(f"Cannot move {old} to {new}: another run is stored there already.")
    runs = {old: accuracy.pop(old) for old, _ in moves}
    accuracy.update({new: runs[old] for old, new in moves})
    return moves


def merge_stores(store: dict, paths: list[str]) -> None:
    """Add the runs saved in other result files (e.g. parallel runs on another machine); kept entries win.

    Accuracy runs and speed entries are merged one by one, other parts (``memory``, ``memory/cuda``) whole. A run
    stored already under another key (moved there by :func:`adopt_column_settings`) is not added again.
    """
    for path in paths:
        other = json.loads(Path(path).read_text())
        for part, entries in other.items():
            if part in ("accuracy", "speed"):
                mine = store.setdefault(part, {})
                stored = [*mine.values()]
                added = [key for key in entries if key not in mine and entries[key] not in stored]
                mine.update({key: entries[key] for key in added})
                print(f"{path}: merged {len(added)} of {len(entries)} {part} entries", flush=True)
            elif part == "commands":
                for name, commands in entries.items():
                    mine = store.setdefault(part, {}).setdefault(name, [])
                    mine += [c for c in commands if c not in mine]
            elif part not in store:
                store[part] = entries
                print(f"{path}: merged {part}", flush=True)


# ---------------------------------------------------------------------------------------------------- speed
def speed_part(args: argparse.Namespace, store: dict) -> None:
    """Seconds per training epoch of the local step (RNN and classifier trained every batch) and of BPTT.

    The same rnn1 model and data, in this process, interleaved over rounds so that drifts in machine load
    hit all methods alike. Each epoch is timed in wall-clock and in process CPU time (the latter is robust to
    other processes sharing the cores when ``--threads 1``). The speed-ups are the medians over rounds of the
    per-round ratios BPTT / local.
    """
    import lightning as L

    from lightning_tpsgd import TPSGDStrategy
    from zoo import SequenceClassifier

    results = store.setdefault("speed", {})
    rounds = args.speed_rounds or (1 if args.quick else 3)
    # local-bf16: grad_dtype="bfloat16"; the -amp pair runs under Trainer(precision="bf16-mixed");
    # local-layerwise: the tables' layer-wise schedule, one epoch of its RNN stage, then one of its head stage
    methods = ("local", "local-bf16", "bptt", "local-amp", "bptt-amp", "local-layerwise")
    for dataset in args.datasets:
        dm = make_datamodule(dataset, args.data_dir, 0, quick=False)
        wall: dict[str, list[float]] = {m: [] for m in (*methods, "local-head")}
        cpu: dict[str, list[float]] = {m: [] for m in (*methods, "local-head")}
        settings = settings_for("5", dataset, "l1", args.overrides)  # the local step trains the RNN by l1
        rnn_epochs = layerwise_epochs(settings, "rnn1", args.epochs)[0]
        for _ in range(rounds):
            for method in methods:
                L.seed_everything(0, verbose=False)
                grad_dtype = "bfloat16" if method == "local-bf16" else None
                kwargs = model_kwargs(settings, dm.input_size, grad_dtype=grad_dtype)
                module = SequenceClassifier("rnn1", num_classes=dm.num_classes, model_kwargs=kwargs)
                local = method.startswith("local")
                layerwise = method == "local-layerwise"
                strategy = (
                    TPSGDStrategy(
                        rule="l2",
                        overrides={"net.0": {"rule": "l1"}},
                        **({"schedule": "layerwise", "epochs_per_layer": [1, 1]} if layerwise else {}),
                    )
                    if local
                    else "auto"
                )
                log = _EpochLog()
                trainer = quiet_trainer(
                    accelerator=args.accelerator,
                    devices=1,
                    max_epochs=2 if layerwise else 1,
                    strategy=strategy,
                    precision="bf16-mixed" if method.endswith("-amp") else "32-true",
                    callbacks=[log],
                    limit_train_batches=args.speed_batches,
                    limit_val_batches=0,
                )
                trainer.fit(module, datamodule=dm)
                wall[method].append(log.times[0])
                cpu[method].append(log.cpu_times[0])
                if layerwise:
                    wall["local-head"].append(log.times[1])
                    cpu["local-head"].append(log.cpu_times[1])
        # the mean epoch of the tables' schedule: rnn_epochs RNN-stage epochs, the rest head-stage epochs
        for times in (wall, cpu):
            times["local-schedule"] = [
                (rnn_epochs * r + (args.epochs - rnn_epochs) * h) / args.epochs
                for r, h in zip(times["local-layerwise"], times["local-head"], strict=True)
            ]

        def speedup(times: dict[str, list[float]], method: str, baseline: str = "bptt") -> float:
            return statistics.median(b / a for a, b in zip(times[method], times[baseline], strict=True))

        batches = min(args.speed_batches or len(dm.train_dataloader()), len(dm.train_dataloader()))
        key = dataset if args.accelerator == "cpu" else f"{dataset}/{args.accelerator}"
        threads = torch.get_num_threads()
        results[key if threads == 1 or args.accelerator != "cpu" else f"{key}/{threads} threads"] = {
            "device": _device_name(trainer.strategy.root_device),
            "local_s": statistics.median(wall["local"]),
            "local_bf16_s": statistics.median(wall["local-bf16"]),
            "bptt_s": statistics.median(wall["bptt"]),
            "speedup": speedup(wall, "local"),
            "speedup_bf16": speedup(wall, "local-bf16"),
            "local_cpu_s": statistics.median(cpu["local"]),
            "local_bf16_cpu_s": statistics.median(cpu["local-bf16"]),
            "bptt_cpu_s": statistics.median(cpu["bptt"]),
            "speedup_cpu": speedup(cpu, "local"),
            "speedup_bf16_cpu": speedup(cpu, "local-bf16"),
            "local_amp_s": statistics.median(wall["local-amp"]),
            "bptt_amp_s": statistics.median(wall["bptt-amp"]),
            "speedup_amp": speedup(wall, "local-amp", "bptt-amp"),
            "speedup_amp_cpu": speedup(cpu, "local-amp", "bptt-amp"),
            "layerwise_rnn_s": statistics.median(wall["local-layerwise"]),
            "layerwise_head_s": statistics.median(wall["local-head"]),
            "layerwise_schedule": [rnn_epochs, args.epochs - rnn_epochs],
            "speedup_rnn_stage": speedup(wall, "local-layerwise"),
            "speedup_rnn_stage_cpu": speedup(cpu, "local-layerwise"),
            "speedup_schedule": speedup(wall, "local-schedule"),
            "speedup_schedule_cpu": speedup(cpu, "local-schedule"),
            "batches": batches,
            "rounds": rounds,
            "threads": threads,
        }
        print(f"speed {dataset}: {json.dumps(results)}", flush=True)
        _save(store, args.store)


# ---------------------------------------------------------------------------------------------------- memory
def memory_child(method: str, data_dir: str, accelerator: str = "cpu", steps: int = 2) -> None:
    """Runs in a fresh process: extra peak RSS and autograd-held bytes of a training step at T=784.

    On CUDA it also reports the peak of ``torch.cuda.max_memory_allocated`` above the memory held before the
    measured steps (model, optimizer state, batch).
    """
    from lightning_tpsgd import LocalLearner
    from zoo import create_model

    torch.set_num_threads(1)
    dm = make_datamodule("pixels", data_dir, 0, quick=True, pixel_pool=1, test_subset=BATCH, train_subset=BATCH)
    dm.setup()
    x, y = dm.test_dataset.tensors
    del dm
    device = torch.device("cuda" if accelerator in ("cuda", "gpu") else accelerator)
    x, y = x.to(device), y.to(device)
    torch.manual_seed(0)
    model = create_model("rnn1", num_classes=10, input_size=1, hidden_size=HIDDEN, nonlinearity="tanh").to(device)
    if method == "local":
        learner = LocalLearner(
            model, rule="l2", overrides={"0": {"rule": "l1"}}, optimizer=lambda p: torch.optim.Adam(p, lr=1e-3)
        )
        run = learner.step
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

        def run(x: torch.Tensor, y: torch.Tensor) -> None:
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            optimizer.step()

    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    run(x, y)  # warm-up: optimizer state, projections and thread pools exist afterwards
    gc.collect()
    if cuda:
        sync()
        torch.cuda.reset_peak_memory_stats()
        cuda_base = torch.cuda.memory_allocated()
    base = reset_peak_rss()
    start = time.perf_counter()
    for _ in range(steps):
        run(x, y)
    sync()
    step_s = (time.perf_counter() - start) / steps
    peak = status_bytes("VmHWM")
    result = {"extra_peak_rss": peak - base, "step_s": step_s}
    if cuda:
        result["cuda_peak"] = torch.cuda.max_memory_allocated() - cuda_base
    meter = SavedTensorMeter()
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
        run(x, y)
    print(json.dumps({**result, "autograd_peak": meter.peak}))


def memory_part(args: argparse.Namespace, store: dict) -> None:
    key = "memory" if args.accelerator == "cpu" else f"memory/{args.accelerator}"
    results = store.setdefault(key, {})
    for method in ("local", "bptt"):
        cmd = [sys.executable, "-m", f"benchmarks.{NAME}", "--memory-child", method, "--data-dir", args.data_dir]
        cmd += ["--accelerator", args.accelerator]
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # RSS follows allocations (no arena slack)
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=Path(__file__).parents[1], env=env)
        results[method] = json.loads(out.stdout.strip().splitlines()[-1])
    local, bptt = results["local"], results["bptt"]
    results["rss_ratio"] = local["extra_peak_rss"] / bptt["extra_peak_rss"]
    results["autograd_ratio"] = local["autograd_peak"] / max(bptt["autograd_peak"], 1)
    if "cuda_peak" in local:
        results["cuda_ratio"] = local["cuda_peak"] / max(bptt["cuda_peak"], 1)
    print("memory (T=784):", json.dumps(results), flush=True)
    _save(store, args.store)


# ---------------------------------------------------------------------------------------------------- report
def _save(store: dict, path: str | None = None) -> None:
    target = Path(path) if path else RESULTS / f"{NAME}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(store, indent=1, sort_keys=True))


def _runs(store: dict, table: str, dataset: str, column: str, epochs: int, quick: bool) -> list[dict]:
    suffix = f"/e{epochs}" + ("/quick" if quick else "")
    prefix = f"{table}/{dataset}/{column}/"
    return [v for k, v in store.get("accuracy", {}).items() if k.startswith(prefix) and k.endswith(suffix)]


def _mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {std:.2f}"


def write_report(store: dict, args: argparse.Namespace, command: str) -> None:
    lines = [
        "# Recurrent networks trained with local targets: paper Tables 5, 7 and 8",
        "",
        f"Command: `{command}`  ",
        *[
            f"Earlier, for `{part}`: `{c}`  "
            for part, cs in store.get("commands", {}).items()
            for c in cs
            if c != command
        ],
        f"Machine: {os.cpu_count()} CPU cores, torch {torch.__version__}; each run's torch threads are in its command "
        "(`--threads`), its device in the runs' JSON.  ",
        f"Settings: hidden size {HIDDEN}, batch {BATCH}, {args.epochs} epochs, Adam; "
        f"{'**quick mode: small subsets, not comparable with the paper**' if args.quick else 'full datasets'}.",
        "",
        "Each cell: our test accuracy (%), mean ± std over seeds (n = number of runs), then the paper's number.",
        "Trained-RNN columns: the recurrent layer is trained first by its local rule (`rnn_fraction` of the epochs),",
        "then the classifier (layer-wise schedule, paper §2.2). Random RNN + classifier: the head trains all epochs.",
        "BP: BPTT with the gradient norm clipped at 1 (the plain BPTT runs are in the probes table, keys ending",
        "`bp_grad_clip=null`: 5 of their 18 runs collapsed, to 10-55 %). BP and DRTP have settings of their own,",
        "chosen on the validation holdout (last table of this report); their runs at the dataset's settings, which",
        'were chosen for ℓ1, are in the probes table (BP `lr=0.002` / `lr=0.001`; DRTP `nonlinearity="tanh"`,',
        "`rnn_fraction=0.25,rnn_lr=null`).",
        "The seeds vary the initial weights, the data order and the validation holdout; the target projections",
        "are drawn with the strategy's default `seed=0` in every run, so the ℓ1 runs of a dataset share their targets",
        "(which may be why their test accuracies lie so close together).",
        "UCF101 and Twitter (Word2Vec) rows of the paper are not reproduced: their pre-extracted features are "
        "not available offline.",
        "",
        *_device_lines(store, args),
    ]
    cell_runs: dict[tuple[str, str, str], list[dict]] = {}  # each table cell's runs, for the tables and the seeds
    for table in args.tables:
        lines += [f"## {TABLE_TITLES[table]} (`{TABLES[table]}`)", ""]
        lines.append("| dataset | " + " | ".join(COLUMN_TITLES[c] for c in COLUMNS) + " |")
        lines.append("|---|" + "---|" * len(COLUMNS))
        for dataset in args.datasets:
            cells = []
            for i, column in enumerate(COLUMNS):
                runs = cell_runs[table, dataset, column] = _runs(store, table, dataset, column, args.epochs, args.quick)
                cell = _mean_std([r["acc"] for r in runs]) + (f" (n={len(runs)})" if runs else "")
                cells.append(f"{cell}<br>paper {PAPER[(table, dataset)][i]:.2f}")
            lines.append(f"| {DATASET_TITLES[dataset]} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += _seed_lines(cell_runs)
    lines += _target_lines(store, args)
    lines += _crosscheck_lines(store)
    lines += _probe_lines(store)
    lines += _comparison_lines(store, args)
    lines += _timing_lines(store, args)
    lines += ["", "### Settings per dataset", "", "| dataset | settings | a column's own settings |", "|---|---|---|"]
    for d in args.datasets:
        own = [f"{c}: `{json.dumps(by[d])}`" for c, by in COLUMN_SETTINGS.items() if by.get(d)]
        own += [
            f"{c}, Table {t}: `{json.dumps(by[f'{t}/{d}'])}`"
            for c, by in COLUMN_SETTINGS.items()
            for t in TABLES
            if by.get(f"{t}/{d}")
        ]
        lines.append(f"| {d} | `{json.dumps(SETTINGS[d])}` | {'<br>'.join(own) or '–'} |")
    report = _report_path(args)
    lines += ["", f"![accuracy per table]({report.with_suffix('.png').name})", ""]
    report.write_text("\n".join(lines))
    _plot(store, args, report.with_suffix(".png"))
    print("\n".join(lines))


def _seed_lines(cell_runs: dict[tuple[str, str, str], list[dict]]) -> list[str]:
    """The table cells (``(table, dataset, column)`` -> runs) with fewer runs than most cells, with a run's cost."""
    sizes = [len(runs) for runs in cell_runs.values() if runs]
    most = statistics.mode(sizes) if sizes else 0
    fewer = []
    for (table, dataset, column), runs in cell_runs.items():
        if 0 < len(runs) < most:
            times = [r["fit_s"] for r in runs if "fit_s" in r]
            devices = ", ".join(sorted({r.get("device", "a device not recorded") for r in runs}))
            cost = f"{statistics.mean(times) / 60:.0f} min a run on {devices}" if times else devices
            fewer.append(f"Table {table} {DATASET_TITLES[dataset]} {COLUMN_TITLES[column]} (n={len(runs)}, {cost})")
    if not fewer:
        return []
    return [
        f"Cells with fewer runs than the {most} of most cells, their other seeds still to be run (each run's torch",
        "threads are in its command): " + "; ".join(fewer) + ".",
        "",
    ]


def _device_lines(store: dict, args: argparse.Namespace) -> list[str]:
    """Where the accuracy runs of each dataset were measured (runs saved before devices were recorded: CPU)."""
    lines = []
    for dataset in args.datasets:
        counts: dict[str, int] = {}
        for table in args.tables:
            for column in COLUMNS:
                for run in _runs(store, table, dataset, column, args.epochs, args.quick):
                    device = run.get("device", "cpu")
                    counts[device] = counts.get(device, 0) + 1
        if counts:
            where = ", ".join(f"{device} ({n} runs)" for device, n in sorted(counts.items()))
            lines.append(f"- {DATASET_TITLES[dataset]}: {where}")
    if not lines:
        return []
    return [
        "Where the runs were measured (a run's accuracy does not depend on the device beyond rounding):",
        "",
        *lines,
        "",
    ]


def _best(*values: float) -> float:
    """The largest of the values that were measured (NaN: not run); NaN if none was."""
    measured = [v for v in values if v == v]
    return max(measured) if measured else float("nan")


def _crosscheck_lines(store: dict) -> list[str]:
    """Runs saved in other ``rnn_tables_*.json`` files beside the store, next to the store's run of the same key.

    E.g. ``rnn_tables_h200.json`` (the runs as they came from a GPU) and ``rnn_tables_cpu_check.json`` (the same
    seeds rerun on the CPU): the same settings on another device, or a rerun.
    """
    accuracy = store.get("accuracy", {})
    rows = []
    for path in sorted(RESULTS.glob(f"{NAME}_*.json")):
        for key, run in sorted(json.loads(path.read_text()).get("accuracy", {}).items()):
            mine = accuracy.get(key)
            if mine is None or mine is run or mine == run:
                continue  # not in the table, or the very run the table shows
            rows.append(
                f"| `{key}` | {mine['acc']:.2f} ({mine.get('device', 'cpu')}) | {run['acc']:.2f} "
                f"({run.get('device', 'cpu')}) | `{path.name}` |"
            )
    if not rows:
        return []
    return [
        "## Reruns of table runs (other devices or processes)",
        "",
        "| run | in the tables | rerun | file |",
        "|---|---|---|---|",
        *rows,
        "",
    ]


def _probe_lines(store: dict) -> list[str]:
    """Runs with changed settings (``--set``), beside the run of the same seed with the table's settings."""
    accuracy = store.get("accuracy", {})

    def accuracies(run: dict | None) -> str:
        if run is None:
            return "– | –"
        val = f"{run['val_acc'][-1]:.2f}" if run.get("val_acc") else "–"
        device = run.get("device", "cpu").split(",")[0].replace("NVIDIA ", "")
        return f"{val} | {run['acc']:.2f} ({device})"

    rows = []
    for key, run in sorted(accuracy.items()):
        parts = key.split("/", 5)  # table/dataset/column/seed/e<epochs>[/quick][/changed settings]
        changed = parts[5] if len(parts) > 5 else ""
        if not changed or changed == "quick" or changed.startswith("quick/"):
            continue  # a table run, or a probe of quick mode
        base = "/".join(parts[:5])
        rows.append(f"| `{base}` | `{changed}` | {accuracies(run)} | {accuracies(accuracy.get(base))} |")
    if not rows:
        return []
    return [
        "## Validation probes and earlier settings",
        "",
        "Runs whose settings differ from the table's (`--set` probes, and table runs made before a setting",
        "changed), beside the run of the same seed with the table's settings. Settings were chosen on the",
        "validation holdout (accuracy after the last epoch); the test accuracy (device) is shown for completeness.",
        "",
        "| run | changed settings | validation | test | validation, table's settings | test, table's settings |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
    ]


def _signed(value: float) -> str:
    return f"{value:+.2f}" if value == value else "–"


def _target_lines(store: dict, args: argparse.Namespace) -> list[str]:
    lines = ["## Targets of the issue (single-layer RNN, best of tpSGD-ℓ1 and DRTP)", ""]
    lines += ["| dataset | target | DRTP | tpSGD-ℓ1 | random RNN + classifier | met |", "|---|---|---|---|---|---|"]
    for dataset in args.datasets:
        means = {}
        for column in ("drtp", "l1", "random_rnn"):
            runs = _runs(store, "5", dataset, column, args.epochs, args.quick)
            means[column] = statistics.mean(r["acc"] for r in runs) if runs else float("nan")
        best = _best(means["drtp"], means["l1"])
        met = "yes" if best >= TARGETS[dataset] else ("–" if best != best else "no")
        lines.append(
            f"| {DATASET_TITLES[dataset]} | ≥ {TARGETS[dataset]:.0f} | {means['drtp']:.2f} | {means['l1']:.2f} "
            f"| {means['random_rnn']:.2f} | {met} |"
        )
    return [*lines, ""]


#: Settings that change the network itself rather than its training: a column with its own value of one of them is
#: compared with a random RNN + classifier built the same way (a probe run of that column with these settings).
ARCHITECTURE_KEYS = ("nonlinearity", "init_scale", "input_init_scale", "bias_init_scale", "feature_norm")


def control_overrides(table: str, dataset: str, column: str) -> dict[str, Any]:
    """The ``--set`` settings of the random-RNN control of ``column``: its own architecture settings, if any."""
    return {key: value for key, value in column_settings(table, dataset, column).items() if key in ARCHITECTURE_KEYS}


def _control_runs(store: dict, table: str, dataset: str, column: str, epochs: int, quick: bool) -> list[dict]:
    """The random RNN + classifier runs that ``column`` is compared with (see :func:`control_overrides`)."""
    overrides = control_overrides(table, dataset, column)
    if not overrides:
        return _runs(store, table, dataset, "random_rnn", epochs, quick)
    accuracy = store.get("accuracy", {})
    probe = _key(table, dataset, "random_rnn", 0, epochs, quick, overrides).split("/", 5)[5]
    prefix = f"{table}/{dataset}/random_rnn/"
    return [
        run for key, run in accuracy.items() if key.startswith(prefix) and key.split("/", 4)[4] == f"e{epochs}/{probe}"
    ]


def _comparison_lines(store: dict, args: argparse.Namespace) -> list[str]:
    """Trained RNN vs its random-RNN control, and stacked / bidirectional vs single-layer (per trained column)."""

    def mean(table: str, dataset: str, column: str, split: str = "test") -> float:
        if column.startswith("control:"):  # the random RNN + classifier that column is compared with
            runs = _control_runs(store, table, dataset, column.split(":")[1], args.epochs, args.quick)
        else:
            runs = _runs(store, table, dataset, column, args.epochs, args.quick)
        if split == "validation":  # the accuracy after the last epoch on the validation holdout
            runs = [{"acc": r["val_acc"][-1]} for r in runs if r.get("val_acc")]
        return statistics.mean(r["acc"] for r in runs) if runs else float("nan")

    lines = [
        "## Trained vs random RNN, and stacked / bidirectional vs single-layer",
        "",
        "Margins in points of test accuracy (means over seeds). vs random: trained column minus the random RNN +",
        "classifier column of the same table (also on the validation holdout, after the last epoch). Where a",
        "column's own settings change the network (DRTP's sigmoid cell on pixels, its standardised features in Table",
        "7 on Twitter: `feature_norm`), its control is a random RNN + classifier",
        "built the same way: the `random_rnn` probe runs with those settings (the probes table lists them).",
        "vs single-layer: the column in this table minus the same column in Table 5 (best: best trained column",
        "minus Table 5's best trained one). EEG's test split has 920 sequences, so one run's test accuracy near",
        "92 % carries a standard error of about 0.9 points.",
        "",
        "| table | dataset | DRTP vs random | DRTP vs random, validation | tpSGD-ℓ1 vs random "
        "| tpSGD-ℓ1 vs random, validation | DRTP vs single-layer | tpSGD-ℓ1 vs single-layer | best vs single-layer |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    short = []  # stacked / bidirectional cells more than 2 points below their single-layer column
    for table in args.tables:
        for dataset in args.datasets:
            margins = [
                mean(table, dataset, column, split) - mean(table, dataset, f"control:{column}", split)
                for column in ("drtp", "l1")
                for split in ("test", "validation")
            ]
            vs_single = [float("nan")] * 3
            if table != "5":
                here, single = ([mean(t, dataset, column) for column in ("drtp", "l1")] for t in (table, "5"))
                vs_single = [a - b for a, b in zip(here, single, strict=True)] + [_best(*here) - _best(*single)]
                short += [
                    f"{name} in Table {table} on {DATASET_TITLES[dataset]} ({margin:+.2f})"
                    for name, margin in zip(("DRTP", "tpSGD-ℓ1"), vs_single[:2], strict=True)
                    if margin < -2
                ]
            lines.append(
                f"| {table} | {DATASET_TITLES[dataset]} | " + " | ".join(map(_signed, margins + vs_single)) + " |"
            )
    if short:
        lines += ["", "More than 2 points below the single-layer network: " + "; ".join(short) + "."]
    lines += [
        "",
        "EEG: the random RNN + classifier control is strong here (see its column in the tables above), as the paper",
        'found: "We see significant improvement in all cases except the Seizure Activity Recognition dataset where',
        "even random features achieve relatively high performance\" (§3.3). DRTP: at the dataset's settings its tanh",
        "units saturate and its features collapse (`benchmarks/results/rnn_saturation.md`, `python -m",
        "benchmarks.rnn_saturation`); its column's own settings avoid that: the paper's sigmoid cell on pixels, one",
        "RNN epoch at a small `rnn_lr` on EEG and Twitter.",
        "",
        "Table 7, DRTP on pixels: with 5 RNN epochs (the dataset's `rnn_fraction` 0.25) the stacked network fell",
        "7.5 points below the single-layer one (53.01 ± 4.21 %, 2 seeds, against 60.54 ± 0.49 %). Its second",
        "sigmoid layer's final state, which the head reads, was more saturated and carried less of the class than",
        "the first layer's (seed 0, after the 5 RNN epochs: 88.5 % of the states within 0.01 of 0 or 1 against",
        "64.9 %, linear probe 54.5 % against 60.1 %; `python -m benchmarks.rnn_saturation --dataset pixels --model",
        "rnn2 --epochs 5 --train-subset 0`), and both probes were still rising in the 5th epoch (44.5 -> 54.5 % and",
        "50.4 -> 60.1 %). Probes on the validation holdout (seed 0) that did not close the gap: standardised",
        "features (`feature_norm`) 51.2 % against 49.6 %, `rnn_lr` 5e-4 49.6 %, `rnn_lr` 2e-4 10.5 % (the units",
        "never leave their constant initial state). Training the RNN for 10 of the 20 epochs did (`rnn_fraction`",
        "0.5; validation, seed 0: Table 7 49.6 -> 64.7 %, Table 5 59.5 -> 68.1 %), so it is DRTP's setting on",
        "pixels in all three tables; the runs with 5 RNN epochs stay in the probes table.",
    ]
    return [*lines, ""]


def _timing_lines(store: dict, args: argparse.Namespace) -> list[str]:
    lines = ["## Time per training epoch and memory vs BPTT", ""]
    speed = store.get("speed", {})
    if speed:
        lines += [
            "Same rnn1 model (hidden 512, batch 128) in one process, the local step training the RNN (ℓ1) and the",
            "classifier on every batch. Methods interleaved over rounds; times are medians over rounds, speed-ups",
            "the medians of the per-round ratios BPTT / local, in wall-clock time and in process CPU time (the",
            "latter is insensitive to other processes on a shared machine when run with `--threads 1`).",
            "",
            '`local-bf16`: the same local step with `grad_dtype="bfloat16"` (the pseudo-gradient products',
            "in bfloat16, the forward pass unchanged in float32), against float32 BPTT. `bf16-mixed`: both",
            '`Trainer(precision="bf16-mixed")`, the local step against BPTT, each under bfloat16 autocast.',
            "",
            "| dataset | device | batches | threads | BPTT (s) | local (s) | speed-up (wall / CPU) | local-bf16 (s) "
            "| speed-up (wall / CPU) | bf16-mixed: BPTT (s) | local (s) | speed-up (wall / CPU) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for dataset, r in speed.items():

            def ratio(key: str, r: dict = r) -> str:  # older results lack CPU times or the bf16-mixed pair
                wall = f"{r[key]:.2f}×" if key in r else "–"
                return f"{wall} / {r[key + '_cpu']:.2f}×" if key + "_cpu" in r else f"{wall} / –"

            def seconds(key: str, r: dict = r) -> str:
                return f"{r[key]:.1f}" if key in r else "–"

            lines.append(
                f"| {DATASET_TITLES.get(dataset.split('/')[0], dataset)} | {r.get('device', 'cpu')} "
                f"| {r['batches']} | {r.get('threads', '–')} "
                f"| {r['bptt_s']:.1f} | {r['local_s']:.1f} | {ratio('speedup')} "
                f"| {r['local_bf16_s']:.1f} | {ratio('speedup_bf16')} "
                f"| {seconds('bptt_amp_s')} | {seconds('local_amp_s')} | {ratio('speedup_amp')} |"
            )
        lines.append("")
        layerwise = {d: r for d, r in speed.items() if "speedup_schedule" in r}
        if layerwise:
            lines += [
                "The tables train layer-wise (`--parts accuracy`): the RNN alone for its stage's epochs (the head is",
                "not computed), then the head with the RNN frozen (its forward pass only, no pseudo-gradients). Same",
                "process and rounds as above, float32; the schedule's mean epoch weights the two stages by their",
                "epochs in the tables' 20-epoch schedule.",
                "",
                "| dataset | threads | schedule (RNN + head epochs) | BPTT (s) | RNN stage (s) | speed-up (wall / CPU) "
                "| head stage (s) | mean epoch of the schedule: speed-up (wall / CPU) |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for dataset, r in layerwise.items():
                rnn, head = r["layerwise_schedule"]
                lines.append(
                    f"| {DATASET_TITLES.get(dataset.split('/')[0], dataset)} | {r['threads']} | {rnn} + {head} "
                    f"| {r['bptt_s']:.1f} | {r['layerwise_rnn_s']:.1f} "
                    f"| {r['speedup_rnn_stage']:.2f}× / {r['speedup_rnn_stage_cpu']:.2f}× "
                    f"| {r['layerwise_head_s']:.1f} "
                    f"| {r['speedup_schedule']:.2f}× / {r['speedup_schedule_cpu']:.2f}× |"
                )
            lines.append("")
    for key in sorted(k for k in store if k.startswith("memory")):
        mem = store[key]
        if "local" not in mem:
            continue
        cuda = "cuda_peak" in mem["local"]
        lines += [
            "One training step of rnn1 at Seq-MNIST pixels without downsampling (T=784, hidden 512, batch 128),",
            f"each method in a fresh process, on {'CUDA' if cuda else 'the CPU'}:",
            "",
            "| method | bytes held by autograd (MB) | extra peak RSS (MB) | "
            + ("CUDA peak above model + batch (MB) | " if cuda else "")
            + "step (s) |",
            "|---|---|---|" + ("---|" if cuda else "") + "---|",
        ]
        for method in ("local", "bptt"):
            r = mem[method]
            held, rss = r["autograd_peak"] / 2**20, r["extra_peak_rss"] / 2**20
            cuda_cell = f"{r['cuda_peak'] / 2**20:.1f} | " if cuda else ""
            lines.append(f"| {method} | {held:.1f} | {rss:.1f} | {cuda_cell}{r['step_s']:.3f} |")
        cuda_ratio = f"{mem['cuda_ratio']:.3f} | " if cuda else ""
        lines += [f"| ratio local / BPTT | {mem['autograd_ratio']:.3f} | {mem['rss_ratio']:.3f} | {cuda_ratio}|", ""]
    return lines


def _report_path(args: argparse.Namespace) -> Path:
    """The markdown report: beside ``--store`` when one is given (so that a side store never overwrites the
    main report), else ``benchmarks/results/rnn_tables.md``; the plot takes the same name with ``.png``."""
    return Path(args.store).with_suffix(".md") if args.store else RESULTS / f"{NAME}.md"


def _plot(store: dict, args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.tables), figsize=(6 * len(args.tables), 4.5), squeeze=False)
    width = 0.8 / len(COLUMNS)
    for ax, table in zip(axes[0], args.tables, strict=True):
        for i, column in enumerate(COLUMNS):
            means, stds = [], []
            for dataset in args.datasets:
                accs = [r["acc"] for r in _runs(store, table, dataset, column, args.epochs, args.quick)]
                means.append(statistics.mean(accs) if accs else 0.0)
                stds.append(statistics.stdev(accs) if len(accs) > 1 else 0.0)
            xs = [j + i * width for j in range(len(args.datasets))]
            ax.bar(xs, means, width, yerr=stds, label=COLUMN_TITLES[column])
            paper = [PAPER[(table, d)][i] for d in args.datasets]
            ax.scatter(xs, paper, marker="_", s=200, color="k", zorder=3, label="paper" if i == 0 else None)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(args.datasets))], args.datasets)
        ax.set_ylim(0, 100)
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(TABLE_TITLES[table].split(":")[0] + f" ({TABLES[table]})")
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.environ.get("TPSGD_DATA_DIR", "../shared/data"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=None, help="epochs per network (default: 20; --quick: 3)")
    parser.add_argument("--tables", nargs="+", default=list(TABLES), choices=list(TABLES))
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--columns", nargs="+", default=list(COLUMNS), choices=list(COLUMNS))
    parser.add_argument(
        "--parts",
        nargs="*",
        default=["accuracy", "speed", "memory"],
        choices=["accuracy", "speed", "memory"],
        help="what to run; no value: only rewrite the report from the saved results",
    )
    parser.add_argument("--speed-batches", type=int, default=None, help="batches per timed epoch (default: all)")
    parser.add_argument("--speed-rounds", type=int, default=None, help="timing rounds (default: 3; --quick: 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true", help="small subsets (labelled in the report)")
    parser.add_argument("--fresh", action="store_true", help="ignore results saved by earlier runs")
    parser.add_argument("--seed-ids", type=int, nargs="+", default=None, help="run these seeds instead of 0..N-1")
    parser.add_argument("--accelerator", default="cpu", help='Lightning accelerator of the runs, e.g. "cuda"')
    parser.add_argument("--store", default=None, help=f"results file (default: benchmarks/results/{NAME}.json)")
    parser.add_argument("--merge", nargs="+", default=[], help="add the accuracy runs of these results files")
    parser.add_argument(
        "--adopt-column-settings",
        action="store_true",
        help="after COLUMN_SETTINGS changed: table runs made with a column's earlier settings become probes, "
        "probes with its current settings table runs",
    )
    parser.add_argument("--no-report", action="store_true", help="do not rewrite the markdown report and plot")
    parser.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="validation probe: change these settings of the datasets run (saved under their own keys, reported "
        "as probes beside the run with the table's settings)",
    )
    parser.add_argument("--memory-child", choices=("local", "bptt"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args.memory_child, args.data_dir, args.accelerator)
        return
    args.overrides = parse_overrides(args.set)
    if args.epochs is None:
        args.epochs = 3 if args.quick else 20
    if args.quick and args.speed_batches is None:
        args.speed_batches = 5
    path = Path(args.store) if args.store else RESULTS / f"{NAME}.json"
    store = {} if args.fresh or not path.exists() else json.loads(path.read_text())
    if args.merge:
        merge_stores(store, args.merge)
        _save(store, args.store)
    if args.adopt_column_settings:
        for old, new in adopt_column_settings(store):
            print(f"moved {old} -> {new}", flush=True)
        _save(store, args.store)
    command = "python -m benchmarks.rnn_tables " + " ".join(sys.argv[1:])
    for part in args.parts:
        {"accuracy": accuracy_part, "speed": speed_part, "memory": memory_part}[part](args, store)
        commands = store.setdefault("commands", {}).setdefault(part, [])
        if command not in commands:  # the report lists every command that added results
            commands.append(command)
            _save(store, args.store)
    if not args.no_report:
        write_report(store, args, command)


if __name__ == "__main__":
    main()
