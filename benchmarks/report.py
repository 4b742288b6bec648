"""Collect the benchmark results into ``benchmarks/REPORT.md``.

Usage::

    python -m benchmarks.report

Each benchmark script writes ``benchmarks/results/<name>.md`` (with the exact command that produced it);
this script only gathers those files, in a fixed order, under one table of contents. It runs nothing.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
SECTIONS = [
    ("core", "Core: MNIST / CIFAR-10 accuracy, throughput and memory vs backpropagation (`benchmarks/core.py`)"),
    ("rnn_tables", "Recurrent networks: paper Tables 5, 7 and 8 (`benchmarks/rnn_tables.py`)"),
    ("adaptor_table4", "Adaptors on a frozen timm backbone: paper Table 4 (`benchmarks/adaptor_table4.py`)"),
    ("ddp", "Data-parallel tpSGD, 2 processes vs 1 (`benchmarks/ddp.py`)"),
    ("gpu_check", "Device check, CUDA or CPU (`benchmarks/gpu_check.py`)"),
]


def build() -> str:
    lines = [
        "# lightning-tpsgd: benchmark report",
        "",
        "Every section below is a results file written by a benchmark script in this folder; each names the",
        "command that produced it. Regenerate this page with `python -m benchmarks.report`.",
        "",
    ]
    present = [(name, title) for name, title in SECTIONS if (HERE / "results" / f"{name}.md").exists()]
    lines += [f"- [{title}](#{name})" for name, title in present]
    for name, title in present:
        body = (HERE / "results" / f"{name}.md").read_text().splitlines()
        if body and body[0].startswith("# "):
            body = body[1:]  # the section title replaces the file's own
        body = [("#" + line if line.startswith("#") else line) for line in body]
        body = [line.replace("](", "](results/") if "](" in line and "://" not in line else line for line in body]
        lines += ["", f'<a id="{name}"></a>', "", f"## {title}", *body]
    missing = [name for name, _ in SECTIONS if (HERE / "results" / f"{name}.md").exists() is False]
    if missing:
        lines += ["", "Not run yet: " + ", ".join(f"`{m}`" for m in missing) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    (HERE / "REPORT.md").write_text(build())
    print(f"wrote {HERE / 'REPORT.md'}")


if __name__ == "__main__":
    main()
