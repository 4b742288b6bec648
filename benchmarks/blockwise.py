"""Block-wise local learning (issue 20): accuracy, activation memory and time of residual and attention networks.

Usage (repository root)::

    OMP_NUM_THREADS=2 python -m benchmarks.blockwise --data-dir ../shared/data --seeds 3 --threads 2
    OMP_NUM_THREADS=2 python -m benchmarks.blockwise --suite timm --data-dir ../shared/data --seeds 3 --threads 2
    python -m benchmarks.blockwise --quick --seeds 1          # a smoke test: results/quick/blockwise.md

Every run is a ``Trainer.fit`` on a seeded subset of CIFAR-10's training images (no validation holdout), then the
accuracy on its test images; every method of a suite has the same epochs, batch and optimizer.

- ``resnet20`` (the default): ``zoo.ImageClassifier("resnet20")`` from scratch (SGD, lr 0.05, momentum 0.9, weight
  decay 5e-4, cosine over the epochs, batch 128), 5,000 training images, 8 epochs, the 10,000 test images. Methods:
  ``bp`` (backpropagation), ``K=3`` (``TPSGDStrategy(blocks=["layer*"])``, the three residual stages: what
  ``blocks="auto"`` picks), ``K=9`` (``blocks=["layer*.*"]``, every residual block), ``K=3+recompute`` (K=3 with
  ``recompute=True``: each stage recomputes its residual blocks' activations in its backward) and ``control`` (the
  random-initialised network frozen, only the classifier trained). Issue 20's bars: K=3 within 3 points of backprop,
  at least 15 points above the control, activation memory at most 0.6× backprop's.
- ``timm``: timm's ``resnet18``, ``convnext_atto`` and ``vit_tiny_patch16_224`` (``pretrained=False``, 32×32 inputs,
  the ViT with 8×8 patches), one epoch on 2,000 training images (AdamW, lr 1e-3, batch 32), 1,000 test images:
  ``bp`` against ``TPSGDStrategy(blocks="auto")``.

Each run is a fresh process, so its memory is its own: ``act_mib`` is the peak during training minus the memory in
use when training starts (model, optimizer, data and Lightning already there): the activations and gradients of a
step. On the CPU the peak resident set (``VmHWM``), with large blocks served by ``mmap`` so freed tensors leave it;
on a GPU the CUDA allocator's peak. ``saved_mib``: the peak of the tensors autograd holds for a backward (distinct
storages, ``saved_tensors_hooks``), the same on any device. Time per epoch leaves out the first epoch.
"""

import argparse
import json
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F

from . import _harness as H

RESNET = {
    "bp": "bp",
    "K=3": 'tpsgd,blocks=["layer*"]',
    "K=9": 'tpsgd,blocks=["layer*.*"]',
    "K=3+recompute": 'tpsgd,blocks=["layer*"],recompute=true',
    "control": "control",
}
SUITES: dict[str, dict[str, Any]] = {
    "resnet20": {"models": ["resnet20"], "methods": RESNET, "train": 5000, "test": None, "epochs": 8, "batch": 128},
    "timm": {
        "models": ["resnet18", "convnext_atto", "vit_tiny_patch16_224"],
        "methods": {"bp": "bp", "auto": "tpsgd,blocks=auto"},
        **{"train": 2000, "test": 1000, "epochs": 1, "batch": 32},
    },
}
HPARAMS = {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "scheduler": "cosine"}
TIMM_KWARGS = {"vit_tiny_patch16_224": {"img_size": 32, "patch_size": 8}}


def _module(model: str) -> Any:
    """The LightningModule of a run: the zoo's ImageClassifier, or a timm model with cross-entropy and AdamW."""
    import lightning as L

    from zoo import ImageClassifier

    if model == "resnet20":
        return ImageClassifier("resnet20", num_classes=10, **HPARAMS)
    import timm

    class TimmClassifier(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = timm.create_model(model, pretrained=False, num_classes=10, **TIMM_KWARGS.get(model, {}))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
            return F.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    return TimmClassifier()


class _Meter:
    """A Lightning callback: memory at the start of training and its peak, and the time of every training epoch."""

    def __init__(self, device: torch.device) -> None:
        self.meter, self.saved = H.MemoryMeter(device), H.SavedTensorMeter()
        self.start_mib = self.peak_mib = self._t = 0.0
        self.epoch_s: list[float] = []
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self.saved.pack, self.saved.unpack)

    def hooks(self) -> Any:
        from lightning.pytorch.callbacks import LambdaCallback

        def start(*_: Any) -> None:
            self.start_mib = self.meter.reset()

        def epoch_start(*_: Any) -> None:
            self._t = time.perf_counter()

        def epoch_end(*_: Any) -> None:
            self.epoch_s.append(time.perf_counter() - self._t)

        def end(*_: Any) -> None:
            self.peak_mib = self.meter.peak()

        return LambdaCallback(
            on_train_start=start,
            on_train_epoch_start=epoch_start,
            on_train_epoch_end=epoch_end,
            on_train_end=end,
            on_train_batch_start=lambda *_: self._hooks.__enter__(),
            on_train_batch_end=lambda *_: self._hooks.__exit__(None, None, None),
        )


def run_one(suite: dict[str, Any], model: str, method: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """One training run in this process: accuracy, memory and time per epoch."""
    import lightning as L

    from lightning_tpsgd.data import CIFAR10DataModule

    H.mmap_large_blocks()
    L.seed_everything(seed, verbose=False)
    spec = suite["methods"][method] + (f",seed={seed}" if suite["methods"][method].startswith("tpsgd") else "")
    test = 128 if args.quick else suite["test"]
    data = CIFAR10DataModule(
        data_dir=args.data_dir, batch_size=suite["batch"], val_size=0, train_subset=args.train_subset, test_subset=test
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    meter = _Meter(device)
    record = H.fit(_module(model), data, spec, args.epochs, accelerator=device.type, callbacks=[meter.hooks()])
    return {
        **record,
        "act_mib": meter.peak_mib - meter.start_mib,
        "peak_mib": meter.peak_mib,
        "saved_mib": meter.saved.peak / H.MiB,  # the peak of the tensors autograd holds for a backward
        "epoch_s": H.mean(meter.epoch_s[1:] or meter.epoch_s),  # the first epoch pays the trace and warm-up
    }


def _values(store: H.Store, model: str, method: str, key: str) -> list[float]:
    return store.values(f"{model}/{method}/*", key)


def report(store: H.Store, suite: dict[str, Any]) -> list[str]:
    s, methods = store.settings, suite["methods"]
    lines = [
        f"CIFAR-10, {s['train_subset']:,} training images, {s['epochs']} epoch(s), batch {suite['batch']}, the same "
        f"optimizer for every method; test accuracy on {s['test'] or 'the 10,000'} test images; mean ± std over "
        "seeds. Memory in MiB (2**20 bytes); activation memory = peak during training − memory in use when training "
        "starts; autograd-held = peak of the tensors saved for a backward.",
        "",
    ]
    rows, keys = [], ("act_mib", "saved_mib")
    for model in suite["models"]:
        bp = {k: H.mean(_values(store, model, "bp", k)) for k in ("acc", *keys)}
        for m, spec in methods.items():
            name = f"`{m}`" + (f" (`{spec.split(',', 1)[1]}`)" if "," in spec else "")
            row = [name, H.mean_std(acc := _values(store, model, m, "acc")), H.signed(H.mean(acc) - bp["acc"])]
            for k in keys:
                mem = _values(store, model, m, k)
                row += [H.mean_std(mem, 0), f"{H.mean(mem) / bp[k]:.2f}×" if mem and bp[k] else "–"]
            rows.append([model, *row, H.mean_std(_values(store, model, m, "epoch_s"), 1)])
    head = ["model", "method", "test acc (%)", "Δ vs bp", "activation MiB", "vs bp", "autograd-held MiB", "vs bp"]
    lines += H.md_table([*head, "s / epoch"], rows)
    if "K=3" in methods and all(_values(store, "resnet20", m, "acc") for m in methods):
        acc, mem, held = ({m: H.mean(_values(store, "resnet20", m, k)) for m in methods} for k in ("acc", *keys))
        d_bp, d_ctl = acc["K=3"] - acc["bp"], acc["K=3"] - acc["control"]
        checks = [("K=3 within 3 points of backprop", d_bp >= -3, f"{d_bp:+.2f}")]
        checks += [("K=3 ≥ 15 points above the control", d_ctl >= 15, f"{d_ctl:+.2f}")]
        for k in ("K=3", "K=9", "K=3+recompute"):
            got = f"{mem[k] / mem['bp']:.2f}×, autograd-held {held[k] / held['bp']:.2f}×"
            checks += [(f"activation memory ≤ 0.6× backprop's, {k}", mem[k] <= 0.6 * mem["bp"], got)]
        lines += ["Issue 20's bars:", "", *(f"- {n}: {'met' if ok else 'missed'} ({got})" for n, ok, got in checks), ""]
    return lines


def plot(store: H.Store, suite: dict[str, Any], title: str) -> None:
    groups = [f"{model}\n{m}" for model in suite["models"] for m in suite["methods"]]

    def series(key: str) -> dict[str, list[list[float]]]:
        return {"": [_values(store, model, m, key) for model in suite["models"] for m in suite["methods"]]}

    panels = [
        H.Panel("Test accuracy", groups, series("acc"), "%"),
        H.Panel("Activation memory", groups, series("act_mib"), "MiB"),
        H.Panel("Time per epoch", groups, series("epoch_s"), "s"),
    ]
    H.bar_chart(store.path.with_suffix(".png"), title, panels)


def main(argv: list[str] | None = None) -> H.Store | None:
    p = H.parser(__doc__, seeds=3)
    p.add_argument("--suite", choices=list(SUITES), default="resnet20")
    p.add_argument("--train-subset", type=int, default=None, help="training images (default: the suite's; --quick 512)")
    p.add_argument("--child", nargs=3, metavar=("MODEL", "METHOD", "SEED"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    out, suite = H.setup(args), SUITES[args.suite]
    args.train_subset = args.train_subset or (512 if args.quick else suite["train"])
    args.epochs = args.epochs or (1 if args.quick else suite["epochs"])
    if args.child:  # one run, in this fresh process
        model, method, seed = args.child
        print("RESULT " + json.dumps(run_one(suite, model, method, int(seed), args)), flush=True)
        return None
    name = "blockwise" if args.suite == "resnet20" else f"blockwise_{args.suite}"
    test = 128 if args.quick else suite["test"]
    settings = {"train_subset": args.train_subset, "test": test, "epochs": args.epochs, "quick": args.quick}
    store = H.Store.open(out / f"{name}.json", None if args.report_only else settings, args.fresh)
    if not args.report_only:
        store.add_command("blockwise", argv)
        forwarded = sys.argv[1:] if argv is None else argv
        jobs = [
            (f"{model}/{m}/{s}", lambda a=(model, m, str(s)): H.child("blockwise", ["--child", *a, *forwarded]))
            for s in H.seeds(args)
            for model in suite["models"]
            for m in suite["methods"]
        ]
        store.run(jobs, args.only)
    if not args.no_report:
        title = f"Block-wise tpSGD on CIFAR-10: {', '.join(suite['models'])}"
        store.write_report(title, report(store, suite), args.quick, figure=True)
        plot(store, suite, title)
    return store


if __name__ == "__main__":
    main()
