"""The paper's figures trained in a plain loop: Figure 3 (naive vs filter-based Conv2d projections on MNIST), Figure 4
(the CNN grid on CIFAR-10) and Table 4's VGG11 row; each results file lists the commands that made it."""

import itertools
import math
import statistics
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import _harness as H
from . import paper_numbers as P


@dataclass(frozen=True)
class Figure:
    name: str  # the results' file stem
    title: str
    seeds: int
    full: dict[str, Any]
    quick: dict[str, Any]
    common: dict[str, Any]
    methods: Callable[[dict], dict[str, str]]
    cells: Callable[[dict], list[tuple[int, ...]]]
    build: Callable[[dict, tuple[int, ...], str], nn.Module]
    data: Callable[[dict, int, str], Any]
    report: Callable[[H.Store], list[str]]
    plot: Callable[[H.Store, Path], None]
    about: str  # what is trained, with the settings' {placeholders}
    curve: bool = False  # test accuracy after every epoch


def _npz(cls_name: str, s: dict[str, Any], seed: int, data_dir: str, **extra: Any) -> Any:
    kwargs = dict(batch_size=s["batch_size"], train_subset=s["train_subset"], test_subset=s["test_subset"], **extra)
    return _datamodule(cls_name, source="npz", data_dir=data_dir, val_size=0, seed=seed, **kwargs)


@lru_cache(maxsize=1)  # set up once, reused by the runs that share it (one dataset at a time)
def _datamodule(cls_name: str, **kwargs: Any) -> Any:
    import lightning_tpsgd.data

    dm = getattr(lightning_tpsgd.data, cls_name)(**kwargs)
    dm.setup()
    return dm


def _create(name: str, **kwargs: Any) -> nn.Module:
    from zoo import create_model

    return create_model(name, num_classes=10, **kwargs)


def _acc(store: H.Store, *key: Any, name: str = "acc") -> list[float]:
    return store.values("/".join(map(str, key)) + "/*", name)


def _about(store: H.Store) -> list[str]:
    s, n = store.settings, max((len(_acc(store, k.rsplit("/", 1)[0])) for k in store.runs), default=0)
    data = f"{s['train_subset'] or 'all'} training and {s['test_subset'] or 'all'} test images"
    budget = f"{s['epochs']} epoch(s), batch {s['batch_size']}, Adam(lr={s['lr']:g}) for every method"
    about = next(f.about for f in FIGURES.values() if f.name == store.path.stem).format(**s)
    return [f"{about} Data: {data}. Training: {budget}. Up to {n} seeds per cell (mean ± std).", ""]


def _fig3_methods(s: dict[str, Any]) -> dict[str, str]:
    rules = {"ce": "tpsgd-ce", "l2": f"tpsgd-l2@{s['l2_target_scale']:g}"}
    tpsgd = {f"{p}-{r}": f"{m},conv_projection={p}" for r, m in rules.items() for p in ("filter", "naive")}
    return {**tpsgd, "control": "control", "bp": "bp"}


def fig3_verdict(store: H.Store, filters: list[int]) -> list[str]:
    """The paper's claim tested on the data: filter-based gains with K, naive does not."""
    lo, hi, gains, rows = filters[0], filters[-1], {}, []
    for m in _fig3_methods(store.settings):
        if (a := _acc(store, m, lo)) and (b := _acc(store, m, hi)):
            gain, sd = H.mean(b) - H.mean(a), math.sqrt(H.std(a) ** 2 + H.std(b) ** 2)
            gains[m] = (gain, gain > max(2 * sd, 0.3))
            best = max((k for k in filters if _acc(store, m, k)), key=lambda k: H.mean(_acc(store, m, k)))
            cells = [f"{H.mean(a):.2f}", f"{H.mean(b):.2f}", f"{gain:+.2f} ± {sd:.2f}"]
            rows.append([m, *cells, "yes" if gains[m][1] else "no", best])
    header = ["method", f"acc K={lo}", f"acc K={hi}", "gain", "significant", "best K"]
    lines = [f"Gain from K={lo} to K={hi}, ± sqrt(s1² + s2²); *significant*: > 2 × that and > 0.3.", ""]
    lines += H.md_table(header, rows)
    for rule in ("ce", "l2"):
        diffs = [H.mean(_acc(store, f"filter-{rule}", k)) - H.mean(_acc(store, f"naive-{rule}", k)) for k in filters]
        ahead = f"filter ahead at {sum(d > 0 for d in diffs)} of {len(diffs)} K"
        lines.append(f"- rule `{rule}`: filter − naive at each K: {', '.join(map(H.signed, diffs))} ({ahead}).")
        if (f := gains.get(f"filter-{rule}")) and (n := gains.get(f"naive-{rule}")):
            holds = "holds" if f[1] and n[0] < 0.5 * f[0] else "does not hold"
            lines += [f"- rule `{rule}`: filter-based gains {f[0]:+.2f} points, naive {n[0]:+.2f}. The paper's finding"]
            lines[-1] += f" (read as: filter gain significant, naive gain below half of it) **{holds}**."
    if "control" in gains:
        lines += [f"- The untrained control gains {gains['control'][0]:+.2f} points: more filters help untrained too."]
    return [*lines, ""]


def _fig3_report(store: H.Store) -> list[str]:
    s, methods = store.settings, list(_fig3_methods(store.settings))

    def table(name: str, fmt: Callable[[list[float]], str]) -> list[str]:
        rows = ([k, *(fmt(_acc(store, m, k, name=name)) for m in methods)] for k in s["filters"])
        return H.md_table(["K", *methods], rows)

    lines = [*_about(store), f"Paper (Figure 3 prints no numbers): {P.FIGURE3}", ""]
    lines += ["## Test accuracy (%) by number of filters K", "", *table("acc", H.mean_std)]
    lines += ["## Does the paper's finding hold?", "", *fig3_verdict(store, s["filters"])]
    return [*lines, "## Training time per run (s, mean over seeds)", "", *table("fit_s", lambda v: f"{H.mean(v):.1f}")]


def _fig3_plot(store: H.Store, path: Path) -> None:
    filters = store.settings["filters"]
    fig, axes = H.pyplot().subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, rule in zip(axes, ("ce", "l2"), strict=True):
        for m, style in ((f"filter-{rule}", "o-"), (f"naive-{rule}", "s-"), ("control", "k:"), ("bp", "g--")):
            runs = [_acc(store, m, k) for k in filters]
            means, stds = [H.mean(r) for r in runs], [H.std(r) for r in runs]
            ax.errorbar(filters, means, yerr=stds, fmt=style, capsize=3, label=m)
        ax.set_xscale("log", base=2)
        ax.set(xlabel="number of filters K", ylabel="MNIST test accuracy (%)", title=f"tpSGD rule `{rule}`")
        ax.legend()
    fig.suptitle("Figure 3: Conv2d(k5) + LeakyReLU + Linear on MNIST, naive vs filter-based projection")
    H.save_figure(fig, path)


FIG3 = Figure(
    name="fig3",
    title="Figure 3: naive vs filter-based Conv2d projections",
    seeds=3,
    full={"filters": [1, 2, 4, 8, 16, 32], "epochs": 1, "train_subset": None, "test_subset": None},
    quick={"filters": [1, 4, 16], "epochs": 1, "train_subset": 2000, "test_subset": 1000},
    common={"batch_size": 128, "lr": 1e-3, "l2_target_scale": 1.0, "negative_slope": 0.01},
    methods=_fig3_methods,
    cells=lambda s: [(k,) for k in s["filters"]],
    build=lambda s, cell, label: _create("convgrid", n_conv=1, n_hidden=0, in_chans=1, input_size=28, filters=cell[0]),
    data=partial(_npz, "MNISTDataModule"),
    report=_fig3_report,
    plot=_fig3_plot,
    about="`convgrid(n_conv=1, n_hidden=0, in_chans=1, input_size=28, filters=K)` = Conv2d(1, K, 5) → LeakyReLU → "
    'Linear(K·24·24, 10) on MNIST. **filter-/naive-ce**: rule `ce`, `conv_projection="filter"` / `"naive"`; '
    "**filter-/naive-l2**: the paper's ℓ2 (`target_scale={l2_target_scale}`); **control**: the convolution frozen at "
    "its random init; **bp**: backpropagation.",
)


FIG4_BASE = {"bp": "bp", "control": "control"}
FIG4_LABELS = {"tpsgd": "tpSGD (ce)", "tpsgd-learned": "tpSGD (learned)", "bp": "BP (Adam)", "control": "control"}


def _fig4(store: H.Store, method: str, c: int, h: int, name: str = "acc") -> list[float]:
    method = "bp" if method == "control" and c == h == 0 else method  # (0, 0) has nothing to freeze: the control is BP
    return _acc(store, method, c, h, name=name)


def _fig4_report(store: H.Store) -> list[str]:
    s, cifar = store.settings, P.TABLE3["cifar10", "cnn2"]

    def grid(title: str, cell: Callable[[int, int], str]) -> list[str]:
        rows = ([h, *(cell(c, h) for c in s["n_conv"])] for h in reversed(s["n_hidden"]))  # deeper heads on top
        return [f"## {title}", "", *H.md_table(["n_hidden \\ n_conv", *map(str, s["n_conv"])], rows)]

    def cell(method: str, name: str = "acc", fmt: Callable[[list[float]], str] = H.mean_std) -> Callable:
        return lambda c, h: fmt(_fig4(store, method, c, h, name))

    def gap(a: str, b: str) -> Callable[[int, int], str]:
        return lambda c, h: H.signed(H.mean(_fig4(store, a, c, h)) - H.mean(_fig4(store, b, c, h)), 1)

    paper = f"Paper: {P.FIGURE4} Table 3's CNN (cell (2, 0)): tpSGD {P.fmt(*cifar['tpsgd'][:2])}, "
    lines = [*_about(store), paper + f"BP {P.fmt(*cifar['bp'][:2])}.", ""]
    for method, label in FIG4_LABELS.items():
        lines += grid(f"Test accuracy (%), {label}", cell(method, fmt=partial(H.mean_std, digits=1)))
    for a, b in (("tpsgd", "bp"), ("tpsgd-learned", "bp"), ("tpsgd", "control"), ("tpsgd-learned", "control")):
        lines += grid(f"{FIG4_LABELS[a]} − {FIG4_LABELS[b]} (accuracy points)", gap(a, b))
    lines += grid("tpSGD (learned) − tpSGD (ce) (accuracy points)", gap("tpsgd-learned", "tpsgd"))
    for method in ("tpsgd", "tpsgd-learned", "bp"):
        per_epoch = partial(lambda v, e: f"{H.mean(v) / e:.1f}", e=s["epochs"])
        lines += grid(f"Training time per epoch (s), {FIG4_LABELS[method]}", cell(method, "fit_s", per_epoch))
    return lines


def _fig4_plot(store: H.Store, path: Path) -> None:
    import numpy as np

    s, shown = store.settings, ("tpsgd", "tpsgd-learned", "bp")
    fig, axes = H.pyplot().subplots(2, 3, figsize=(15, 8))
    panels = (("acc", "test accuracy (%)"), ("fit_s", f"training time (s, {s['epochs']} epochs)"))
    for row, (name, what) in enumerate(panels):
        grid = lambda m: [[H.mean(_fig4(store, m, c, h, name)) for c in s["n_conv"]] for h in s["n_hidden"]]  # noqa: E731,B023
        data = {m: np.array(grid(m)) for m in shown}
        lo, hi = np.nanmin(list(data.values())), np.nanmax(list(data.values()))
        for ax, m in zip(axes[row], shown, strict=True):
            fig.colorbar(ax.imshow(data[m], origin="lower", cmap="viridis", vmin=lo, vmax=hi, aspect="auto"), ax=ax)
            for (i, j), v in np.ndenumerate(data[m]):  # dark text on viridis' yellow end
                ax.text(j, i, f"{v:.3g}", ha="center", va="center", color="k" if v - lo > 0.6 * (hi - lo) else "w")
            ax.set_xticks(range(len(s["n_conv"])), s["n_conv"])
            ax.set_yticks(range(len(s["n_hidden"])), s["n_hidden"])
            ax.set(xlabel="n_conv (Conv2d k5)", ylabel="n_hidden (Linear)", title=f"{FIG4_LABELS[m]}: {what}")
    fig.suptitle(f"Figure 4 on CIFAR-10: {s['train_subset'] or 50000} training images, {s['epochs']} epochs")
    H.save_figure(fig, path)


FIG4 = Figure(
    name="fig4",
    title="Figure 4: CNN scaling grid on CIFAR-10, tpSGD vs BP",
    seeds=2,
    full={"n_conv": [0, 1, 2, 3], "n_hidden": [0, 1, 2, 3], "epochs": 2, "train_subset": 20000, "test_subset": 5000},
    quick={"n_conv": [0, 1], "n_hidden": [0, 1], "epochs": 1, "train_subset": 1000, "test_subset": 500},
    common={"batch_size": 128, "lr": 1e-3, "filters": 16, "hidden": 256},
    methods=lambda s: {"tpsgd": "tpsgd-ce,conv_projection=filter", "tpsgd-learned": "tpsgd-learned"} | FIG4_BASE,
    cells=lambda s: [(c, h) for c in s["n_conv"] for h in s["n_hidden"]],
    build=lambda s, c, _: _create("convgrid", n_conv=c[0], n_hidden=c[1], filters=s["filters"], hidden=s["hidden"]),
    data=partial(_npz, "CIFAR10DataModule"),
    report=_fig4_report,
    plot=_fig4_plot,
    about="Grid: n_conv ∈ {n_conv} Conv2d(k=5, {filters} filters) + LeakyReLU(0.01), n_hidden ∈ {n_hidden} "
    "Linear({hidden}) + LeakyReLU(0.01), then Linear(·, 10) (`convgrid`; the paper's grid: up to 10 trainable layers), "
    'on CIFAR-10, a short budget. **tpsgd**: `rule="ce"`; **tpsgd-learned**: `rule="learned"` (a linear readout per '
    "hidden block, not part of the model); **bp**; **control**: every layer but the last frozen at its random init "
    "(at (0, 0) the control is BP).",
)


VGG_ROWS = {  # row -> (method, BatchNorm2d after every convolution), in the order the rows train
    "tpsgd": ("tpsgd-ce,conv_projection=filter", False),
    "bp": ("bp", False),
    "control": ("control", False),
    "tpsgd-bn": ("tpsgd-ce,conv_projection=filter", True),
    "bp-bn": ("bp", True),
    "tpsgd-learned-bn": ("tpsgd-learned", True),
    "tpsgd-learned": ("tpsgd-learned", False),
}
VGG_ORDER = ("tpsgd", "tpsgd-learned", "bp", "control", "tpsgd-bn", "tpsgd-learned-bn", "bp-bn")


def _vgg(s: dict[str, Any], batch_norm: bool = False, width: float | None = None, size: int | None = None) -> nn.Module:
    size, width, options = (
        size or s["image_size"],
        width or s["width"],
        {"hidden": s["hidden"], "dropout": s["dropout"]},
    )
    return _create("vgg11", batch_norm=batch_norm, input_size=size, width=width, **options)


def param_mib(model: nn.Module) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad) / H.MiB


def _vgg_report(store: H.Store) -> list[str]:
    s, rows, acc = store.settings, [], {r: H.mean(_acc(store, r)) for r in VGG_ORDER if _acc(store, r)}
    for row in acc:
        runs = store.select(f"{row}/*")
        curve = " → ".join(f"{H.mean(v):.1f}" for v in zip(*(r["test_curve"] for r in runs), strict=True))
        paper = P.TABLE4.get(f"vgg11/{row.split('-')[0]}") if row != "control" else None
        epoch = f"{statistics.median(e for r in runs for e in r['epoch_s']):.0f}"
        paper_acc, mib = P.fmt(*paper[:2]) if paper else "–", f"{runs[0]['trained_mib']:.2f}"
        rows.append([row, H.mean_std(_acc(store, row), n=True), paper_acc, mib, epoch, curve])
    full = [param_mib(_vgg(s, width=1.0, size=size)) for size in (s["image_size"], 224)]
    header = ["row", "test accuracy (%)", "paper", "trained (MiB)", "epoch (s, median)", "test accuracy by epoch"]
    lines = [*_about(store), *H.md_table(header, rows)]
    lines += ["Trained: float32 parameters being trained (control: the last Linear). The full-width VGG11 of the zoo"]
    lines += [f"has {full[0]:.1f} MiB at {s['image_size']} px and {full[1]:.1f} MiB at 224 px; the paper's"]
    lines += [
        f"{P.TABLE4['vgg11/tpsgd'][2]:g} MB matches neither (its classifier width and input size are not stated)."
    ]
    lines += [""]
    pairs = [("tpsgd", "bp"), ("tpsgd-learned", "bp"), ("tpsgd-bn", "bp-bn"), ("tpsgd-learned-bn", "bp-bn")]
    for a, b in [*pairs, ("tpsgd", "control"), ("tpsgd-learned", "control")]:
        if a in acc and b in acc:
            paper = " (paper: 64 − 78 = −14)" if b.startswith("bp") else ""
            lines.append(f"- {a} − {b}: {acc[a] - acc[b]:+.1f} points{paper}.")
    return [*lines, ""]


def _vgg_plot(store: H.Store, path: Path) -> None:
    fig, ax = H.pyplot().subplots(figsize=(8.5, 4.5))
    for row, style in zip(VGG_ORDER, ("o-C0", "^-C4", "s-C1", "x:k", "o--C2", "^--C5", "s--C3"), strict=True):
        if runs := store.select(f"{row}/*"):
            curve = [H.mean(v) for v in zip(*(r["test_curve"] for r in runs), strict=True)]
            ax.plot(range(1, len(curve) + 1), curve, style, label=row)
    for row, color in (("tpsgd", "C0"), ("bp", "C1")):
        ax.axhline(P.TABLE4[f"vgg11/{row}"][0], color=color, lw=0.8, ls=":", label=f"paper {row}")
    ax.set(xlabel="epoch", ylabel="Imagenette test accuracy (%)", title=f"VGG11 at {store.settings['image_size']} px")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    H.save_figure(fig, path)


VGG11 = Figure(
    name="vgg11_imagenette",
    title="Table 4, first row: full VGG11 from scratch on Imagenette",
    seeds=1,
    full={"image_size": 64, "width": 0.25, "epochs": 6, "train_subset": None, "test_subset": None},
    quick={"image_size": 32, "width": 0.25, "epochs": 2, "train_subset": 1000, "test_subset": 500},
    common={"batch_size": 64, "lr": 1e-3, "hidden": 512, "dropout": 0.5},
    methods=lambda s: {row: method for row, (method, _) in VGG_ROWS.items()},
    cells=lambda s: [()],
    build=lambda s, cell, row: _vgg(s, batch_norm=VGG_ROWS[row][1]),
    data=lambda s, seed, root: _npz("ImagenetteDataModule", s, seed, root, image_size=s["image_size"], decode="once"),
    report=_vgg_report,
    plot=_vgg_plot,
    about="`zoo.vgg11(input_size={image_size}, width={width}, hidden={hidden}, dropout={dropout}[, batch_norm=True])`: "
    "8 Conv2d(k3) [+ BatchNorm2d] + LeakyReLU(0.01), five max-pools, three Linear, every layer trained, on Imagenette "
    "(`imagenette_112_jpeg.npz` at {image_size} px; test: the official validation split). **Reduced for a CPU: "
    '{image_size} px, {width}× the filters.** **tpsgd**: `rule="ce"`; **tpsgd-learned**: `rule="learned"` (readouts '
    "not in the trained size); **bp**; **control** (random features); **-bn**: with BatchNorm2d.",
    curve=True,
)
FIGURES = {"fig3": FIG3, "fig4": FIG4, "vgg11": VGG11}


def run_one(fig: Figure, label: str, cell: tuple, seed: int, s: dict[str, Any], data_dir: str) -> dict[str, Any]:
    dm = fig.data(s, seed, data_dir)
    torch.manual_seed(seed)
    model, test, method = fig.build(s, cell, label), dm.test_dataloader(), fig.methods(s)[label]
    kwargs = dict(lr=s["lr"], seed=seed, test_loader=test if fig.curve else None)
    out = H.train(model, method, dm.train_dataloader(), s["epochs"], **kwargs)
    acc = out["test_curve"][-1] if fig.curve else H.evaluate(model, test)
    return {**out, "acc": acc, "trained_mib": param_mib(model)}


def jobs(fig: Figure, seeds: list[int], s: dict[str, Any], data_dir: str) -> Iterator[H.Job]:
    for seed, cell, label in itertools.product(seeds, fig.cells(s), fig.methods(s)):
        if not (fig is FIG4 and label == "control" and cell == (0, 0)):  # nothing to freeze: the control is BP
            yield "/".join(map(str, (label, *cell, seed))), partial(run_one, fig, label, cell, seed, s, data_dir)


def main(argv: list[str] | None = None) -> H.Store:
    p = H.parser(__doc__, seeds=None)
    p.add_argument("figure", choices=list(FIGURES), help="which figure")
    args = p.parse_args(argv)
    fig, out = FIGURES[args.figure], H.setup(args)
    budget = fig.quick if args.quick else fig.full
    settings = None if args.report_only else {**budget, **fig.common, "quick": args.quick}
    store = H.Store.open(out / f"{fig.name}.json", settings, args.fresh)
    if not args.report_only:
        store.add_command("figures", argv)
        store.run(jobs(fig, H.seeds(args, fig.seeds), store.settings, args.data_dir), args.only)
        store.save()
    if not args.no_report:
        store.write_report(fig.title, fig.report(store), quick=store.settings["quick"], figure=True)
        fig.plot(store, store.path.with_suffix(".png"))
    return store


if __name__ == "__main__":
    main()
