"""``benchmarks/report.py`` (runs the paper's tables, collects REPORT.md), Table 2 and its pseudo-inverse baselines."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import _harness as H
from benchmarks import report, table2
from benchmarks.baselines import leaky_relu_inverse, lm_karnet, zorb
from zoo import create_model

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT / ".." / "shared" / "data"


# ---------------------------------------------------------------------------------------------------- report
def test_dry_run_prints_every_command(capsys):
    argv = ["--run", "all", "--seeds", "2", "--threads", "1", "--data-dir", "DATA", "--dry-run"]
    assert report.main(argv) == 0
    out = capsys.readouterr().out
    for module in ("table2", "accuracy core", "figures vgg11", "adaptor_table4", "rnn_tables accuracy", "figures fig3"):
        assert f"-m benchmarks.{module}" in out
    assert "--data-dir=DATA --seeds=2 --threads=1" in out and "OMP_NUM_THREADS=1" in out and "--quick" not in out
    assert out.count("figures fig4") == 1 and out.count("rnn_tables") == 3  # tables 5, 7 and 8
    with pytest.raises(SystemExit):
        report.main(["--run", "6"])


def test_report_summary_says_not_run_and_survives_unreadable_results(tmp_path):
    text = "\n".join(report.summary(tmp_path))
    assert "Paper claim vs ours" in text and text.count("not run") == len(report.SUMMARIES)
    (tmp_path / "table2.json").write_text("{not json")
    (tmp_path / "fig3.json").write_text('{"runs": {"x": 1}}')  # a layout the summary does not know
    text = "\n".join(report.summary(tmp_path))
    assert "present; no summary (JSONDecodeError)" in text and "present; no summary (KeyError)" in text


def test_committed_report_matches_the_results():
    """REPORT.md is what ``python -m benchmarks.report`` makes of the committed results."""
    assert report.build(H.RESULTS, prefix="results/") == (ROOT / "benchmarks" / "REPORT.md").read_text()


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


def test_table2_summary_and_verdict(tmp_path):
    store = H.Store(tmp_path / "table2.json")
    for m, runs in {
        "tpsgd-ce": [(91, 1.0), (92, 1.2)],
        "zorb": [(89, 9.0), (89.5, 9.5)],
        "lm_karnet": [(89.9, 2), (90.1, 2.2)],
    }.items():
        store.runs |= {f"{m}/{seed}": {"acc": acc, "fit_s": t, "peak_mib": 5.0} for seed, (acc, t) in enumerate(runs)}
    summary = table2.summarise(store, table2.METHODS)
    assert summary["zorb"]["time_ratio"] == pytest.approx(9.25 / 1.1)
    v = table2.verdict(summary)
    assert v["zorb"]["met"] and v["lm_karnet"]["acc_ok"] and not v["lm_karnet"]["met"] and not v["met"]


# ---------------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_table2_quick_end_to_end(synthetic_data, tmp_path):
    """``python -m benchmarks.report --run 2 --quick`` on a small synthetic MNIST, results in a temp folder."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "benchmarks.report", "--run", "2", "--quick", "--seeds", "1", "--threads", "1"]
    cmd += ["--data-dir", str(synthetic_data), "--out", str(out)]
    proc = subprocess.run(
        cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    md = (out / "table2.md").read_text()
    assert (
        "QUICK RUN" in md
        and "ZORB (pinv, as published)" in md
        and "LM-KARnet" in md
        and (out / "table2.png").stat().st_size
    )
    store = H.Store.open(out / "table2.json")
    assert store.settings["quick"] and store.settings["split"] == {"train": 1200, "eval": 500, "eval_name": "test"}
    assert set(table2.summarise(store, table2.METHODS)) == set(table2.METHODS)
    assert table2.summarise(store, table2.METHODS)["lm_karnet"]["acc"] > 90  # the synthetic task is easy
    assert all(r["peak_mib"] >= 0 for r in store.runs.values())
    full_report = (out / "REPORT.md").read_text()
    assert "QUICK RESULTS" in full_report and "| Table 2 · ZORB | 89.4 (0.22) %, 7.9 (0.39) s |" in full_report
    assert "| core | – | not run | – |" in full_report


@pytest.mark.shared_data
def test_baselines_on_real_mnist_subset():
    if not (SHARED_DATA / "mnist.npz").is_file():
        pytest.skip(f"{SHARED_DATA / 'mnist.npz'} not available")
    split = table2.make_splits(table2.load_mnist(SHARED_DATA), quick=True, tune=False)
    for fit in (zorb, lm_karnet):
        model = table2.new_model(0)
        fit(model, split["x"], split["y"], solver="recursive")
        assert _accuracy(model, split["x_eval"], split["y_eval"]) > 0.83
