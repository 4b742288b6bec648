"""Collect the benchmark results into ``benchmarks/REPORT.md``.

Usage::

    python -m benchmarks.report            # benchmarks/results/*        -> benchmarks/REPORT.md
    python -m benchmarks.report --quick    # benchmarks/results/quick/*  -> benchmarks/results/quick/REPORT.md

Each benchmark script writes ``benchmarks/results/<name>.md`` (with the exact command that produced it) and
``<name>.json``; this script gathers the ``.md`` files, in paper order, under one table of contents, after a
summary table "paper claim vs ours" read from the ``.json`` files ("not run" where a file is absent). It runs
nothing. ``python -m benchmarks.paper`` runs the benchmarks and then this script.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SECTIONS = [
    ("defaults", "Defaults chosen by measurement: user-style models (`benchmarks/defaults.py`)"),
    ("table2", "Table 2: tpSGD vs ZORB vs LM-KARnet, 2-layer MLP on MNIST (`benchmarks/table2.py`)"),
    ("table2_tune", "Table 2 tuning on a training holdout (`benchmarks/table2.py --tune`)"),
    ("core", "Core and Table 3: MNIST / CIFAR-10 accuracy, speed and memory vs BP (`benchmarks/core.py`)"),
    ("vgg11_imagenette", "Table 4, full network: VGG11 on Imagenette (`benchmarks/vgg11_imagenette.py`)"),
    ("adaptor_table4", "Adaptors on a frozen timm backbone: paper Table 4 (`benchmarks/adaptor_table4.py`)"),
    ("rnn_tables", "Recurrent networks: paper Tables 5, 7 and 8 (`benchmarks/rnn_tables.py`)"),
    (
        "rnn_saturation",
        "Recurrent networks: the local rules and the features (`benchmarks/rnn_saturation.py`)",
    ),
    ("fig3", "Figure 3: naive vs filter-based Conv2d projections (`benchmarks/fig3.py`)"),
    ("fig4", "Figure 4: CNN scaling grid on CIFAR-10 (`benchmarks/fig4.py`)"),
    ("ddp", "Data-parallel tpSGD, 2 processes vs 1 (`benchmarks/ddp.py`)"),
    ("gpu_check", "Device check, CUDA or CPU (`benchmarks/gpu_check.py`)"),
    (
        "gpu_check_lightning",
        "Device check, `Trainer.fit` rerun with per-layer losses logged at the loggers' cadence "
        "(`benchmarks/gpu_check.py --lightning`)",
    ),
    ("step_ops", "Kernel launches and host reads per step, CPU proxy (`benchmarks/step_ops.py`)"),
]
QUICK_BANNER = (
    "**QUICK RESULTS**: every number below comes from `--quick` runs (small subsets, few epochs and seeds). They "
    "check that the benchmarks run; they are not the reproduction. The full report is `benchmarks/REPORT.md`."
)

Row = tuple[str, str, str, str]  # item, paper, ours, section


# ---------------------------------------------------------------------------------------------------- helpers
def _ms(values: list[float], digits: int = 1, unit: str = "") -> str:
    if not values:
        return "–"
    spread = f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
    seeds = "" if len(values) > 2 else f" ({len(values)} seed{'s' if len(values) > 1 else ''})"  # few: say so
    return f"{statistics.mean(values):.{digits}f}{spread}{unit}{seeds}"


def _mean(values: list[float]) -> float:
    return statistics.mean(values) if values else float("nan")


def _load(results: Path, name: str) -> dict[str, Any] | None:
    path = results / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


# ---------------------------------------------------------------------------------------------------- per table
def _table2(d: dict[str, Any], quick: bool) -> list[Row]:
    s = d["summary"]

    def cell(m: str) -> str:
        if m not in s:
            return "not run"
        x = s[m]
        return (
            f"{x['acc_mean']:.2f} ± {x['acc_std']:.2f} %, {x['time_mean']:.2f} ± {x['time_std']:.2f} s, "
            f"+{x['peak_mb_mean']:.0f} MB"
        )

    rows = [
        ("Table 2 · ZORB", "89.4 (0.22) %, 7.9 (0.39) s", cell("zorb"), "table2"),
        ("Table 2 · LM-KARnet", "89.9 (0.12) %, 4.9 (0.38) s", cell("lm_karnet"), "table2"),
        (
            "Table 2 · tpSGD",
            "88.3 (0.25) %, 1.7 (0.01) s (ℓ2)",
            f"ℓ2: {cell('tpsgd-l2')}; ce: {cell('tpsgd-ce')}",
            "table2",
        ),
    ]
    v = d.get("verdict", {})
    if "zorb" in v and "lm_karnet" in v and not quick:
        acc_ok = v["zorb"]["acc_ok"] and v["lm_karnet"]["acc_ok"]
        ours = (
            f"tpSGD-ce {v['zorb']['time_ratio']:.1f}× less time than ZORB, {v['lm_karnet']['time_ratio']:.1f}× "
            f"than LM-KARnet, accuracy {'at or above' if acc_ok else 'below'} both; ≥ 3× target "
            f"{'**met**' if v['met'] else '**not met**'}"
        )
        if "zorb-fast" in v:
            ours += f" (vs ZORB with the fast solver: {v['zorb-fast']['time_ratio']:.1f}×)"
        rows.append(("Table 2 · time claim", "tpSGD 4.6× / 2.9× faster, 1–2 points less accurate", ours, "table2"))
    return rows


def _core(d: dict[str, Any], quick: bool) -> list[Row]:
    acc = d.get("accuracy", {})

    def runs(prefix: str) -> list[dict[str, Any]]:
        return [v for k, v in acc.items() if k.startswith(prefix) and k.endswith("/quick") == quick]

    def cell(dataset: str, method: str) -> str:
        rs = runs(f"{dataset}/cnn2/{method}/")
        if not rs:
            return f"{method}: not run"
        return f"{method} {_ms([r['acc'] for r in rs], 1, ' %')}, {_mean([r['fit_s'] for r in rs]):.0f} s"

    rows = []
    paper = {
        "mnist": "tpSGD 96.6 (0.2) %, 2.7 s; BP 97.1 (0.21) %, 2.3 s",
        "cifar10": "tpSGD 46.5 (1.2) %, 4.6 s; BP 46.8 (1.1) %, 4.8 s",
    }
    for dataset, label in (("mnist", "MNIST"), ("cifar10", "CIFAR-10")):
        methods = [
            m
            for m in ("tpsgd-ce", "tpsgd-learned", "tpsgd-l2", "bp")
            if m in ("tpsgd-ce", "bp") or runs(f"{dataset}/cnn2/{m}/")
        ]
        ours = "; ".join(cell(dataset, m) for m in methods)
        rows.append((f"Table 3 · shallow CNN, {label}", paper[dataset], ours, "core"))
    return rows


def _by_method(runs: dict[str, Any]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = defaultdict(list)
    for key, r in runs.items():
        if isinstance(r, dict) and "acc" in r:
            out[key.split("/")[0]].append(float(r["acc"]))
    return out


def _vgg11(d: dict[str, Any], quick: bool) -> list[Row]:
    accs = _by_method(d.get("runs", {}))
    ours = "; ".join(f"{m} {_ms(v, 1, ' %')}" for m, v in sorted(accs.items())) or "no runs"
    return [("Table 4 · VGG11 full network", "tpSGD 64 (3.1) %, BP 78 (1.4) %", ours, "vgg11_imagenette")]


def _adaptor(d: dict[str, Any], quick: bool) -> list[Row]:
    res = d.get("results", {})
    names = {"tpsgd-L0": "tpSGD adaptor", "bp-L0": "BP adaptor", "transfer": "BP transfer"}
    ours = "; ".join(f"{label} {_ms(res[row]['acc'], 1, ' %')}" for row, label in names.items() if row in res)
    paper = "tpSGD adaptor 83 (0.95) %, BP adaptor 88 (1.7) %, transfer 87 (1.3) %"
    return [("Table 4 · adaptor / transfer", paper, ours or "no rows", "adaptor_table4")]


def _rnn(d: dict[str, Any], quick: bool) -> list[Row]:
    try:
        from .rnn_tables import COLUMNS, DATASET_TITLES, PAPER
    except Exception:  # the paper numbers live in the script; without it, ours only
        COLUMNS, DATASET_TITLES, PAPER = ("random", "random_rnn", "drtp", "l1", "bp"), {}, {}
    groups: dict[tuple[str, str, str, str], list[float]] = defaultdict(list)
    for key, r in d.get("accuracy", {}).items():
        parts = key.split("/")  # table/dataset/column/seed/e<epochs>[/quick][/changed settings of a probe]
        if len(parts) < 5 or parts[5:] not in ([], ["quick"]) or (parts[5:] == ["quick"]) != quick:
            continue  # another mode, or a validation probe
        table, dataset, column, _seed, epochs = parts[:5]
        groups[(table, dataset, column, epochs)].append(float(r["acc"]))
    rows = []
    shown = ("random_rnn", "drtp", "l1", "bp")  # random_rnn: the random-feature control (frozen RNN)
    for table, dataset in sorted({(k[0], k[1]) for k in groups}):
        epochs = max({k[3] for k in groups if k[:2] == (table, dataset)}, key=lambda e: int(e.lstrip("e") or 0))
        ours = "; ".join(
            f"{c} {_ms(groups[(table, dataset, c, epochs)], 1, ' %')}"
            for c in shown
            if (table, dataset, c, epochs) in groups
        )
        if not ours:
            untrained = _ms(groups[(table, dataset, "random", epochs)], 1, " %")
            ours = f"not run (only the untrained network: {untrained})"
        paper_vals = PAPER.get((table, dataset))
        paper = "; ".join(f"{c} {paper_vals[COLUMNS.index(c)]} %" for c in shown if c in COLUMNS) if paper_vals else "–"
        rows.append((f"Table {table} · {DATASET_TITLES.get(dataset, dataset)} ({epochs})", paper, ours, "rnn_tables"))
    return rows or [("Tables 5, 7, 8 · recurrent networks", "see paper", "no accuracy runs yet", "rnn_tables")]


def _grid(d: dict[str, Any], n_keys: int) -> dict[tuple[str, ...], list[float]]:
    out: dict[tuple[str, ...], list[float]] = defaultdict(list)
    for key, r in d.get("runs", {}).items():
        parts = key.split("/")
        if len(parts) == n_keys + 1 and isinstance(r, dict) and "acc" in r:
            out[tuple(parts[:n_keys])].append(float(r["acc"]))
    return out


def _fig3(d: dict[str, Any], quick: bool) -> list[Row]:
    g = _grid(d, 2)  # method/filters/seed
    filters = sorted({int(k[1]) for k in g})
    if not filters:
        return [("Figure 3", "see paper", "no runs", "fig3")]
    lo, hi = str(filters[0]), str(filters[-1])
    parts = []
    for method in ("filter-ce", "naive-ce", "filter-l2", "naive-l2", "bp"):
        if (method, lo) in g and (method, hi) in g:
            parts.append(f"{method} {_mean(g[(method, lo)]):.1f} → {_mean(g[(method, hi)]):.1f} %")
    paper = "filter-based sampling improves steadily with the filters; naive sampling shows little to no gain"
    return [(f"Figure 3 · accuracy, {lo} → {hi} filters", paper, "; ".join(parts), "fig3")]


def _fig4(d: dict[str, Any], quick: bool) -> list[Row]:
    g = _grid(d, 3)  # method/n_conv/n_hidden/seed
    cells = sorted({(int(k[1]), int(k[2])) for k in g if k[0] == "tpsgd" and ("bp", k[1], k[2]) in g})
    if not cells:
        return [("Figure 4", "see paper", "no runs", "fig4")]

    def gap(method: str, c: int, h: int) -> float:
        return _mean(g[("bp", str(c), str(h))]) - _mean(g[(method, str(c), str(h))])

    corner = (max(c for c, _ in cells), max(h for _, h in cells))  # the paper's "upper right"
    deepest = corner if corner in cells else max(cells, key=lambda ch: (ch[0] + ch[1], ch[1]))
    parts = []
    for method, label in (("tpsgd", "tpSGD (ce)"), ("tpsgd-learned", "tpSGD (learned)")):
        if all((method, str(c), str(h)) in g for c, h in cells):
            flat = [f"{gap(method, c, h):+.1f}" for c, h in cells if h == 0]
            parts.append(
                f"BP − {label} at n_hidden = 0 (n_conv ↑): {', '.join(flat)} points; "
                f"deepest cell (n_conv, n_hidden) = {deepest}: {gap(method, *deepest):+.1f}"
            )
    ours = ". ".join(parts)
    paper = "n_hidden = 0: tpSGD within 3–5 % of Adam; deepest networks: 10–15 % gap"
    return [("Figure 4 · tpSGD vs BP gap", paper, ours, "fig4")]


def _gpu_check(d: dict[str, Any], quick: bool) -> list[Row]:
    parts = []
    for key in sorted(k for k in d if k.endswith("/fp32/b128/bp")):
        name, bp = key.split("/")[0], d[key]
        found = []
        for method in ("tpsgd", "tpsgd-compile-graph", "tpsgd-graph"):
            ours = d.get(key[: -len("bp")] + method)
            if ours and "samples_per_s" in ours:
                speed = ours["samples_per_s"] / bp["samples_per_s"]
                if method.endswith("graph"):  # a replayed graph allocates nothing: the whole run's peak
                    memory = ours["peak_bytes"] / bp["peak_bytes"] if bp["peak_bytes"] >= 2**20 else float("nan")
                    found.append(f"{method} {speed:.2f}× BP's throughput, {memory:.2f}× its peak memory")
                else:
                    step = ours.get("step_peak_bytes", ours["peak_bytes"]) / bp.get("step_peak_bytes", bp["peak_bytes"])
                    found.append(f"{method} {speed:.2f}× BP's throughput, {step:.2f}× its step memory")
        if found:
            parts.append(f"{name}: " + ", ".join(found))
    paper = "Table 3 (RTX A5000): tpSGD 2.7 s vs BP 2.3 s (MNIST), 4.6 s vs 4.8 s (CIFAR-10)"
    return [("Device check · tpSGD vs BP per step, fp32", paper, "; ".join(parts) or "no rows", "gpu_check")]


SUMMARIES: list[tuple[str, str, str, Callable[[dict[str, Any], bool], list[Row]]]] = [
    ("table2", "Table 2", "ZORB / LM-KARnet / tpSGD, MNIST MLP", _table2),
    ("core", "Table 3", "shallow CNN, MNIST and CIFAR-10", _core),
    ("vgg11_imagenette", "Table 4", "VGG11 full network, Imagenette", _vgg11),
    ("adaptor_table4", "Table 4", "adaptor and transfer rows", _adaptor),
    ("rnn_tables", "Tables 5, 7, 8", "recurrent networks", _rnn),
    ("fig3", "Figure 3", "naive vs filter projections", _fig3),
    ("fig4", "Figure 4", "CNN scaling grid", _fig4),
    ("gpu_check", "Device check", "CUDA throughput and memory", _gpu_check),
]


def summary(results: Path, quick: bool = False) -> list[str]:
    """The "paper claim vs ours" table, from the results JSONs in ``results``."""
    lines = [
        "## Paper claim vs ours",
        "",
        "Mean ± std over seeds (the paper: mean (std) over 25 restarts, TensorFlow on an RTX A5000 GPU; ours: "
        "PyTorch on a shared 2-core CPU, except where a section names a GPU, so compare accuracies and time "
        "*ratios*, not seconds). Details in each section.",
        "",
        "| Paper item | Paper | Ours | Section |",
        "|---|---|---|---|",
    ]
    for name, item, what, fn in SUMMARIES:
        if not (results / f"{name}.json").exists():
            lines.append(f"| {item} · {what} | see paper | not run | – |")
            continue
        try:
            rows = fn(_load(results, name) or {}, quick)
        except Exception as err:  # a results file in a format this summary does not know
            rows = [(f"{item} · {what}", "see paper", f"present; no summary ({type(err).__name__})", name)]
        for label, paper, ours, section in rows:
            lines.append(f"| {label} | {paper} | {ours} | [{section}](#{section}) |")
    return lines


# ---------------------------------------------------------------------------------------------------- report
def build(quick: bool = False, results: Path | None = None) -> str:
    """The report over ``results`` (default ``benchmarks/results[/quick]``), image links relative to it."""
    inside = results is not None
    results = results if results is not None else (HERE / "results" / "quick" if quick else HERE / "results")
    prefix = "" if quick or inside else "results/"
    lines = [
        "# lightning-tpsgd: benchmark report" + (" (QUICK RESULTS)" if quick else ""),
        "",
        *([QUICK_BANNER, ""] if quick else []),
        "Every section below is a results file written by a benchmark script in this folder; each names the",
        "command that produced it. Run the benchmarks with `python -m benchmarks.paper --table all ...`; regenerate",
        "this page alone with `python -m benchmarks.report" + (" --quick`." if quick else "`."),
        "",
        *summary(results, quick),
        "",
    ]
    present = [(name, title) for name, title in SECTIONS if (results / f"{name}.md").exists()]
    lines += [f"- [{title}](#{name})" for name, title in present]
    for name, title in present:
        body = (results / f"{name}.md").read_text().splitlines()
        if body and body[0].startswith(("# ", "## ")):
            body = body[1:]  # the section title replaces the file's own
        body = [("#" + line if line.startswith("#") else line) for line in body]
        body = [line.replace("](", f"]({prefix}") if "](" in line and "://" not in line else line for line in body]
        lines += ["", f'<a id="{name}"></a>', "", f"## {title}", *body]
    missing = [name for name, _ in SECTIONS if not (results / f"{name}.md").exists()]
    if missing:
        lines += ["", "Not run yet: " + ", ".join(f"`{m}`" for m in missing) + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="collect benchmarks/results/quick/ instead")
    parser.add_argument("--results-dir", default=None, help="collect this folder; write its REPORT.md")
    args = parser.parse_args(argv)
    if args.results_dir:
        out = Path(args.results_dir) / "REPORT.md"
    else:
        out = HERE / "results" / "quick" / "REPORT.md" if args.quick else HERE / "REPORT.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    results = Path(args.results_dir) if args.results_dir else None
    out.write_text(build(args.quick, results))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
