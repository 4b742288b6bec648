"""Collect every result into ``benchmarks/REPORT.md`` (``python -m benchmarks.report``); ``--run`` first runs the
scripts of the tables asked for, each in a fresh process (``--run all --quick --seeds 1``: a smoke test)."""

import argparse
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from . import _harness as H
from . import paper_numbers as P

SECTIONS = ("defaults", "table2", "table2_tune", "core", "vgg11_imagenette", "adaptor_table4", "rnn_tables")
SECTIONS += ("rnn_saturation", "fig3", "fig4", "blockwise", "blockwise_timm", "ddp", "steps", "gpu_check")
SECTIONS += ("gpu_check_lightning",)
RUNS: dict[str, list[list[str]]] = {  # table -> the commands (module, arguments) that reproduce it
    "2": [["table2"]],
    "3": [["accuracy", "core", "--rows", "mnist/cnn2", "cifar10/cnn2"]],
    "4": [["figures", "vgg11"], ["adaptor_table4"]],
    **{table: [["rnn_tables", "accuracy", "--tables", table]] for table in "578"},
    **{figure: [["figures", figure]] for figure in ("fig3", "fig4")},
}
Row = tuple[str, str, str]  # item, paper, ours


def _table2(store: H.Store) -> list[Row]:
    from .table2 import METHODS, summarise, verdict

    s, paper = summarise(store, METHODS), {m: f"{P.fmt(*v[:2])} %, {P.fmt(*v[2:])} s" for m, v in P.TABLE2.items()}
    ours = {
        m: f"{x['acc']:.2f} ± {x['acc_std']:.2f} %, {x['time']:.2f} s, +{x['peak_mib']:.0f} MiB" for m, x in s.items()
    }
    rows = [
        (f"Table 2 · {name}", paper[m], ours.get(m, "not run"))
        for m, name in (("zorb", "ZORB"), ("lm_karnet", "LM-KARnet"))
    ]
    tpsgd = f"ℓ2: {ours.get('tpsgd-l2')}; ce: {ours.get('tpsgd-ce')}"
    rows += [("Table 2 · tpSGD", paper["tpsgd-l2"] + " (ℓ2)", tpsgd)]
    if (v := verdict(s)).get("zorb") and v.get("lm_karnet") and not store.settings["quick"]:
        ratios = f"tpSGD-ce {v['zorb']['time_ratio']:.1f}× / {v['lm_karnet']['time_ratio']:.1f}× less time than ZORB / "
        ratios += f"LM-KARnet: ≥ 3× target {'met' if v['met'] else 'not met'}"
        rows += [("Table 2 · time claim", P.TABLE2_CLAIM, ratios)]
    return rows


def _core(store: H.Store) -> list[Row]:
    rows = []
    for name, label in (("mnist/cnn2", "MNIST"), ("cifar10/cnn2", "CIFAR-10")):
        paper = P.TABLE3[tuple(name.split("/"))]
        methods = ("tpsgd-ce", "tpsgd-learned", "tpsgd-l2@30", "bp")
        ours = "; ".join(f"{m} {H.mean_std(store.values(f'{name}/{m}/*'), 1)} %" for m in methods)
        paper = f"tpSGD {P.fmt(*paper['tpsgd'][:2])} %; BP {P.fmt(*paper['bp'][:2])} %"
        rows.append((f"Table 3 · shallow CNN, {label}", paper, ours))
    return rows


def _vgg11(store: H.Store) -> list[Row]:
    from .figures import VGG_ORDER

    ours = "; ".join(f"{r} {H.mean_std(store.values(f'{r}/*'), 1)} %" for r in VGG_ORDER if store.select(f"{r}/*"))
    paper = f"tpSGD {P.fmt(*P.TABLE4['vgg11/tpsgd'][:2])} %, BP {P.fmt(*P.TABLE4['vgg11/bp'][:2])} %"
    return [("Table 4 · VGG11 full network", paper, ours)]


def _adaptor(store: H.Store) -> list[Row]:
    from .adaptor_table4 import PAPER, ROWS

    ours = "; ".join(f"{ROWS[r][0]} {H.mean_std(store.runs[r]['acc'], 1)} %" for r in PAPER if r in store.runs)
    paper = "; ".join(f"{ROWS[r][0]} {P.fmt(*P.TABLE4[p][:2])} %" for r, p in PAPER.items())
    return [("Table 4 · adaptor / transfer", paper, ours)]


def _rnn(store: H.Store) -> list[Row]:
    from .rnn_tables import TITLES, runs

    shown, rows = ("random_rnn", "drtp", "l1", "bp"), []
    for (table, dataset), paper in P.RNN.items():
        cells = {c: [r["acc"] for r in runs(store, table, dataset, c, 20, False)] for c in shown}
        ours = "; ".join(f"{c} {H.mean_std(v, 1)} %" for c, v in cells.items() if v)
        paper = "; ".join(f"{c} {paper[P.RNN_COLUMNS.index(c)]} %" for c in shown)
        rows += [(f"Table {table} · {TITLES[dataset]} (e20)", paper, ours)] if ours else []
    return rows


def _fig3(store: H.Store) -> list[Row]:
    lo, hi = store.settings["filters"][0], store.settings["filters"][-1]
    acc = lambda m, k: H.mean(store.values(f"{m}/{k}/*"))  # noqa: E731
    methods = ("filter-ce", "naive-ce", "filter-l2", "naive-l2", "bp")
    ours = "; ".join(f"{m} {acc(m, lo):.1f} → {acc(m, hi):.1f} %" for m in methods)
    paper = "filter-based improves steadily, naive shows little gain"
    return [(f"Figure 3 · accuracy, {lo} → {hi} filters", paper, ours)]


def _fig4(store: H.Store) -> list[Row]:
    s, parts = store.settings, []
    gap = lambda m, c, h: H.mean(store.values(f"bp/{c}/{h}/*")) - H.mean(store.values(f"{m}/{c}/{h}/*"))  # noqa: E731
    deep = (s["n_conv"][-1], s["n_hidden"][-1])
    for m, label in (("tpsgd", "ce"), ("tpsgd-learned", "learned")):
        row0 = ", ".join(f"{gap(m, c, 0):+.1f}" for c in s["n_conv"][1:])
        parts += [f"BP − tpSGD ({label}) at n_hidden = 0 (n_conv ↑): {row0}; deepest cell {deep}: {gap(m, *deep):+.1f}"]
    paper = "n_hidden = 0: within 3–5 % of Adam; deepest networks: 10–15 % gap"
    return [("Figure 4 · tpSGD vs BP gap", paper, ". ".join(parts))]


def _gpu(store: H.Store) -> list[Row]:
    parts = []
    for model in ("cnn2", "convnet4", "rnn1"):
        base = f"cuda/{model}/fp32/b128"
        if (bp := store.runs.get(f"{base}/bp")) and (tp := store.runs.get(f"{base}/tpsgd-ce")):
            graph = store.runs.get(f"{base}/tpsgd-ce-compile-graph", {}).get("samples_per_s", float("nan"))
            eager, captured = tp["samples_per_s"] / bp["samples_per_s"], graph / bp["samples_per_s"]
            memory = tp["step_peak_mib"] / bp["step_peak_mib"]
            parts.append(f"{model}: {eager:.2f}× BP's throughput eager, {captured:.2f}× compiled and captured, ")
            parts[-1] += f"{memory:.2f}× its step memory"
    paper = "Table 3 (RTX A5000): tpSGD 2.7 s vs BP 2.3 s (MNIST), 4.6 s vs 4.8 s (CIFAR-10)"
    return [("Device check · tpSGD (rule ce) vs BP per step, fp32, batch 128", paper, "; ".join(parts))]


SUMMARIES: dict[str, Callable[[H.Store], list[Row]]] = {
    "table2": _table2, "core": _core, "vgg11_imagenette": _vgg11, "adaptor_table4": _adaptor, "rnn_tables": _rnn,
    "fig3": _fig3, "fig4": _fig4, "gpu_check": _gpu,
}  # fmt: skip


def summary(results: Path) -> list[str]:
    rows = []
    for name, fn in SUMMARIES.items():
        link, path = f"[{name}](#{name})", results / f"{name}.json"
        try:
            rows += [[*row, link] for row in fn(H.Store.open(path))] if path.exists() else [[name, "–", "not run", "–"]]
        except Exception as err:  # noqa: BLE001 - a results file this summary cannot read is reported, not fatal
            rows.append([name, "–", f"present; no summary ({type(err).__name__})", link])
    intro = ["Mean ± std over seeds (the paper: mean (std) over 25 restarts, TensorFlow on an RTX A5000 GPU; ours:"]
    intro += ["PyTorch on a shared 2-core CPU unless a section names a GPU): compare accuracies and time *ratios*.", ""]
    return ["## Paper claim vs ours", "", *intro, *H.md_table(["Paper item", "Paper", "Ours", "Section"], rows)]


def build(results: Path, quick: bool = False, prefix: str = "") -> str:
    present = [n for n in SECTIONS if (results / f"{n}.md").exists()]
    titles = {n: (results / f"{n}.md").read_text().splitlines()[0].lstrip("# ") for n in present}
    lines = ["# lightning-tpsgd: benchmark report" + " (QUICK RESULTS: smoke tests, not the reproduction)" * quick, ""]
    lines += ["Every section is a results file of `benchmarks/results/` with the commands that produced it;"]
    lines += ["regenerate this page with `python -m benchmarks.report`.", "", *summary(results)]
    lines += [f"- [{titles[n]}](#{n})" for n in present]
    for name in present:
        body = (results / f"{name}.md").read_text().splitlines()[1:]  # headings one level down, links under prefix
        body = [
            "#" + x if x.startswith("#") else x.replace("](", f"]({prefix}") if "](" in x and "://" not in x else x
            for x in body
        ]
        lines += ["", f'<a id="{name}"></a>', "", f"## {titles[name]}", *body]
    missing = ", ".join(f"`{n}`" for n in SECTIONS if n not in present)
    return "\n".join([*lines, *(["", f"Not run yet: {missing}."] if missing else [])]) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", nargs="+", default=[], choices=[*RUNS, "all"], help="run these tables' scripts first")
    p.add_argument("--data-dir")
    p.add_argument("--seeds", type=int)
    p.add_argument("--threads", type=int)
    p.add_argument("--out", type=Path, help="results folder (default benchmarks/results[/quick])")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--fresh", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = p.parse_args(argv)
    results = args.out or (H.RESULTS / "quick" if args.quick else H.RESULTS)
    passed = {k: v for k, v in vars(args).items() if k in ("data_dir", "seeds", "threads", "out") and v}
    common = [f"--{k.replace('_', '-')}={v}" for k, v in passed.items()]
    common += ["--quick"] * args.quick + ["--fresh"] * args.fresh
    env = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}
    commands = list({" ".join(c): c for t in (RUNS if "all" in args.run else args.run) for c in RUNS[t]}.values())
    failed = []
    for module, *extra in commands:
        cmd = [sys.executable, "-m", f"benchmarks.{module}", *extra, *common]
        print(" ".join(f"{k}={v}" for k, v in env.items()), "python", *cmd[1:], flush=True)
        if not args.dry_run and subprocess.run(cmd, cwd=H.ROOT, env={**os.environ, **env}, check=False).returncode:
            failed.append(module)
    if not args.dry_run:
        inside = args.quick or args.out  # a quick or side report lies beside its results
        out = results / "REPORT.md" if inside else H.ROOT / "benchmarks" / "REPORT.md"
        out.write_text(build(results, args.quick, "" if inside else "results/"))
        print(f"wrote {out}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
