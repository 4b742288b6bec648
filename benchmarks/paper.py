"""Reproduce the paper's tables and figures: one entry point over the benchmark scripts, then the report.

Usage (repository root)::

    python -m benchmarks.paper --table 2 --data-dir ../shared/data --seeds 3 --threads 1
    python -m benchmarks.paper --table 3 --table fig3 --data-dir ../shared/data --seeds 3
    python -m benchmarks.paper --table all --data-dir ../shared/data --seeds 1 --quick     # smoke test
    python -m benchmarks.paper --table all --seeds 3 --dry-run                             # print the commands

What each ``--table`` runs (each command in a fresh process, so that peak-memory figures are honest):

=========  =====================================================================================================
2          ``benchmarks.table2``: tpSGD vs ZORB vs LM-KARnet vs BP, 2-layer MLP on MNIST
3          ``benchmarks.core --parts accuracy --experiments mnist/cnn2 cifar10/cnn2``: the shallow CNN
4          ``benchmarks.vgg11_imagenette`` (full-net VGG11 row) and ``benchmarks.adaptor_table4`` (adaptor rows)
5, 7, 8    ``benchmarks.rnn_tables --tables ...`` (one run for all the recurrent tables asked for)
fig3       ``benchmarks.fig3``: naive vs filter-based Conv2d projections
fig4       ``benchmarks.fig4``: the CNN scaling grid on CIFAR-10
all        all of the above
=========  =====================================================================================================

Afterwards ``benchmarks/REPORT.md`` is regenerated (``benchmarks/report.py``), starting with a "paper claim vs
ours" summary. ``--quick`` passes ``--quick`` to every script and keeps the quick results apart: they end up in
``benchmarks/results/quick/`` (scripts that write quick results next to the full ones are run with the full
files set aside and restored afterwards), and the quick report is ``benchmarks/results/quick/REPORT.md``.
``--threads T`` is passed as ``--threads`` (and ``OMP_NUM_THREADS`` / ``TPSGD_THREADS`` in the environment).
A script that is not present is reported and skipped; the exit status is non-zero if any command failed.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TABLES = ("2", "3", "4", "5", "7", "8", "fig3", "fig4")
RNN_TABLES = ("5", "7", "8")


@dataclass
class Job:
    """One benchmark command: ``python -m <module> <args>`` and the result files it writes."""

    table: str
    module: str
    args: list[str]
    outputs: tuple[str, ...]  # result names, written as <name>.{md,json,png}
    env: dict[str, str] = field(default_factory=dict)
    quick_dir: bool = True  # the script itself writes --quick results to results/quick/
    out_dir: bool = True  # the script takes --out-dir

    def argv(self) -> list[str]:
        return [sys.executable, "-m", self.module, *self.args]

    def shell(self) -> str:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items()))
        cmd = " ".join(shlex.quote(a) for a in ["python", "-m", self.module, *self.args])
        return f"{env} {cmd}".strip()


def expand_tables(requested: list[str]) -> list[str]:
    """``all`` → every table; duplicates dropped; paper order."""
    chosen = set(TABLES) if "all" in requested else set(requested)
    return [t for t in TABLES if t in chosen]


def plan(args: argparse.Namespace) -> list[Job]:
    """The commands for ``args.table`` in paper order (the recurrent tables share one command)."""
    tables = expand_tables(args.table)
    common = ["--data-dir", args.data_dir, "--seeds", str(args.seeds)]
    quick = ["--quick"] if args.quick else []
    threads = ["--threads", str(args.threads)] if args.threads else []
    out = ["--out-dir", args.out_dir] if args.out_dir else []
    env = {"OMP_NUM_THREADS": str(args.threads), "TPSGD_THREADS": str(args.threads)} if args.threads else {}
    fresh = ["--fresh"] if args.fresh else []  # for the scripts that resume from their saved runs
    jobs: list[Job] = []
    for table in tables:
        if table == "2":
            jobs.append(Job("2", "benchmarks.table2", [*common, *quick, *threads, *out], ("table2",), env))
        elif table == "3":
            core = ["--parts", "accuracy", "--experiments", "mnist/cnn2", "cifar10/cnn2"]
            core += [*common, *quick, *threads, *fresh]
            jobs.append(Job("3", "benchmarks.core", core, ("core",), env, out_dir=False))
        elif table == "4":
            vgg = [*common, *quick, *threads, *out, *fresh]
            jobs.append(Job("4", "benchmarks.vgg11_imagenette", vgg, ("vgg11_imagenette",), env))
            # adaptor_table4 takes its thread count from TPSGD_THREADS
            jobs.append(
                Job("4", "benchmarks.adaptor_table4", [*common, *quick], ("adaptor_table4",), env, False, False)
            )
        elif table in RNN_TABLES:
            if any(j.module == "benchmarks.rnn_tables" for j in jobs):
                continue
            rnn = [t for t in tables if t in RNN_TABLES]
            tag = "/".join(rnn)
            rnn_args = ["--tables", *rnn, *common, *quick, *threads, *fresh]
            jobs.append(Job(tag, "benchmarks.rnn_tables", rnn_args, ("rnn_tables",), env, False, False))
        else:  # fig3, fig4
            jobs.append(Job(table, f"benchmarks.{table}", [*common, *quick, *threads, *out, *fresh], (table,), env))
    return jobs


@contextmanager
def quick_guard(job: Job, enabled: bool) -> Iterator[None]:
    """Keep a quick run from overwriting full results.

    The job's full result files in ``results/`` are moved to ``results/quick/.held/`` for the run; whatever the
    run wrote to ``results/`` is then moved to ``results/quick/`` and the full files are put back.
    """
    if not enabled:
        yield
        return
    quick_dir, held_dir = RESULTS / "quick", RESULTS / "quick" / ".held"
    names = [f"{name}.{ext}" for name in job.outputs for ext in ("md", "json", "png")]
    held_dir.mkdir(parents=True, exist_ok=True)
    held = []
    for name in names:
        if (RESULTS / name).exists():
            shutil.move(RESULTS / name, held_dir / name)
            held.append(name)
    try:
        yield
    finally:
        for name in names:
            if (RESULTS / name).exists():
                shutil.move(RESULTS / name, quick_dir / name)
        for name in held:
            shutil.move(held_dir / name, RESULTS / name)
        if not any(held_dir.iterdir()):
            held_dir.rmdir()


def restore_held() -> None:
    """Put back full results that a killed quick run left in ``results/quick/.held/``."""
    held_dir = RESULTS / "quick" / ".held"
    if not held_dir.is_dir():
        return
    for path in held_dir.iterdir():
        if not (RESULTS / path.name).exists():
            shutil.move(path, RESULTS / path.name)
            print(f"restored {RESULTS / path.name} (left aside by an interrupted quick run)")
    if not any(held_dir.iterdir()):
        held_dir.rmdir()


def run_job(job: Job, quick: bool, out_dir: str | None = None) -> str:
    """Run one command; returns ``"ok"``, ``"skipped (...)"`` or ``"failed (...)"``."""
    if importlib.util.find_spec(job.module) is None:
        return f"skipped ({job.module} is not present)"
    print(f"\n=== table {job.table}: {job.shell()}", flush=True)
    start = time.perf_counter()
    with quick_guard(job, quick and not job.quick_dir and not out_dir):
        proc = subprocess.run(job.argv(), cwd=ROOT, env={**os.environ, **job.env}, check=False)
    took = time.perf_counter() - start
    if proc.returncode != 0:
        return f"failed (exit code {proc.returncode}, {took:.0f} s)"
    return f"ok ({took:.0f} s)"


def report_args(args: argparse.Namespace) -> list[str]:
    if args.out_dir:
        return ["--results-dir", args.out_dir] + (["--quick"] if args.quick else [])
    return ["--quick"] if args.quick else []


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.paper", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--table",
        action="extend",
        nargs="+",
        required=True,
        choices=[*TABLES, "all"],
        help="table(s) / figure(s) to reproduce; repeat or list several",
    )
    p.add_argument("--data-dir", default=os.environ.get("TPSGD_DATA_DIR", "../shared/data"))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="small and fast; results go to benchmarks/results/quick/")
    p.add_argument("--threads", type=int, default=None, help="torch / OpenMP threads of every script")
    p.add_argument(
        "--out-dir",
        default=None,
        help="write results (and REPORT.md) here instead of benchmarks/results[/quick]; only for tables whose "
        "scripts take --out-dir (2, fig3, fig4 and the VGG11 row of 4)",
    )
    p.add_argument(
        "--fresh",
        action="store_true",
        help="rerun every run instead of resuming from saved ones (with --quick: only the quick results are "
        "discarded; without it, the full results of the tables asked for)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--no-report", action="store_true", help="do not regenerate the report afterwards")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.seeds < 1:
        raise SystemExit("--seeds must be >= 1")
    if args.threads is not None and args.threads < 1:
        raise SystemExit("--threads must be >= 1")
    jobs = plan(args)
    if args.out_dir:
        refused = sorted({f"{j.table} ({j.module})" for j in jobs if not j.out_dir})
        if refused:
            raise SystemExit(f"--out-dir: these scripts always write to benchmarks/results: {', '.join(refused)}")
    if args.dry_run:
        for job in jobs:
            note = "" if importlib.util.find_spec(job.module) else "   # not present: would be skipped"
            print(f"[table {job.table}] {job.shell()}{note}")
        report = ["python", "-m", "benchmarks.report", *report_args(args)]
        if not args.no_report:
            print("[report] " + " ".join(report))
        return 0
    restore_held()
    status = {f"{job.table}: {job.module}": run_job(job, args.quick, args.out_dir) for job in jobs}
    if not args.no_report:
        report = [sys.executable, "-m", "benchmarks.report", *report_args(args)]
        proc = subprocess.run(report, cwd=ROOT, check=False)
        status["report"] = "ok" if proc.returncode == 0 else f"failed (exit code {proc.returncode})"
    print("\nSummary:")
    for name, state in status.items():
        print(f"- {name}: {state}")
    return 1 if any(s.startswith("failed") for s in status.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
