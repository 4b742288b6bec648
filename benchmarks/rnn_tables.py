"""Paper Tables 5, 7 and 8: recurrent classifiers trained with local targets against random and BPTT baselines.

Parts: ``accuracy`` (a ``Trainer.fit`` per run, keyed ``<table>/<dataset>/<column>/<seed>/e<epochs>``; ``--set
KEY=VALUE``: a validation probe under its own key), ``speed`` (epoch time vs BPTT) and ``saturation`` (the RNN trained
alone by each rule); no part: the report. Each results file lists the commands that made it.
"""

import itertools
import json
import statistics
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch

from . import _harness as H
from . import paper_numbers as P

TABLES = {"5": "rnn1", "7": "rnn2", "8": "birnn1"}
TABLE_TITLES = {"5": "single-layer RNN + linear classifier", "7": "two-layer stacked RNN + two-layer perceptron"}
TABLE_TITLES |= {"8": "single-layer bidirectional RNN + linear classifier"}
COLUMNS, DATASETS, HIDDEN, BATCH = P.RNN_COLUMNS, ("rows", "pixels", "eeg", "twitter"), 512, 128
TITLES = {"random": "Random", "random_rnn": "Random RNN + classifier", "drtp": "RNN (DRTP) + classifier"}
TITLES |= {"l1": "RNN (tpSGD-ℓ1) + classifier", "bp": "BP", "rows": "Seq. MNIST (rows)", "eeg": "EEG Seizure"}
TITLES |= {"pixels": "Seq. MNIST (pixels)", "twitter": "Twitter (one-hot)"}
TARGETS = {"rows": 88.0, "pixels": 72.0, "eeg": 92.0, "twitter": 68.0}  # the issue's, for the single-layer RNN

# A dataset's settings, chosen on the validation holdout (the probes table); rnn_fraction: the RNN's share of epochs.
_DEFAULTS = {"lr": 2e-3, "nonlinearity": "tanh", "init_scale": None, "target_scale": 1.0, "bp_grad_clip": 1.0}
SETTINGS: dict[str, dict[str, Any]] = {
    "rows": {**_DEFAULTS, "rnn_fraction": 0.15},
    "pixels": {**_DEFAULTS, "rnn_fraction": 0.25},
    # EEG: seizures show in the amplitude, so the units sit on tanh's curve: strong inputs, spread biases
    "eeg": {**_DEFAULTS, "lr": 1e-3, "init_scale": 0.1, "input_init_scale": 1.0, "bias_init_scale": 1.0}
    | {"target_scale": 0.5, "rnn_fraction": 0.25},
    "twitter": {**_DEFAULTS, "rnn_fraction": 0.25},
}
# A column's own settings, chosen alike: {column: {dataset or "<table>/<dataset>": {key: value}}}.
COLUMN_SETTINGS: dict[str, dict[str, dict[str, Any]]] = {
    "bp": {dataset: {"lr": 2e-4} for dataset in DATASETS},  # BPTT at the local rules' lr collapsed
    "drtp": {  # DRTP's pseudo-gradient never changes sign: its tanh units saturate
        "pixels": {"nonlinearity": "sigmoid", "rnn_fraction": 0.5},
        "eeg": {"rnn_lr": 5e-4, "rnn_fraction": 0.05},
        "twitter": {"rnn_lr": 3e-5, "rnn_fraction": 0.05},
        "7/twitter": {"feature_norm": "batch"},
    },
}
#: The settings that change the network itself: a column with its own value of one is compared with a random RNN +
#: classifier built alike (the ``random_rnn`` probe with these settings).
ARCHITECTURE_KEYS = ("nonlinearity", "init_scale", "input_init_scale", "bias_init_scale", "feature_norm")
#: What ``--set`` may change (``scheduler``: ``"cosine"`` or null; ``rnn_lr``: the RNN's own learning rate).
SETTING_KEYS = (*ARCHITECTURE_KEYS, "lr", "target_scale", "rnn_fraction", "scheduler", "bp_grad_clip", "rnn_lr")


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["rnn_fraction=0.5", "scheduler=cosine"]`` -> ``{"rnn_fraction": 0.5, "scheduler": "cosine"}``."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or key not in SETTING_KEYS:
            raise SystemExit(f"--set expects KEY=VALUE with KEY one of {', '.join(SETTING_KEYS)}; got {pair!r}.")
        try:
            out[key] = json.loads(text)
        except json.JSONDecodeError:
            out[key] = text  # a bare word, e.g. scheduler=cosine
    return out


def settings_for(table: str, dataset: str, column: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    own = COLUMN_SETTINGS.get(column, {})
    return {**SETTINGS[dataset], **own.get(dataset, {}), **own.get(f"{table}/{dataset}", {}), **(overrides or {})}


def control_overrides(table: str, dataset: str, column: str) -> dict[str, Any]:
    own = COLUMN_SETTINGS.get(column, {})
    own = {**own.get(dataset, {}), **own.get(f"{table}/{dataset}", {})}
    return {k: v for k, v in own.items() if k in ARCHITECTURE_KEYS}


def layerwise_epochs(settings: dict[str, Any], model: str, epochs: int) -> list[int]:
    heads = 2 if model == "rnn2" else 1
    rnn = min(max(1, round(settings["rnn_fraction"] * epochs)), epochs - heads)
    stages = [rnn, *[(epochs - rnn) // heads] * heads]
    stages[-1] += epochs - sum(stages)
    if min(stages) < 1:
        raise ValueError(f"--epochs {epochs} is too few for the {len(stages)} layer-wise stages of {model}.")
    return stages


def model_kwargs(settings: dict[str, Any], input_size: int, **extra: Any) -> dict[str, Any]:
    return {"input_size": input_size, "hidden_size": HIDDEN, **{k: settings.get(k) for k in ARCHITECTURE_KEYS}, **extra}


def make_datamodule(dataset: str, data_dir: str, seed: int, quick: bool, **overrides: Any) -> Any:
    from lightning_tpsgd.data import EEGSeizureDataModule, Sentiment140DataModule, SeqMNISTDataModule

    kwargs: dict[str, Any] = dict(data_dir=data_dir, batch_size=BATCH, seed=seed)
    quick_sizes = {"train_subset": 512, "test_subset": 256} | ({"val_size": 256} if dataset != "eeg" else {})
    kwargs |= quick_sizes if quick else {}
    if dataset in ("rows", "pixels"):
        return SeqMNISTDataModule(mode=dataset, source="npz", **kwargs | overrides)
    return (EEGSeizureDataModule if dataset == "eeg" else Sentiment140DataModule)(**kwargs | overrides)


class EpochLog(L.Callback):
    """Wall and CPU time of each training epoch, and the validation accuracy after it."""

    def __init__(self) -> None:
        self.times, self.cpu, self.val_acc, self.start = [], [], [], (0.0, 0.0)

    def on_train_epoch_start(self, *args: Any) -> None:
        self.start = (time.perf_counter(), time.process_time())

    def on_train_epoch_end(self, *args: Any) -> None:
        self.times.append(time.perf_counter() - self.start[0])
        self.cpu.append(time.process_time() - self.start[1])

    def on_validation_epoch_end(self, trainer: Any, *args: Any) -> None:
        if not trainer.sanity_checking and "val_acc" in trainer.callback_metrics:
            self.val_acc.append(100 * float(trainer.callback_metrics["val_acc"]))


def _options(**options: Any) -> str:
    return "".join(f",{k}={json.dumps(v, separators=(',', ':'))}" for k, v in options.items())


def method(column: str, model: str, settings: dict[str, Any], epochs: int) -> str:
    """The column's method: BPTT (random: untrained), or tpSGD (random_rnn: the head alone; else layer-wise)."""
    if column in ("bp", "random", "random_rnn"):
        return "tpsgd-l2" if column == "random_rnn" else "bp"
    rnn = {"net.0": {"rule": column, "target_scale": settings["target_scale"]}}
    stages = layerwise_epochs(settings, model, epochs)
    return "tpsgd-l2" + _options(overrides=rnn, schedule="layerwise", epochs_per_layer=stages)


def run_one(table: str, dataset: str, column: str, seed: int, args: Any) -> dict[str, Any]:
    """Train (unless ``column == "random"``) and test one network: accuracy, times, validation curve, device."""
    from zoo import SequenceClassifier

    L.seed_everything(seed, verbose=False)
    dm = make_datamodule(dataset, args.data_dir, seed, args.quick)
    s = settings_for(table, dataset, column, args.overrides)
    kwargs = model_kwargs(s, dm.input_size, freeze_rnn=column == "random_rnn")
    layer_lr = {"net.0": s["rnn_lr"]} if s.get("rnn_lr") is not None else None
    options = dict(lr=s["lr"], scheduler=s.get("scheduler"), layer_lr=layer_lr)
    module = SequenceClassifier(model=TABLES[table], num_classes=dm.num_classes, model_kwargs=kwargs, **options)
    log, m = EpochLog(), method(column, TABLES[table], s, args.epochs)
    trainer = dict(accelerator=args.accelerator, devices=1, callbacks=[log])
    clip = s.get("bp_grad_clip") if column == "bp" else None
    out = H.fit(module, dm, m, 0 if column == "random" else args.epochs, gradient_clip_val=clip, **trainer)
    return {**out, "epoch_s": log.times, "val_acc": log.val_acc, "settings": s}


def key(table: str, dataset: str, column: str, seed: int, epochs: int, quick: bool, overrides: dict | None = None):
    """E.g. ``5/rows/l1/0/e20``; a probe adds its changed settings: ``5/rows/l1/0/e20/rnn_fraction=0.5``."""
    probe = ",".join(f"{k}={json.dumps(v)}" for k, v in sorted((overrides or {}).items()))
    return f"{table}/{dataset}/{column}/{seed}/e{epochs}" + "/quick" * quick + (f"/{probe}" if probe else "")


def merge(store: H.Store, paths: list[str]) -> None:
    for path in paths:
        other = H.Store.open(Path(path))
        added = {k: r for k, r in other.runs.items() if k not in store.runs and r not in store.runs.values()}
        store.runs |= added
        store.commands += [c for c in other.commands if c not in store.commands]
        print(f"{path}: merged {len(added)} of {len(other.runs)} runs", flush=True)


SPEED = {  # method -> (TPSGDStrategy options or None for BPTT, precision, the RNN's grad_dtype)
    "local": ({}, "32-true", None),
    "local-bf16": ({}, "32-true", "bfloat16"),
    "bptt": (None, "32-true", None),
    "local-amp": ({}, "bf16-mixed", None),
    "bptt-amp": (None, "bf16-mixed", None),
    "local-layerwise": ({"schedule": "layerwise", "epochs_per_layer": [1, 1]}, "32-true", None),
}
SPEEDUPS = {"": "local", "_bf16": "local-bf16", "_amp": "local-amp", "_rnn_stage": "local-layerwise"}


def speed(store: H.Store, args: Any) -> None:
    """Seconds per training epoch (wall and CPU) of the local step and of BPTT on the same ``rnn1``, interleaved over
    rounds; speed-ups are medians of the per-round ratios. ``-bf16``: ``grad_dtype``; ``-amp``: ``bf16-mixed``."""
    from zoo import SequenceClassifier

    for dataset in args.datasets:
        dm, s = make_datamodule(dataset, args.data_dir, 0, False), settings_for("5", dataset, "l1", args.overrides)
        rnn_epochs, wall, cpu = layerwise_epochs(s, "rnn1", args.epochs)[0], {}, {}
        for _, (name, (options, precision, dtype)) in itertools.product(range(args.speed_rounds), SPEED.items()):
            L.seed_everything(0, verbose=False)
            kwargs = model_kwargs(s, dm.input_size, grad_dtype=dtype)
            module = SequenceClassifier(model="rnn1", num_classes=dm.num_classes, model_kwargs=kwargs)
            options = None if options is None else {"overrides": {"net.0": {"rule": "l1"}}, **options}
            strategy, log = H.strategy_for("tpsgd-l2" + _options(**options)) if options else "auto", EpochLog()
            limits = dict(limit_train_batches=args.speed_batches, limit_val_batches=0)
            kwargs = dict(strategy=strategy, precision=precision, callbacks=[log], **limits)
            kwargs |= dict(accelerator=args.accelerator, devices=1, max_epochs=1 + (name == "local-layerwise"))
            trainer = H.quiet_trainer(**kwargs)
            trainer.fit(module, datamodule=dm)
            for times, measured in ((wall, log.times), (cpu, log.cpu)):
                times.setdefault(name, []).append(measured[0])
                times.setdefault("local-head", []).extend(measured[1:])
        for t in (wall, cpu):
            schedule = zip(t["local-layerwise"], t["local-head"], strict=True)
            t["local-schedule"] = [(rnn_epochs * r + (args.epochs - rnn_epochs) * h) / args.epochs for r, h in schedule]
        batches = len(dm.train_dataloader())
        r: dict[str, Any] = {"device": H.device_name(trainer.strategy.root_device), "threads": torch.get_num_threads()}
        r |= {"batches": min(args.speed_batches or batches, batches)}
        r |= {"layerwise_schedule": [rnn_epochs, args.epochs - rnn_epochs]}
        names = {m: m.replace("-", "_") + "_s" for m in ("local", "local-bf16", "bptt", "local-amp", "bptt-amp")}
        names |= {"local-layerwise": "layerwise_rnn_s", "local-head": "layerwise_head_s"}
        r |= {name: statistics.median(wall[m]) for m, name in names.items()}
        for suffix, m in {**SPEEDUPS, "_schedule": "local-schedule"}.items():
            base = "bptt-amp" if suffix == "_amp" else "bptt"
            for kind, t in (("", wall), ("_cpu", cpu)):
                r[f"speedup{suffix}{kind}"] = statistics.median(b / a for a, b in zip(t[m], t[base], strict=True))
        where = dataset if args.accelerator == "cpu" else f"{dataset}/{args.accelerator}"
        threads = f"/{r['threads']} threads" if r["threads"] > 1 and args.accelerator == "cpu" else ""
        store.runs[f"speed/{where}{threads}"] = r
        store.save()


#: (label, rule, optimizer, lr, parameters kept frozen): rule None is the untrained RNN; lr None the dataset's lr.
SATURATION = (
    ("random RNN (untrained)", None, "adam", None, ()),
    ("tpSGD-ℓ1 (the tables)", "l1", "adam", None, ()),
    ("DRTP, the dataset's lr", "drtp", "adam", None, ()),
    ("DRTP, lower lr", "drtp", "adam", 5e-4, ()),
    ("DRTP, SGD", "drtp", "sgd", 1.0, ()),
    ("DRTP, biases frozen", "drtp", "adam", None, ("bias_ih_l0", "bias_hh_l0")),
)
#: Table 7's columns with ``--model rnn2``: (label, rule, the column whose settings it takes).
STACKED = (
    ("random RNN (untrained), ℓ1's cell", None, "l1"),
    ("tpSGD-ℓ1 (the tables)", "l1", "l1"),
    ("random RNN (untrained), DRTP's cell", None, "drtp"),
    ("DRTP (the tables)", "drtp", "drtp"),
)


def features(model: torch.nn.Module, dm: Any, samples: int) -> list[dict[str, float]]:
    """Per layer: the share of final states within 0.01 of a bound of the nonlinearity, the units' mean std over
    the samples, and the validation accuracy (%) of a logistic regression on the training states."""
    from sklearn.linear_model import LogisticRegression

    def states(loader: Any) -> tuple[torch.Tensor, torch.Tensor]:
        batches = itertools.islice(loader, -(-samples // BATCH))
        xs, ys = zip(*((model[0](x)[1], y) for x, y in batches), strict=True)  # h_n: (L, B, H)
        return torch.cat(xs, dim=1)[:, :samples], torch.cat(ys)[:samples]

    with torch.no_grad():
        (train, y), (val, y_val) = states(dm.train_dataloader()), states(dm.val_dataloader())
    low, rows = 0.0 if model[0].nonlinearity == "sigmoid" else -1.0, []
    for h, h_val in zip(train, val, strict=True):
        probe = LogisticRegression(max_iter=300).fit(h.numpy(), y.numpy()).score(h_val.numpy(), y_val.numpy())
        saturated = float(((h - low < 0.01) | (1.0 - h < 0.01)).float().mean())
        rows.append({"saturated": saturated, "unit_std": float(h.std(0).mean()), "probe": 100 * probe})
    return rows


def saturation_run(dataset: str, config: tuple, settings: dict, model_name: str, args: Any) -> list[dict]:
    from lightning_tpsgd import LocalLearner
    from zoo import create_model

    rule, opt, lr, frozen = config
    torch.manual_seed(args.seed)
    dm = make_datamodule(dataset, args.data_dir, args.seed, False, train_subset=args.train_subset or None)
    dm.setup("fit")
    model = create_model(model_name, num_classes=dm.num_classes, **model_kwargs(settings, dm.input_size))
    if rule is None:
        return [{"epoch": 0, "layer": k, **row} for k, row in enumerate(features(model.eval(), dm, args.samples))]
    for name in frozen:
        getattr(model[0], name).requires_grad_(False)
    stages = [args.epochs] + [1] * sum(isinstance(m, torch.nn.Linear) for m in model)  # the RNN, then the head
    optimizer = partial({"adam": torch.optim.Adam, "sgd": torch.optim.SGD}[opt], lr=lr)
    overrides = {"0": {"rule": rule, "target_scale": settings["target_scale"]}}
    kwargs = dict(schedule="layerwise", epochs_per_layer=stages, seed=args.seed, optimizer=optimizer)
    learner, rows = LocalLearner(model, rule="l2", overrides=overrides, **kwargs), []
    for epoch in range(args.epochs):
        learner.set_epoch(epoch)
        for x, y in dm.train_dataloader():
            learner.step(x, y)
        rows += [{"epoch": epoch + 1, "layer": k, **r} for k, r in enumerate(features(model.eval(), dm, args.samples))]
        model.train()
        print(f"[saturation] {dataset} {rule} {opt} {lr:g} epoch {epoch + 1}: {rows[-1]}", flush=True)
    return rows


def saturation(store: H.Store, args: Any) -> None:
    for dataset in args.datasets:
        start, configs = time.perf_counter(), {}
        stacked = [(label, rule, "adam", None, (), column) for label, rule, column in STACKED]
        for label, rule, opt, lr, frozen, *column in stacked if args.model == "rnn2" else SATURATION:
            s = settings_for("7", dataset, column[0]) if column else SETTINGS[dataset]
            lr = lr or s.get("rnn_lr") or s["lr"]
            rows = saturation_run(dataset, (rule, opt, lr, frozen), s, args.model, args)
            configs[label] = [{**row, "optimizer": f"{opt} {lr:g}" if rule else "–"} for row in rows]
        record = {"configs": configs, "model": args.model, "train_subset": args.train_subset, "seed": args.seed}
        record["seconds"] = time.perf_counter() - start
        store.runs[dataset + ("/rnn2" if args.model == "rnn2" else "")] = record
        store.save()


def saturation_report(store: H.Store) -> list[str]:
    lines = []
    for name, r in store.runs.items():
        stacked, rows = r["model"] == "rnn2", []
        for label, x in ((label, x) for label, xs in r["configs"].items() for x in xs):
            stats = [f"{x['saturated']:.3f}", f"{x['unit_std']:.4f}", f"{x['probe']:.2f}"]
            rows.append([label, x["optimizer"], x["epoch"], *([x["layer"] + 1] if stacked else []), *stats])
        header = ["rule", "optimizer", "epoch", *(["layer"] if stacked else []), "saturated", "unit std", "probe (%)"]
        title = f"{name.split('/')[0]}{', Table 7 (two stacked layers)' * stacked}"
        lines += [f"## {title} (training subset {r['train_subset'] or 'all'}, seed {r['seed']})", ""]
        lines += H.md_table(header, rows)
    return lines


def runs(store: H.Store, table: str, dataset: str, column: str, epochs: int, quick: bool, probe: str = "") -> list:
    want, prefix = f"e{epochs}" + "/quick" * quick + (f"/{probe}" if probe else ""), f"{table}/{dataset}/{column}/"
    return [r for k, r in sorted(store.runs.items()) if k.startswith(prefix) and k.split("/", 4)[4] == want]


def _mean(store: H.Store, args: Any, table: str, dataset: str, column: str, validation: bool = False) -> float:
    """A cell's mean test (or last validation) accuracy; ``control:<column>`` is the random RNN built like it."""
    probe = ""
    if column.startswith("control:") and (own := control_overrides(table, dataset, column[8:])):
        probe = key(table, dataset, "random_rnn", 0, args.epochs, False, own).split("/", 5)[5]
    column = column.split(":")[0].replace("control", "random_rnn")
    cell = runs(store, table, dataset, column, args.epochs, args.quick, probe)
    return H.mean(r["val_acc"][-1] for r in cell if r.get("val_acc")) if validation else H.mean(r["acc"] for r in cell)


def report(store: H.Store, args: Any) -> list[str]:
    lines, sizes = [f"Hidden size {HIDDEN}, batch {BATCH}, {args.epochs} epochs, Adam.", ""], {}
    for table in args.tables:
        rows = []
        for d in args.datasets:
            cells = [[r["acc"] for r in runs(store, table, d, c, args.epochs, args.quick)] for c in COLUMNS]
            sizes |= {(table, d, c): len(cell) for c, cell in zip(COLUMNS, cells, strict=True)}
            paper = zip(cells, P.RNN[table, d], strict=True)
            rows.append([TITLES[d], *(f"{H.mean_std(c, n=True)}<br>paper {p:.2f}" for c, p in paper)])
        lines += [f"## Table {table}: {TABLE_TITLES[table]} (`{TABLES[table]}`)", ""]
        lines += H.md_table(["dataset", *map(TITLES.get, COLUMNS)], rows)
    most = statistics.mode(v for v in sizes.values() if v) if any(sizes.values()) else 0
    fewer = [f"Table {t} {TITLES[d]} {TITLES[c]} (n={n})" for (t, d, c), n in sizes.items() if 0 < n < most]
    lines += [f"Cells with fewer runs than the {most} of most cells: " + "; ".join(fewer) + ".", ""] if fewer else []
    rows = []
    for d in args.datasets if "5" in args.tables else ():
        drtp, l1, rr = (_mean(store, args, "5", d, c) for c in ("drtp", "l1", "random_rnn"))
        met = "yes" if max(drtp, l1) >= TARGETS[d] else "no"
        rows.append([TITLES[d], f"≥ {TARGETS[d]:.0f}", f"{drtp:.2f}", f"{l1:.2f}", f"{rr:.2f}", met])
    header = ["dataset", "target", "DRTP", "tpSGD-ℓ1", "random RNN + classifier", "met"]
    targets = "## Targets of the issue (single-layer RNN, best of tpSGD-ℓ1 and DRTP)"
    lines += [targets, "", *H.md_table(header, rows)] if rows else []
    return lines + _other_runs(store) + _comparisons(store, args) + speed_lines(store) + _settings_table(args)


def _where(r: dict | None) -> list[str]:
    if not r:
        return ["–", "–"]
    device = r.get("device", "cpu").split(",")[0].replace("NVIDIA ", "")
    return [f"{r['val_acc'][-1]:.2f}" if r.get("val_acc") else "–", f"{r['acc']:.2f} ({device})"]


def _other_runs(store: H.Store) -> list[str]:
    """Reruns of table runs in ``rnn_tables_*.json`` (other devices, processes), and the probes beside their runs."""
    reruns, probes = [], []
    for path in sorted(store.path.parent.glob(f"{store.path.stem}_*.json")):
        for k, r in sorted(H.Store.open(path).runs.items()):
            if (mine := store.runs.get(k)) is not None and mine != r:
                reruns.append([f"`{k}`", *_where(mine), *_where(r), f"`{path.name}`"])
    for k, r in sorted(store.runs.items()):
        if k.count("/") >= 5 and not k.split("/", 5)[5].startswith("quick"):
            base, changed = k.rsplit("/", 1)
            probes.append([f"`{base}`", f"`{changed}`", *_where(r), *_where(store.runs.get(base))])
    header = ["run", "validation", "test (device)", "rerun: validation", "test (device)", "file"]
    lines = ["## Reruns of table runs", "", *H.md_table(header, reruns)] if reruns else []
    header = ["run", "changed settings", "validation", "test (device)", "table's settings: validation", "test"]
    return [*lines, "## Validation probes and earlier settings", "", *H.md_table(header, probes)] if probes else lines


def _comparisons(store: H.Store, args: Any) -> list[str]:
    """Trained columns minus their random-RNN control, and stacked / bidirectional minus single-layer."""
    rows = []
    for t, d in itertools.product(args.tables, args.datasets):
        mean = partial(_mean, store, args)
        margins = [mean(t, d, c, v) - mean(t, d, f"control:{c}", v) for c in ("drtp", "l1") for v in (False, True)]
        here, single = ([mean(tt, d, c) for c in ("drtp", "l1")] for tt in (t, "5"))
        vs = [here[0] - single[0], here[1] - single[1], max(here) - max(single)] if t != "5" else [float("nan")] * 3
        rows.append([t, TITLES[d], *map(H.signed, margins + vs)])
    header = ["table", "dataset", "DRTP vs random", "validation", "tpSGD-ℓ1 vs random", "validation", "DRTP vs single"]
    lines = ["## Trained vs random RNN, and stacked / bidirectional vs single-layer", ""]
    lines += ["Points (means over seeds): a trained column minus its random RNN + classifier built alike, on the test"]
    lines += ["split and on the validation holdout; a column minus the same column of Table 5.", ""]
    return lines + H.md_table([*header, "tpSGD-ℓ1 vs single", "best vs single"], rows)


def speed_lines(store: H.Store) -> list[str]:
    speed = {k.split("/", 1)[1]: r for k, r in sorted(store.runs.items()) if k.startswith("speed/")}
    ratio = lambda r, k: f"{r[k]:.2f}× / {r[k + '_cpu']:.2f}×" if k in r else "– / –"  # noqa: E731
    sec = lambda r, k: f"{r[k]:.1f}" if k in r else "–"  # noqa: E731
    rows = [[TITLES[k.split("/")[0]], r["device"], r["batches"], r["threads"], sec(r, "bptt_s"), sec(r, "local_s")]
            + [ratio(r, "speedup"), sec(r, "local_bf16_s"), ratio(r, "speedup_bf16"), sec(r, "bptt_amp_s")]
            + [sec(r, "local_amp_s"), ratio(r, "speedup_amp")] for k, r in speed.items()]  # fmt: skip
    header = ["dataset", "device", "batches", "threads", "BPTT (s)", "local (s)", "speed-up (wall / CPU)"]
    header += ["local-bf16 (s)", "speed-up", "bf16-mixed: BPTT (s)", "local (s)", "speed-up"]
    lines = ["## Time per training epoch vs BPTT", "", *H.md_table(header, rows)] if rows else []
    rows = [[TITLES[k.split("/")[0]], r["threads"], " + ".join(map(str, r["layerwise_schedule"])), sec(r, "bptt_s")]
            + [sec(r, "layerwise_rnn_s"), ratio(r, "speedup_rnn_stage"), sec(r, "layerwise_head_s")]
            + [ratio(r, "speedup_schedule")] for k, r in speed.items() if "speedup_schedule" in r]  # fmt: skip
    header = ["dataset", "threads", "RNN + head epochs", "BPTT (s)", "RNN stage (s)", "speed-up", "head stage (s)"]
    layerwise = ["The tables' layer-wise schedule, float32:", "", *H.md_table([*header, "mean epoch: speed-up"], rows)]
    return lines + layerwise * bool(rows)


def _settings_table(args: Any) -> list[str]:
    rows = []
    for d in args.datasets:
        own = [(c, t, by.get(f"{t}/{d}" if t else d)) for c, by in COLUMN_SETTINGS.items() for t in ("", *TABLES)]
        own_text = "<br>".join(f"{c}{', Table ' + t if t else ''}: `{json.dumps(v)}`" for c, t, v in own if v)
        rows.append([d, f"`{json.dumps(SETTINGS[d])}`", own_text or "–"])
    return ["## Settings per dataset", "", *H.md_table(["dataset", "settings", "a column's own settings"], rows)]


def plot(store: H.Store, args: Any) -> None:
    panels = []
    for t in args.tables:
        cell = lambda d, c: [r["acc"] for r in runs(store, t, d, c, args.epochs, args.quick)]  # noqa: E731,B023
        series = {TITLES[c]: [cell(d, c) for d in args.datasets] for c in COLUMNS}
        paper = {TITLES[c]: [P.RNN[t, d][i] for d in args.datasets] for i, c in enumerate(COLUMNS)}
        panels.append(H.Panel(f"Table {t} ({TABLES[t]})", args.datasets, series, "test accuracy (%)", paper))
    H.bar_chart(store.path.with_suffix(".png"), "Recurrent networks: paper Tables 5, 7 and 8", panels)


def jobs(args: Any) -> Iterator[H.Job]:
    for table, dataset, column, seed in itertools.product(args.tables, args.datasets, args.columns, H.seeds(args)):
        job = partial(run_one, table, dataset, column, seed, args)
        yield key(table, dataset, column, seed, args.epochs, args.quick, args.overrides), job


def main(argv: list[str] | None = None) -> H.Store:
    p = H.parser(__doc__, seeds=3)
    p.add_argument("parts", nargs="*", default=[], help="accuracy, speed, saturation (none: the report)")
    p.add_argument("--tables", nargs="+", default=list(TABLES), choices=list(TABLES))
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    p.add_argument("--columns", nargs="+", default=list(COLUMNS), choices=list(COLUMNS))
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="a validation probe: changed settings")
    p.add_argument("--accelerator", default="cpu", help='Lightning accelerator of the runs, e.g. "cuda"')
    p.add_argument("--merge", nargs="+", default=[], help="add the runs of these result files")
    p.add_argument("--speed-batches", type=int, default=None, help="speed: batches per timed epoch (default: all)")
    p.add_argument("--speed-rounds", type=int, default=None, help="speed: rounds (default: 3; --quick: 1)")
    p.add_argument("--model", choices=["rnn1", "rnn2"], default="rnn1", help="saturation: Table 5's RNN or Table 7's")
    p.add_argument("--train-subset", type=int, default=10000, help="saturation: training sequences (0: all)")
    p.add_argument("--samples", type=int, default=5000, help="saturation: sequences read for the states and probe")
    p.add_argument("--seed", type=int, default=0, help="saturation: the seed")
    args = p.parse_args(argv)
    if bad := set(args.parts) - {"accuracy", "speed", "saturation"}:
        p.error(f"unknown parts {sorted(bad)}: choose from accuracy, speed, saturation")
    out, args.overrides = H.setup(args), parse_overrides(args.set)
    args.epochs = args.epochs or (3 if args.quick else 20)
    args.speed_batches = args.speed_batches or (5 if args.quick else None)
    args.speed_rounds = args.speed_rounds or (1 if args.quick else 3)
    store, sat = H.Store.open(out / "rnn_tables.json", fresh=args.fresh), H.Store.open(out / "rnn_saturation.json")
    merge(store, args.merge)
    for part in args.parts:
        (sat if part == "saturation" else store).add_command("rnn_tables", argv)
        if part == "accuracy":
            store.run(jobs(args), args.only)
        else:
            (saturation if part == "saturation" else speed)(sat if part == "saturation" else store, args)
    store.save()
    if not args.no_report and sat.runs and ("saturation" in args.parts or args.report_only):
        sat.write_report("What the local rules do to the recurrent layer's features", saturation_report(sat))
    if not args.no_report and args.parts != ["saturation"]:
        title = "Recurrent networks trained with local targets: paper Tables 5, 7 and 8"
        store.write_report(title, report(store, args), args.quick, figure=True)
        plot(store, args)
    return store


if __name__ == "__main__":
    main()
