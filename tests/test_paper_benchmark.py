"""The paper-reproduction entry point (``benchmarks/paper.py``), Table 2 and its pseudo-inverse baselines."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import paper, report, table2
from benchmarks.baselines import leaky_relu_inverse, lm_karnet, zorb
from zoo import create_model

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT / ".." / "shared" / "data"


# ---------------------------------------------------------------------------------------------------- dispatcher
def _plan(*argv: str) -> list[paper.Job]:
    return paper.plan(paper.build_parser().parse_args(list(argv)))


def test_dry_run_prints_every_command(capsys):
    argv = ["--table", "all", "--seeds", "2", "--threads", "1", "--data-dir", "DATA", "--dry-run"]
    assert paper.main(argv) == 0
    out = capsys.readouterr().out
    for module in ("table2", "core", "vgg11_imagenette", "adaptor_table4", "rnn_tables", "fig3", "fig4", "report"):
        assert f"-m benchmarks.{module}" in out
    assert out.count("benchmarks.rnn_tables") == 1 and "--tables 5 7 8" in out
    assert "--parts accuracy --experiments mnist/cnn2 cifar10/cnn2" in out
    assert "--data-dir DATA --seeds 2" in out and "OMP_NUM_THREADS=1" in out
    assert "--quick" not in out


def test_table_selection_and_options():
    jobs = _plan("--table", "fig3", "2", "--table", "8", "5", "--table", "2", "--quick", "--seeds", "1")
    assert [j.module for j in jobs] == ["benchmarks.table2", "benchmarks.rnn_tables", "benchmarks.fig3"]
    assert jobs[1].args[:3] == ["--tables", "5", "8"] and jobs[1].table == "5/8"
    assert all("--quick" in j.args for j in jobs) and all("--threads" not in j.args for j in jobs)
    four = _plan("--table", "4", "--threads", "2")
    assert [j.module for j in four] == ["benchmarks.vgg11_imagenette", "benchmarks.adaptor_table4"]
    assert "--threads" not in four[1].args and four[1].env["TPSGD_THREADS"] == "2"  # adaptor_table4: env only
    fresh = {j.module: "--fresh" in j.args for j in _plan("--table", "all", "--quick", "--fresh")}
    resumable = {"benchmarks.core", "benchmarks.vgg11_imagenette", "benchmarks.rnn_tables", "benchmarks.fig3"}
    resumable.add("benchmarks.fig4")
    assert {m for m, f in fresh.items() if f} == resumable  # table2 and the adaptors never resume
    with pytest.raises(SystemExit):
        paper.build_parser().parse_args(["--table", "6"])
    with pytest.raises(SystemExit):
        paper.build_parser().parse_args([])
    with pytest.raises(SystemExit, match="--out-dir"):
        paper.main(["--table", "3", "--out-dir", "x", "--dry-run"])


def test_quick_guard_never_overwrites_full_results(tmp_path, monkeypatch):
    monkeypatch.setattr(paper, "RESULTS", tmp_path)
    (tmp_path / "rnn_tables.md").write_text("full")
    job = paper.Job("5", "benchmarks.rnn_tables", [], ("rnn_tables",), quick_dir=False)
    with paper.quick_guard(job, True):
        assert not (tmp_path / "rnn_tables.md").exists()  # the script starts without the full store
        (tmp_path / "rnn_tables.md").write_text("quick")
        (tmp_path / "rnn_tables.json").write_text("{}")
    assert (tmp_path / "rnn_tables.md").read_text() == "full" and not (tmp_path / "rnn_tables.json").exists()
    assert (tmp_path / "quick" / "rnn_tables.md").read_text() == "quick"
    assert (tmp_path / "quick" / "rnn_tables.json").exists() and not (tmp_path / "quick" / ".held").exists()


def test_report_summary_says_not_run(tmp_path):
    text = "\n".join(report.summary(tmp_path))
    assert "Paper claim vs ours" in text and text.count("not run") == len(report.SUMMARIES)
    assert "89.4 (0.22)" not in text  # no table 2 row without its results
    (tmp_path / "table2.json").write_text("{not json")  # unreadable results: reported, not fatal
    (tmp_path / "fig3.json").write_text('{"runs": {"x": 1}}')  # a format the summary does not know
    text = "\n".join(report.summary(tmp_path))
    assert "present; no summary (JSONDecodeError)" in text and "Figure 3" in text


# ---------------------------------------------------------------------------------------------------- baselines
def _blobs(n: int = 600, d: int = 20, classes: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(classes, d, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return centres[y] + torch.randn(n, d, generator=g), y


def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


@pytest.mark.parametrize("method", ["zorb", "lm_karnet"])
@pytest.mark.parametrize("solver", ["pinv", "recursive"])
def test_pseudo_inverse_baselines_learn(method, solver):
    x, y = _blobs()
    torch.manual_seed(0)
    model = create_model("mlp2", num_classes=4, in_features=20, hidden=32, negative_slope=0.3)
    fit = zorb if method == "zorb" else lm_karnet
    info = fit(model, x, y, solver=solver, chunk=128)  # several blocks for the recursive solver
    assert info["solver"] == solver and info["slope"] == 0.3
    assert _accuracy(model, x, y) > 0.95


def test_recursive_solver_matches_the_batch_pseudo_inverse():
    x, y = _blobs(n=400, d=10, classes=3)
    models = []
    for solver in ("pinv", "recursive"):
        torch.manual_seed(1)
        model = create_model("mlp2", num_classes=3, in_features=10, hidden=8, negative_slope=0.3).double()
        lm_karnet(model, x.double(), y, solver=solver, ridge=1e-12, chunk=64)
        models.append(model)
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_baselines_reject_other_models():
    t = torch.tensor([-1.0, 0.0, 2.0])
    torch.testing.assert_close(leaky_relu_inverse(torch.nn.functional.leaky_relu(t, 0.3), 0.3), t)
    x, y = _blobs(n=50)
    with pytest.raises(ValueError, match="2-layer MLP"):
        zorb(create_model("mlp", num_classes=4, in_features=20, hidden=(8, 8)), x, y)
    with pytest.raises(ValueError, match="invertible"):
        lm_karnet(create_model("mlp2", num_classes=4, in_features=20, hidden=8, negative_slope=0.0), x, y)
    with pytest.raises(ValueError, match="solver"):
        zorb(create_model("mlp2", num_classes=4, in_features=20, hidden=8, negative_slope=0.3), x, y, solver="svd")


def test_table2_summary_and_verdict():
    runs = {
        "tpsgd-ce": [{"acc": 91.0, "fit_s": 1.0, "peak_mb": 5.0}, {"acc": 92.0, "fit_s": 1.2, "peak_mb": 6.0}],
        "zorb": [{"acc": 89.0, "fit_s": 9.0, "peak_mb": 600.0}, {"acc": 89.5, "fit_s": 9.5, "peak_mb": 600.0}],
        "lm_karnet": [{"acc": 89.9, "fit_s": 2.0, "peak_mb": 20.0}, {"acc": 90.1, "fit_s": 2.2, "peak_mb": 20.0}],
    }
    summary = table2.summarise(runs)
    assert summary["zorb"]["time_ratio_to_tpsgd_ce"] == pytest.approx(9.25 / 1.1)
    v = table2.verdict(summary)
    assert v["zorb"]["met"] and v["lm_karnet"]["acc_ok"] and not v["lm_karnet"]["met"] and not v["met"]


# ---------------------------------------------------------------------------------------------------- end to end
def _synthetic_mnist(path: Path, n_train: int = 1200, n_test: int = 400) -> None:
    """A learnable stand-in for mnist.npz: one bright 7x7 square per class at a class-dependent spot."""
    rng = np.random.default_rng(0)

    def images(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 10, n).astype(np.uint8)
        x = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for i, c in enumerate(y):
            r, col = 2 + 8 * (int(c) // 4), 2 + 6 * (int(c) % 4)
            x[i, r : r + 7, col : col + 7] = 255
        return x, y

    (xtr, ytr), (xte, yte) = images(n_train), images(n_test)
    np.savez_compressed(path / "mnist.npz", x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)


@pytest.mark.slow
def test_paper_table2_quick_end_to_end(tmp_path):
    """``python -m benchmarks.paper --table 2 --quick`` on a small synthetic MNIST, results in a temp folder."""
    _synthetic_mnist(tmp_path)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "benchmarks.paper", "--table", "2", "--quick", "--seeds", "1", "--threads", "1"]
    cmd += ["--data-dir", str(tmp_path), "--out-dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    md = (out / "table2.md").read_text()
    assert "QUICK RUN" in md and "ZORB (pinv, as published)" in md and "LM-KARnet" in md
    assert (out / "table2.png").stat().st_size > 0
    store = json.loads((out / "table2.json").read_text())
    assert store["quick"] and set(store["summary"]) == set(table2.METHODS)
    assert store["split"] == {"train": 1200, "eval": 400, "eval_name": "test"}
    assert store["summary"]["lm_karnet"]["acc_mean"] > 90  # the synthetic task is easy
    assert all(r["peak_mb"] >= 0 for runs in store["runs"].values() for r in runs)
    full_report = (out / "REPORT.md").read_text()
    assert "QUICK RESULTS" in full_report and "| Table 2 · ZORB | 89.4 (0.22) %, 7.9 (0.39) s |" in full_report
    assert "| Table 3 · shallow CNN, MNIST and CIFAR-10 | see paper | not run |" in full_report


@pytest.mark.shared_data
def test_baselines_on_real_mnist_subset():
    if not (SHARED_DATA / "mnist.npz").is_file():
        pytest.skip(f"{SHARED_DATA / 'mnist.npz'} not available")
    split = table2.make_splits(table2.load_mnist(SHARED_DATA), quick=True, tune=False)
    for fit in (zorb, lm_karnet):
        model = table2.new_model(0)
        fit(model, split["x"], split["y"], solver="recursive")
        assert _accuracy(model, split["x_eval"], split["y_eval"]) > 0.83
