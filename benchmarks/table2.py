"""Table 2 (paper §3.1): tpSGD vs the gradient-free ZORB and LM-KARnet (and BP), 2-layer MLP on MNIST.

Usage (repository root)::

    OMP_NUM_THREADS=1 python -m benchmarks.table2 --data-dir ../shared/data --seeds 3 --threads 1   # the table
    OMP_NUM_THREADS=1 python -m benchmarks.table2 --data-dir ../shared/data --seeds 1 --quick        # < 1 min
    OMP_NUM_THREADS=1 python -m benchmarks.table2 --data-dir ../shared/data --seeds 2 --tune         # holdout grid

Every method trains the same model, ``zoo`` ``mlp2`` (784 -> 256 -> leaky ReLU -> 10, slope 0.3: the
``keras.layers.LeakyReLU`` default of the paper's TensorFlow code), from the same random initialisation per
seed, on the same in-memory, normalised MNIST tensors, in this one process, interleaved (the order of the methods
rotates with the seed), and is tested by the same ``model(x_test)``:

- **tpSGD-ce** / **tpSGD-ℓ2**: ``lightning_tpsgd.LocalLearner`` with the library's ``ce`` rule / the paper's ℓ2
  rule, Adam, the recipe in ``RECIPE`` (a fraction of an epoch is a number of steps: the budget is what tpSGD,
  an SGD method, chooses); **tpSGD-ce, 1 epoch**: the same for one full epoch; **BP**: backpropagation with
  the same Adam recipe as tpSGD-ce;
- **ZORB** and **LM-KARnet**: the pseudo-inverse algorithms of ``benchmarks/baselines.py`` on the whole training
  set at once (ZORB with ``torch.linalg.pinv`` as in its paper; LM-KARnet in its low-memory regularised form);
  **ZORB (fast solver)**: ZORB with LM-KARnet's blocked normal-equation solver, i.e. its fastest form here.

Training time is wall-clock from the untrained model to the trained one (the optimizer, projections and
one-hot targets included; loading and normalising the data excluded, as it is shared). Peak memory is the
process's peak RSS (``VmHWM``) during training above its RSS at the start of that training, with freed memory
handed back to the OS before each reset and large blocks served by ``mmap`` (``benchmarks/_memory.py``).

``RECIPE``, ``L2_TARGET_SCALE`` and the baselines' regularisation were chosen with ``--tune``: it trains on the
training set minus a seeded 5000-image holdout, reports the holdout (never the test split), and writes
``table2_tune.{md,json}``. ``--quick`` uses a 5000/2000 subset and writes to ``benchmarks/results/quick/``.
Writes ``benchmarks/results/table2.{md,json,png}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._memory import mmap_large_blocks, release_freed_memory, reset_peak_rss, status_bytes
from .baselines import lm_karnet, zorb

NAME = "table2"
RESULTS = Path(__file__).resolve().parent / "results"
HIDDEN = 256
SLOPE = 0.3
HOLDOUT = 5000
QUICK = {"train": 5000, "test": 2000, "holdout": 1000}

# Chosen with --tune on the holdout (results/table2_tune.md, 2 seeds): the tpSGD-ce recipe with the smallest
# budget (fewest epochs, then fewest steps; the most accurate of equal budgets) whose holdout accuracy is at least
# the best baseline's (LM-KARnet, 89.90 %): 0.2 epoch (86 steps of 128 there, 94 on all 60000 images), 90.95 %.
# ℓ2: target scale 1 beat 30 at every lr. The baselines get their most accurate holdout setting: ZORB one
# iteration (two: 2 to 3 points worse), the fast ZORB solver ridge 1e-5, LM-KARnet ridge 1e-3 (1e-5 .. 1e-2 are
# within 0.2 points).
RECIPE: dict[str, float] = {"epochs": 0.2, "batch_size": 128, "lr": 2e-3}
L2_TARGET_SCALE = 1.0
ZORB_RIDGE = 1e-5
KARNET_RIDGE = 1e-3

# Paper Table 2: accuracy % (std), training time s (std), 25 restarts, TensorFlow 2.9 on an RTX A5000.
PAPER: dict[str, tuple[float, float, float, float]] = {
    "zorb": (89.4, 0.22, 7.9, 0.39),
    "lm_karnet": (89.9, 0.12, 4.9, 0.38),
    "tpsgd-l2": (88.3, 0.25, 1.7, 0.01),
}
LABELS = {
    "tpsgd-ce": "tpSGD-ce (library rule)",
    "tpsgd-l2": "tpSGD-ℓ2 (paper's rule)",
    "tpsgd-ce-1ep": "tpSGD-ce, 1 epoch",
    "bp": "BP (same recipe as tpSGD-ce)",
    "zorb": "ZORB (pinv, as published)",
    "zorb-fast": "ZORB (fast solver)",
    "lm_karnet": "LM-KARnet",
}
METHODS = tuple(LABELS)
SHORT = {
    "tpsgd-ce": "tpSGD-ce",
    "tpsgd-l2": "tpSGD-ℓ2",
    "tpsgd-ce-1ep": "tpSGD-ce\n1 epoch",
    "bp": "BP",
    "zorb": "ZORB\n(pinv)",
    "zorb-fast": "ZORB\n(fast solver)",
    "lm_karnet": "LM-KARnet",
}
BASELINES = ("zorb", "lm_karnet")  # the target compares tpSGD-ce with these


# ---------------------------------------------------------------------------------------------------- data
def load_mnist(data_dir: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flattened, normalised float32 MNIST ``(x_train, y_train, x_test, y_test)`` from ``mnist.npz``."""
    path = Path(data_dir)
    path = path if path.is_file() else path / "mnist.npz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; pass --data-dir with the shared mnist.npz (see its README).")
    with np.load(path) as npz:
        arrays = {k: npz[k] for k in ("x_train", "y_train", "x_test", "y_test")}

    def images(a: np.ndarray) -> torch.Tensor:
        return ((torch.from_numpy(a).reshape(len(a), -1).float() / 255.0) - 0.1307) / 0.3081

    return (
        images(arrays["x_train"]),
        torch.from_numpy(arrays["y_train"]).long(),
        images(arrays["x_test"]),
        torch.from_numpy(arrays["y_test"]).long(),
    )


def make_splits(data: tuple[torch.Tensor, ...], quick: bool, tune: bool) -> dict[str, torch.Tensor]:
    """Train and evaluation tensors: the test split, or (``tune``) a seeded holdout of the training set."""
    x, y, x_test, y_test = data
    g = torch.Generator().manual_seed(1234)
    if quick:
        keep = torch.randperm(len(x), generator=g)[: QUICK["train"] + (QUICK["holdout"] if tune else 0)]
        x, y = x[keep], y[keep]
        test_keep = torch.randperm(len(x_test), generator=g)[: QUICK["test"]]
        x_test, y_test = x_test[test_keep], y_test[test_keep]
    if tune:
        holdout = QUICK["holdout"] if quick else HOLDOUT
        perm = torch.randperm(len(x), generator=g)
        x_test, y_test = x[perm[:holdout]], y[perm[:holdout]]
        x, y = x[perm[holdout:]], y[perm[holdout:]]
    return {"x": x.contiguous(), "y": y.contiguous(), "x_eval": x_test.contiguous(), "y_eval": y_test.contiguous()}


# ---------------------------------------------------------------------------------------------------- methods
def new_model(seed: int, in_features: int = 784) -> nn.Module:
    from zoo import create_model

    torch.manual_seed(seed)
    return create_model("mlp2", num_classes=10, in_features=in_features, hidden=HIDDEN, negative_slope=SLOPE)


def fit_sgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int, cfg: dict[str, Any]) -> dict[str, Any]:
    """tpSGD (``cfg["rule"]`` set) or BP (``rule`` None): Adam, ``epochs`` (may be fractional) of ``batch_size``."""
    from lightning_tpsgd import LocalLearner

    batch, lr = int(cfg["batch_size"]), float(cfg["lr"])

    def adam(params: Any) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=lr, fused=True)

    learner = None
    if cfg.get("rule"):
        # labels are checked once here instead of at every step (validate=False)
        assert int(y.min()) >= 0 and int(y.max()) < 10
        learner = LocalLearner(
            model,
            rule=cfg["rule"],
            target_scale=cfg.get("target_scale", 1.0),
            seed=seed,
            optimizer=adam,
            validate=False,
        )
        step: Callable[[torch.Tensor, torch.Tensor], Any] = learner.step
    else:
        optimizer = adam(model.parameters())

        def step(xb: torch.Tensor, yb: torch.Tensor) -> None:
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(xb), yb).backward()
            optimizer.step()

    n = len(x)
    batch = min(batch, n)
    steps = max(1, round(float(cfg["epochs"]) * n / batch))
    g = torch.Generator().manual_seed(seed)
    perm, pos = torch.randperm(n, generator=g), 0
    for _ in range(steps):
        if pos + batch > n:  # next epoch (the last partial batch is dropped)
            perm, pos = torch.randperm(n, generator=g), 0
        idx = perm[pos : pos + batch]
        pos += batch
        step(x[idx], y[idx])
    if learner is not None:
        learner.close()
    return {"steps": steps, "samples": steps * batch}


def method_configs(recipe: dict[str, float] | None = None) -> dict[str, dict[str, Any]]:
    """The configuration of every method of the table."""
    recipe = dict(RECIPE if recipe is None else recipe)
    return {
        "tpsgd-ce": {"kind": "sgd", "rule": "ce", **recipe},
        "tpsgd-l2": {"kind": "sgd", "rule": "l2", "target_scale": L2_TARGET_SCALE, **recipe},
        "tpsgd-ce-1ep": {"kind": "sgd", "rule": "ce", **recipe, "epochs": 1.0},
        "bp": {"kind": "sgd", "rule": None, **recipe},
        "zorb": {"kind": "zorb", "solver": "pinv", "iterations": 1},
        "zorb-fast": {"kind": "zorb", "solver": "recursive", "iterations": 1, "ridge": ZORB_RIDGE},
        "lm_karnet": {"kind": "lm_karnet", "solver": "recursive", "ridge": KARNET_RIDGE},
    }


def run_one(cfg: dict[str, Any], split: dict[str, torch.Tensor], seed: int) -> dict[str, Any]:
    """Train a fresh model with ``cfg`` and return accuracy (%), training time (s) and peak memory (MB)."""
    model = new_model(seed, split["x"].shape[1])
    x, y = split["x"], split["y"]
    kwargs = {k: v for k, v in cfg.items() if k != "kind"}
    release_freed_memory()
    base = reset_peak_rss()
    start = time.perf_counter()
    if cfg["kind"] == "sgd":
        info = fit_sgd(model, x, y, seed, kwargs)
    elif cfg["kind"] == "zorb":
        info = zorb(model, x, y, **kwargs)
    else:
        info = lm_karnet(model, x, y, **kwargs)
    fit_s = time.perf_counter() - start
    peak = status_bytes("VmHWM") - base
    with torch.no_grad():
        model.eval()
        acc = 100.0 * float((model(split["x_eval"]).argmax(1) == split["y_eval"]).float().mean())
    del model
    release_freed_memory()
    return {"acc": acc, "fit_s": fit_s, "peak_mb": peak / 2**20, **{k: v for k, v in info.items() if k == "steps"}}


# ---------------------------------------------------------------------------------------------------- summary
def _mean(values: list[float]) -> float:
    return statistics.mean(values) if values else float("nan")


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    out = {}
    for method, rs in runs.items():
        if not rs:
            continue
        out[method] = {
            "acc_mean": _mean([r["acc"] for r in rs]),
            "acc_std": _std([r["acc"] for r in rs]),
            "time_mean": _mean([r["fit_s"] for r in rs]),
            "time_std": _std([r["fit_s"] for r in rs]),
            "peak_mb_mean": _mean([r["peak_mb"] for r in rs]),
            "peak_mb_max": max(r["peak_mb"] for r in rs),
            "seeds": len(rs),
        }
    tp = out.get("tpsgd-ce")
    for s in out.values():
        s["time_ratio_to_tpsgd_ce"] = s["time_mean"] / tp["time_mean"] if tp else float("nan")
    return out


def verdict(summary: dict[str, dict[str, float]], factor: float = 3.0) -> dict[str, Any]:
    """The issue's target: tpSGD-ce at ZORB's and LM-KARnet's accuracy or better, in ≤ 1/3 of their time."""
    tp = summary.get("tpsgd-ce")
    out: dict[str, Any] = {}
    for base in (*BASELINES, "zorb-fast"):
        s = summary.get(base)
        if tp is None or s is None:
            continue
        ratio = s["time_mean"] / tp["time_mean"]
        acc_ok = tp["acc_mean"] >= s["acc_mean"]
        out[base] = {"time_ratio": ratio, "acc_ok": acc_ok, "met": acc_ok and ratio >= factor}
    present = [b for b in BASELINES if b in out]
    out["met"] = bool(present) and all(out[b]["met"] for b in present)
    return out


# ---------------------------------------------------------------------------------------------------- report
def _fmt(mean: float, std: float, digits: int = 2) -> str:
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def write_report(store: dict[str, Any], out: Path) -> Path:
    s, quick, tune = store["summary"], store["quick"], store.get("tune", False)
    split = store["split"]
    lines = [f"# Table 2: tpSGD vs ZORB vs LM-KARnet (vs BP), 2-layer MLP on MNIST{' (QUICK)' if quick else ''}", ""]
    if quick:
        lines += [
            f"**QUICK RUN**: {split['train']} training / {split['eval']} test images, a smoke test, not the "
            "result; times and accuracies are not comparable with the paper.",
            "",
        ]
    lines += [
        f"Command: `{store['command']}`",
        "",
        f"Machine: {os.cpu_count()} CPU cores (shared with other jobs), torch {torch.__version__}, "
        f"{store['threads']} torch thread(s), float32, all methods in one process, interleaved. "
        f"Model `mlp2` (784 → {HIDDEN} → leaky ReLU({SLOPE}) → 10); {split['train']} training images, "
        f"accuracy on {split['eval']} {split['eval_name']} images; mean ± std over {store['seeds']} seed(s).",
        "",
        "| Method | Accuracy (%) | Training time (s) | Peak RSS above start (MB) | Time / tpSGD-ce | "
        "Paper accuracy (%) | Paper time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for method in METHODS:
        if method not in s:
            continue
        m = s[method]
        paper = PAPER.get(method)
        lines.append(
            f"| {LABELS[method]} | {_fmt(m['acc_mean'], m['acc_std'])} | {_fmt(m['time_mean'], m['time_std'])} | "
            f"{m['peak_mb_mean']:.0f} | {m['time_ratio_to_tpsgd_ce']:.2f}× | "
            + (f"{paper[0]} ({paper[1]}) | {paper[2]} ({paper[3]}) |" if paper else "– | – |")
        )
    settings = store["settings"]
    rec = settings["tpsgd-ce"]
    steps = store["runs"]["tpsgd-ce"][0].get("steps") if store["runs"].get("tpsgd-ce") else None
    lines += [
        "",
        f"tpSGD / BP recipe: Adam (fused) lr {rec['lr']}, batch {rec['batch_size']}, {rec['epochs']} epoch(s)"
        + (f" = {steps} steps" if steps else "")
        + f"; tpSGD-ℓ2 target scale {settings['tpsgd-l2']['target_scale']}. ZORB: 1 iteration; its fast solver "
        f"and LM-KARnet: regularisation {settings['zorb-fast']['ridge']} / {settings['lm_karnet']['ridge']} "
        "(relative to the Gram diagonal). "
        + ("Chosen on the holdout with `--tune` (`table2_tune.md`)." if not tune else ""),
        "",
    ]
    v = store.get("verdict", {})
    if quick:
        lines += ["**Target** (issue 6): not evaluated on a quick run (a few steps on a subset).", ""]
    elif v and not tune:
        lines += ["**Target** (issue 6): tpSGD at ZORB's and LM-KARnet's accuracy or better in ≥ 3× less time:"]
        for base in (*BASELINES, "zorb-fast"):
            if base in v:
                b = v[base]
                lines.append(
                    f"- vs {LABELS[base]}: {b['time_ratio']:.2f}× less time, accuracy "
                    f"{'at or above' if b['acc_ok'] else '**below**'} theirs → {'met' if b['met'] else '**not met**'}"
                )
        lines += [f"- overall (ZORB as published and LM-KARnet): **{'met' if v['met'] else 'not met'}**", ""]
    lines += ["Notes:"]
    if steps:
        lines.append(
            f"- Budgets: tpSGD-ce and BP see {steps * int(rec['batch_size'])} training images ({steps} Adam steps, "
            f"{rec['epochs']} epoch); ZORB and LM-KARnet solve with all {split['train']} at once. One full epoch of "
            "tpSGD-ce (its own row) is for scale."
        )
    lines += [
        "- The paper's tpSGD row is tpSGD-ℓ2; its times are TensorFlow on a GPU, ours PyTorch on a shared CPU: "
        "compare the time ratios, not the seconds.",
        "- Memory: ZORB (pinv) materialises the N×785 input matrix, its SVD and its pseudo-inverse (its peak grows "
        "with N); LM-KARnet and the fast ZORB solver sum (d+1)² Gram matrices over blocks of 2048 rows; tpSGD and BP "
        "hold one batch, the gradients and Adam's state.",
        "- Leaky-ReLU slope 0.3 for every method: with PyTorch's 0.01, the inverse activation the pseudo-inverse "
        "methods need scales negative targets by 100 and LM-KARnet drops to about 80 % (measured while prototyping).",
        "",
        f"![Table 2]({NAME}{'_tune' if tune else ''}.png)",
        "",
    ]
    path = out / f"{NAME}{'_tune' if tune else ''}.md"
    path.write_text("\n".join(lines))
    return path


def plot(store: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install lightning-tpsgd[benchmarks]); no plot written.")
        return None
    s = store["summary"]
    methods = [m for m in METHODS if m in s]
    labels = [SHORT[m] for m in methods]
    colors = ["tab:green" if m.startswith("tpsgd") else "tab:blue" if m == "bp" else "tab:orange" for m in methods]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    panels = (("acc", "accuracy (%)", False), ("time", "training time (s)", True), ("peak_mb", "peak RSS (MB)", True))
    for ax, (key, ylabel, log) in zip(axes, panels, strict=True):
        means = [s[m][f"{key}_mean"] for m in methods]
        errs = [s[m].get(f"{key}_std", 0.0) for m in methods]
        ax.bar(range(len(methods)), [max(v, 1e-3) for v in means], yerr=errs, color=colors, capsize=3)
        ax.set_xticks(range(len(methods)), labels, fontsize=7)
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
        else:
            ax.set_ylim(max(0.0, min(means) - 5), 100)
            paper = [(i, PAPER[m][0]) for i, m in enumerate(methods) if m in PAPER]
            ax.scatter([i for i, _ in paper], [a for _, a in paper], marker="x", color="k", zorder=3, label="paper")
            ax.legend(loc="upper right")
    title = "Table 2: mlp2 on MNIST (green: tpSGD, blue: BP, orange: pseudo-inverse methods)"
    fig.suptitle(title + (" — QUICK RUN" if store["quick"] else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------- tuning
def tune_grid(quick: bool) -> dict[str, dict[str, Any]]:
    """Named configurations evaluated by ``--tune`` (all on the holdout)."""
    grid: dict[str, dict[str, Any]] = {}
    epochs = (0.1, 0.2, 0.3, 0.5, 1.0)
    for e in epochs:
        for b in (64, 128, 256):
            for lr in (1e-3, 2e-3, 5e-3):
                cfg = {"kind": "sgd", "rule": "ce", "epochs": e, "batch_size": b, "lr": lr}
                grid[f"tpsgd-ce/e{e}/b{b}/lr{lr}"] = cfg
    for e in (0.2, 1.0):
        for lr in (1e-3, 2e-3, 5e-3):
            for ts in (1.0, 30.0):
                grid[f"tpsgd-l2/e{e}/b128/lr{lr}/ts{ts}"] = {
                    "kind": "sgd",
                    "rule": "l2",
                    "target_scale": ts,
                    "epochs": e,
                    "batch_size": 128,
                    "lr": lr,
                }
    for ridge in (1e-5, 1e-4, 1e-3, 1e-2):
        grid[f"lm_karnet/recursive/r{ridge}"] = {"kind": "lm_karnet", "solver": "recursive", "ridge": ridge}
        for it in (1, 2):
            grid[f"zorb-fast/recursive/r{ridge}/it{it}"] = {
                "kind": "zorb",
                "solver": "recursive",
                "ridge": ridge,
                "iterations": it,
            }
    grid["lm_karnet/pinv"] = {"kind": "lm_karnet", "solver": "pinv"}
    for it in (1, 2):
        grid[f"zorb/pinv/it{it}"] = {"kind": "zorb", "solver": "pinv", "iterations": it}
    if quick:  # a few of each, enough to exercise the code
        keep = [k for k in grid if "/e1.0/" in k and "/b128/" in k] + [k for k in grid if "r0.001" in k]
        grid = {k: grid[k] for k in keep + ["zorb/pinv/it1", "lm_karnet/pinv"]}
    return grid


def run_tune(args: argparse.Namespace, split: dict[str, torch.Tensor], out: Path, command: str) -> dict[str, Any]:
    grid = tune_grid(args.quick)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in grid}
    for seed in range(args.seeds):
        for name, cfg in grid.items():
            runs[name].append(run_one(cfg, split, seed))
            r = runs[name][-1]
            print(f"[tune seed {seed}] {name}: {r['acc']:.2f}% in {r['fit_s']:.2f}s", flush=True)
    store = {
        "command": command,
        "grid": grid,
        "runs": runs,
        "quick": args.quick,
        "seeds": args.seeds,
        "split": {"train": len(split["y"]), "holdout": len(split["y_eval"])},
    }
    return write_tune_report(store, out)


def write_tune_report(store: dict[str, Any], out: Path) -> dict[str, Any]:
    """Pick the baselines' settings and tpSGD-ce's recipe from the tuning runs; write ``table2_tune.{md,json}``."""
    grid, runs = store["grid"], store["runs"]
    summary = {
        k: {"acc": _mean([r["acc"] for r in v]), "time": _mean([r["fit_s"] for r in v])} for k, v in runs.items()
    }
    best = {}
    for family in ("zorb", "zorb-fast", "lm_karnet"):
        cands = {k: v for k, v in summary.items() if k.startswith(family + "/")}
        best[family] = max(cands, key=lambda k: cands[k]["acc"])
    bar = max(summary[best[f]]["acc"] for f in ("zorb", "lm_karnet"))
    ok = {k: v for k, v in summary.items() if k.startswith("tpsgd-ce/") and v["acc"] >= bar}
    # the smallest budget (a noise-free stand-in for time: epochs, then steps), then the most accurate
    choice = min(ok, key=lambda k: (grid[k]["epochs"], -grid[k]["batch_size"], -ok[k]["acc"])) if ok else None
    store.update(summary=summary, best_baselines=best, accuracy_bar=bar, tpsgd_ce_choice=choice)
    (out / f"{NAME}_tune.json").write_text(json.dumps(store, indent=1))
    split = store["split"]
    lines = [
        f"# Table 2 tuning on a training holdout{' (QUICK)' if store['quick'] else ''}",
        "",
        f"Command: `{store['command']}`",
        "",
        f"Holdout: {split['holdout']} images of the training set (seeded), training on the other "
        f"{split['train']}; mean over {store['seeds']} seed(s); the test split is never used here. Times are "
        "wall-clock on a shared, busy 2-core machine (not interleaved here): only rough.",
        "",
        "Best baselines (holdout accuracy): "
        + ", ".join(f"{f}: `{k}` {summary[k]['acc']:.2f} % in {summary[k]['time']:.2f} s" for f, k in best.items()),
        "",
        f"Accuracy bar (best of ZORB and LM-KARnet): {bar:.2f} %. Smallest tpSGD-ce budget at or above it "
        "(fewest epochs, then fewest steps; the most accurate of equal budgets): "
        + (f"`{choice}` ({summary[choice]['acc']:.2f} % in {summary[choice]['time']:.2f} s)." if choice else "none."),
        "",
        "| Configuration | Holdout accuracy (%) | Training time (s) |",
        "|---|---|---|",
        *[f"| `{k}` | {v['acc']:.2f} | {v['time']:.2f} |" for k, v in sorted(summary.items())],
        "",
    ]
    (out / f"{NAME}_tune.md").write_text("\n".join(lines))
    print("\n".join(lines[:10]))
    return store


# ---------------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=os.environ.get("TPSGD_DATA_DIR", "../shared/data"))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="5000/2000-image subset; writes to benchmarks/results/quick/")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch threads")
    p.add_argument("--tune", action="store_true", help="grid on a training holdout; writes table2_tune.{md,json}")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--out-dir", default=None, help="write here instead of benchmarks/results[/quick]")
    p.add_argument("--report-only", action="store_true", help="rewrite table2.{md,png} from table2.json")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    mmap_large_blocks()
    out = Path(args.out_dir) if args.out_dir else (RESULTS / "quick" if args.quick else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    command = "OMP_NUM_THREADS=1 python -m benchmarks.table2 " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.report_only:
        store = json.loads((out / f"{NAME}.json").read_text())
        plot(store, out / f"{NAME}.png")
        print(write_report(store, out).read_text())
        return store
    split = make_splits(load_mnist(args.data_dir), args.quick, args.tune)
    if args.tune:
        return run_tune(args, split, out, command)
    configs = {m: c for m, c in method_configs().items() if m in args.methods}
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in configs}
    order = list(configs)
    for seed in range(args.seeds):
        rotation = order[seed % len(order) :] + order[: seed % len(order)]
        for method in rotation:
            r = run_one(configs[method], split, seed)
            runs[method].append({"seed": seed, **r})
            print(
                f"[seed {seed}] {method}: {r['acc']:.2f}% in {r['fit_s']:.2f}s, peak +{r['peak_mb']:.0f} MB",
                flush=True,
            )
    summary = summarise(runs)
    store = {
        "command": command,
        "quick": args.quick,
        "tune": False,
        "seeds": args.seeds,
        "threads": args.threads,
        "split": {
            "train": len(split["y"]),
            "eval": len(split["y_eval"]),
            "eval_name": "test",
        },
        "model": {"name": "mlp2", "hidden": HIDDEN, "negative_slope": SLOPE},
        "settings": {m: {k: v for k, v in c.items()} for m, c in method_configs().items()},
        "paper": {k: {"acc": v[0], "acc_std": v[1], "time_s": v[2], "time_std": v[3]} for k, v in PAPER.items()},
        "runs": runs,
        "summary": summary,
        "verdict": verdict(summary),
    }
    (out / f"{NAME}.json").write_text(json.dumps(store, indent=1))
    report = write_report(store, out)
    plot(store, out / f"{NAME}.png")
    print(report.read_text())
    return store


if __name__ == "__main__":
    main()
