"""Table 4 (paper §3.2): adaptors on a frozen pretrained ``tf_efficientnet_lite0``, tpSGD vs BP vs transfer learning,
on Imagenette at 112 px; each row in a fresh process (accuracy, trained size, peak RSS, epoch times)."""

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from typing import Any

from . import _harness as H
from . import paper_numbers as P

BACKBONE, IMG_SIZE, QUICK = "tf_efficientnet_lite0", 112, {"train_subset": 640, "test_subset": 320}
DEEP_TAPS = (2, 3, 4)  # the stride 8, 16, 32 feature maps of EfficientNet-Lite0 (40, 112, 320 channels)
# Chosen on the training holdout (--tune), never on the reported split; extract_batch_size bounds the memory only.
HPARAMS: dict[str, Any] = {"epochs": 5, "lr": 1e-3, "batch_size": 64, "rule": "ce", "conv_projection": "naive"}
HPARAMS |= {"target_scale": 1.0, "extract_batch_size": 8}
RSS_TARGET_MIB = 1e9 / H.MiB  # the "peak RSS <= 1 GB" (10^9 bytes)
ROWS: dict[str, tuple[str, str, dict[str, Any]]] = {  # row -> (label, method, TimmAdaptor options)
    "tpsgd-L0": ("Adaptor, deepest tap (tpSGD)", "tpsgd", {"taps": (-1,)}),
    "bp-L0": ("Adaptor, deepest tap (BP)", "bp", {"taps": (-1,)}),
    "tpsgd-L012": ("Adaptor, 3 taps (tpSGD)", "tpsgd", {"taps": DEEP_TAPS}),
    "bp-L012": ("Adaptor, 3 taps (BP)", "bp", {"taps": DEEP_TAPS}),
    "transfer": ("Transfer: backbone classifier (BP)", "bp", {"adaptor": "transfer"}),
}
TIMES = ("cached", "uncached", "first")
PAPER = {"tpsgd-L0": "adaptor/tpsgd", "bp-L0": "adaptor/bp", "transfer": "transfer"}


def run_row(row: str, seeds: int, data_dir: str, quick: bool, tune: bool, batches: int, cache_dir: str | None) -> dict:
    import torch

    rss_torch = H.MemoryMeter.rss()
    import lightning as L

    from lightning_tpsgd import TPSGDStrategy
    from lightning_tpsgd.data import ImagenetteDataModule
    from zoo import FeatureCache, TimmAdaptor, backbone_data_config

    rss_imports, (_, method, kwargs) = H.MemoryMeter.rss(), ROWS[row]
    kwargs = {**kwargs, "extract_batch_size": HPARAMS["extract_batch_size"]}
    cfg, epochs = backbone_data_config(BACKBONE, IMG_SIZE), 2 if quick else HPARAMS["epochs"]
    dm = ImagenetteDataModule(
        source="npz", data_dir=data_dir, image_size=IMG_SIZE, mean=cfg["mean"], std=cfg["std"], decode="stream",
        batch_size=HPARAMS["batch_size"], val_size=1000 if tune else 0, **(QUICK if quick else {}),
    )  # fmt: skip
    options = {k: HPARAMS[k] for k in ("rule", "conv_projection", "target_scale")}
    strategy = (lambda: TPSGDStrategy(**options, log_local_losses=False)) if method == "tpsgd" else lambda: "auto"

    class Timer(L.Callback):
        def __init__(self, what: str) -> None:
            self.what, self.times, self.start, self.misses = what, [], 0.0, 0

        def on_train_epoch_start(self, trainer: Any, module: Any) -> None:
            self.start, self.misses = time.perf_counter(), getattr(getattr(module, "feature_cache", None), "misses", 0)

        def on_train_epoch_end(self, trainer: Any, module: Any) -> None:
            if self.what == "epoch":
                self.times.append((time.perf_counter() - self.start, module.feature_cache.misses - self.misses))

        def on_train_batch_start(self, *args: Any) -> None:
            self.batch_start = time.perf_counter()

        def on_train_batch_end(self, *args: Any) -> None:
            self.times += [time.perf_counter() - self.batch_start] if self.what == "batch" else []

    cache, accs, epoch_times, module = FeatureCache(cache_dir), [], [], None
    for seed in range(seeds):
        module = trainer = None  # the previous seed's module goes before the next backbone is built
        gc.collect()
        L.seed_everything(seed, verbose=False)
        options = dict(pretrained=True, img_size=IMG_SIZE, cache_features=cache, lr=HPARAMS["lr"], **kwargs)
        module, timer = TimmAdaptor(BACKBONE, num_classes=10, **options), Timer("epoch")
        fit = dict(max_epochs=epochs, strategy=strategy(), callbacks=[timer], limit_val_batches=0)
        trainer = H.quiet_trainer(accelerator="cpu", **fit)
        trainer.fit(module, datamodule=dm)
        loader = dm.val_dataloader() if tune else dm.test_dataloader()
        accs.append(100 * trainer.test(module, dataloaders=loader, verbose=False)[0]["test_acc"])
        epoch_times += timer.times
        print(f"[{row}] seed {seed}: {accs[-1]:.2f}%, epochs {[round(t, 1) for t, _ in timer.times]} s", flush=True)
    peak = H.MemoryMeter.rss("VmHWM")
    trained = sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
    module = trainer = None
    gc.collect()
    L.seed_everything(0, verbose=False)  # uncached: the same row without the cache, a few batches scaled to an epoch
    uncached = TimmAdaptor(BACKBONE, num_classes=10, pretrained=True, img_size=IMG_SIZE, lr=HPARAMS["lr"], **kwargs)
    timer = Timer("batch")
    limits = dict(limit_train_batches=1 + batches, limit_val_batches=0)
    trainer = H.quiet_trainer(accelerator="cpu", max_epochs=1, strategy=strategy(), callbacks=[timer], **limits)
    trainer.fit(uncached, datamodule=dm)
    cached, first = [t for t, miss in epoch_times if not miss], [t for t, miss in epoch_times if miss]
    out = {"acc": accs, "trained_mib": trained / H.MiB, "peak_rss_mib": peak, "rss_torch_mib": rss_torch}
    out |= {"peak_process_mib": H.MemoryMeter.rss("VmHWM"), "rss_imports_mib": rss_imports}
    out |= {"cache_mib": cache.nbytes / H.MiB, "epoch_cached_s": statistics.median(cached) if cached else None}
    out |= {"epoch_first_s": statistics.mean(first) if first else None}
    out["epoch_uncached_s"] = statistics.median(timer.times[1:]) * len(dm.train_dataloader())
    return out | {"torch": f"{torch.__version__}, {torch.get_num_threads()} thread(s)"}


def report(store: H.Store) -> list[str]:
    s, rows, runs = store.settings, [], {row: store.runs[row] for row in ROWS if row in store.runs}
    for row, r in runs.items():
        paper, (cached, uncached, first) = P.TABLE4.get(PAPER.get(row, "")), (r[f"epoch_{k}_s"] for k in TIMES)
        peak = f"{r['peak_rss_mib']:.0f}" + (" ✓" if r["peak_rss_mib"] <= RSS_TARGET_MIB else "")
        cells = [f"{r['trained_mib']:.2f}", peak, f"{r['peak_rss_mib'] - r['rss_imports_mib']:.0f}"]
        cells += [f"{r['cache_mib']:.0f}"]
        cells += [f"{cached:.1f}" if cached else "–", f"{uncached:.1f}", f"{uncached / cached:.1f}×" if cached else "–"]
        cells += [f"{first:.1f}" if first else "–", f"{P.fmt(*paper[:2])}, {paper[2]:g} MB" if paper else "–"]
        rows.append([ROWS[row][0], H.mean_std(r["acc"]), *cells])
    header = ["Row", "Accuracy (%)", "Trained (MiB)", "Peak RSS (MiB; ✓: ≤ 1 GB)", "above imports"]
    header += ["Feature cache (MiB)"]
    header += ["Epoch, cached (s)", "Epoch, uncached (s)", "Speed-up", "First epoch (s)", "Paper (VGG16, 320 px)"]
    split = "the training holdout (1000 images)" if s["tune"] else "Imagenette val (3925 images)"
    hp, torch_build = HPARAMS, next(iter(runs.values()), {}).get("torch", "")
    lines = f"""Backbone `{BACKBONE}` (ImageNet weights, frozen, eval mode), Imagenette at {IMG_SIZE} px, batch
{hp["batch_size"]}, Adam lr {hp["lr"]}, {2 if s["quick"] else hp["epochs"]} epochs; tpSGD rule `{hp["rule"]}`, conv
projection `{hp["conv_projection"]}`. Accuracy on {split}, mean ± std over {s["seeds"]} seed(s). CPU ({torch_build}),
each row in a fresh process; feature cache on {s["cache"]}, the backbone run {hp["extract_batch_size"]} images at a
time, JPEGs read on access.
""".splitlines()
    lines += ["", *H.md_table(header, rows)]
    if not runs:
        return lines
    peaks, imports = [r["peak_rss_mib"] for r in runs.values()], max(r["rss_imports_mib"] for r in runs.values())
    met = "met by every row" if max(peaks) <= RSS_TARGET_MIB else "not met by every row"
    whole = ", ".join(f"{k} {r['peak_process_mib']:.0f}" for k, r in runs.items())
    after_torch = max(r["rss_torch_mib"] for r in runs.values())
    lines += f"""Memory (MiB): {after_torch:.0f} of RSS right after `import torch` and
{imports:.0f} after Lightning, timm and this package, which leaves {RSS_TARGET_MIB - imports:.0f} of the 1 GB
({RSS_TARGET_MIB:.0f} MiB) target for the fine-tuning; peak RSS over all seeds' training and test {min(peaks):.0f} to
{max(peaks):.0f}: the target is {met}. Whole-process peaks, with the uncached timing run: {whole}.
""".splitlines()
    if (tp := runs.get("tpsgd-L0")) and (bp := runs.get("bp-L0")) and tp["epoch_cached_s"]:
        ratio = bp["epoch_uncached_s"] / tp["epoch_cached_s"]
        lines += [f"A cached tpSGD-adaptor epoch against an uncached BP one (deepest tap): {ratio:.1f}× faster."]
    return [*lines, ""]


def plot(store: H.Store) -> None:
    rows, runs = [row for row in ROWS if row in store.runs], store.runs
    value = lambda name: {"": [[runs[r][name] or 0.0] for r in rows]}  # noqa: E731
    times = {k: [[runs[r][f"epoch_{k}_s"] or 0] for r in rows] for k in ("uncached", "cached")}
    memory = {"peak": value("peak_rss_mib")[""], "after imports": value("rss_imports_mib")[""]}
    panels = [H.Panel("Accuracy", rows, {"": [runs[r]["acc"] for r in rows]}, "accuracy (%)")]
    panels += [H.Panel("Time per epoch", rows, times, "seconds", log=True)]
    panels += [H.Panel("Trained size", rows, value("trained_mib"), "MiB"), H.Panel("Peak RSS", rows, memory, "MiB")]
    H.bar_chart(store.path.with_suffix(".png"), f"Adaptors on a frozen {BACKBONE}, Imagenette {IMG_SIZE} px", panels)


def main(argv: list[str] | None = None) -> H.Store | None:
    p = H.parser(__doc__, seeds=3)
    p.add_argument("--tune", action="store_true", help="score the training holdout, not the validation split")
    p.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    p.add_argument("--uncached-batches", type=int, default=None, help="default: 10 (--quick: 3)")
    p.add_argument("--cache", choices=("disk", "memory"), default="disk", help="where the feature cache lives")
    p.add_argument("--cache-dir", default=None, help="folder of the disk cache (default: the temporary folder)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    out, batches = H.setup(args), args.uncached_batches or (3 if args.quick else 10)
    if args.child:  # one row, in this fresh process
        with tempfile.TemporaryDirectory(prefix="adaptor_table4-", dir=args.cache_dir) as tmp:
            cache_dir = tmp if args.cache == "disk" else None
            result = run_row(args.child, args.seeds, args.data_dir, args.quick, args.tune, batches, cache_dir)
        print("RESULT " + json.dumps(result), flush=True)
        return None
    settings = {"seeds": args.seeds, "quick": args.quick, "tune": args.tune, "cache": args.cache, "hparams": HPARAMS}
    path = out / f"adaptor_table4{'_tune' if args.tune else ''}.json"
    store = H.Store.open(path, None if args.report_only else settings, args.fresh)
    if not args.report_only:
        store.add_command("adaptor_table4", argv)
        for row in args.rows:  # a row run again replaces its entry
            store.runs[row] = H.child("adaptor_table4", ["--child", row, *(sys.argv[1:] if argv is None else argv)])
            store.save()
    if not args.no_report:
        title = "Table 4: adaptors on a frozen pretrained backbone (tpSGD vs BP vs transfer)"
        store.write_report(title, report(store), args.quick, figure=True)
        plot(store)
    return store


if __name__ == "__main__":
    main()
