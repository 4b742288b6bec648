"""The benchmark scripts run end to end (small and on CPU, as CI can)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_quick_runs_end_to_end_and_resumes(tmp_path):
    stem = tmp_path / "defaults"
    cmd = [sys.executable, "-m", "benchmarks.defaults", "--quick", "--out", str(stem), "--seeds", "0"]
    cmd += ["--rows", "mnist/cnn", "seqmnist/rnn", "--threads", "1"]
    subprocess.run(cmd, cwd=ROOT, check=True, timeout=600, capture_output=True)
    store = json.loads(stem.with_suffix(".json").read_text())
    runs = store["runs"]
    assert set(runs) == {f"{row}/{m}/0" for row in ("mnist/cnn", "seqmnist/rnn") for m in ("tpsgd", "bp", "control")}
    assert all(0 <= r["acc"] <= 100 for r in runs.values())
    assert {b["layer"] for b in runs["mnist/cnn/tpsgd/0"]["blocks"]} == {"Conv2d", "Linear"}
    assert "defaults" in runs["seqmnist/rnn/tpsgd/0"]  # the library defaults the run was measured under
    text = stem.with_suffix(".md").read_text()
    assert "| mnist · CNN, no pooling (the issue's) | 1 |" in text and "python -m benchmarks.defaults --quick" in text
    extra = [*cmd, "--rows", "mnist/cnn", "--methods", "tpsgd", "tpsgd-l2@30"]
    subprocess.run(extra, cwd=ROOT, check=True, timeout=600, capture_output=True)  # resumes: only the new run
    again = json.loads(stem.with_suffix(".json").read_text())["runs"]
    assert set(again) == set(runs) | {"mnist/cnn/tpsgd-l2@30/0"}
    assert again["mnist/cnn/tpsgd/0"] == runs["mnist/cnn/tpsgd/0"]
    assert "## Candidate defaults" in stem.with_suffix(".md").read_text()


def test_defaults_measures_a_default_run_again_under_new_defaults(monkeypatch):
    from benchmarks import defaults

    monkeypatch.setattr(defaults, "library_defaults", lambda: {"rule": "auto"})
    assert defaults._stale({"acc": 1.0, "defaults": {"rule": "ce"}}, "tpsgd")
    assert not defaults._stale({"acc": 1.0, "defaults": {"rule": "auto"}}, "tpsgd")
    assert not defaults._stale({"acc": 1.0}, "bp")


@pytest.mark.slow
def test_gpu_check_runs_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.md"
    cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--device", "cpu", "--quick", "--steps", "1"]
    subprocess.run(
        [*cmd, "--models", "cnn2", "--methods", "bp", "tpsgd", "tpsgd-lean", "--out", str(out)],
        cwd=ROOT,
        check=True,
        timeout=600,
    )
    text = out.read_text()
    assert "| cnn2 | fp32 |" in text and "| cnn2 | bf16 |" in text


@pytest.mark.slow
def test_lean_step_compares_the_two_modes(capsys):
    from benchmarks import lean_step

    lean_step.main(["--batch", "2", "--steps", "1", "--warmup", "0"])
    assert "lean/default" in capsys.readouterr().out


def test_rnn_tables_merges_parallel_result_files(tmp_path):
    from benchmarks.rnn_tables import merge_stores

    kept = {"acc": 90.0}
    store = {"accuracy": {"5/rows/l1/0/e20": kept}, "commands": {"accuracy": ["a"]}}
    other = {
        "accuracy": {
            "5/rows/l1/0/e20": {"acc": 1.0},
            "5/rows/l1/1/e20": {"acc": 91.0},
            "5/rows/l1/0/e20/lr=0.002": {"acc": 90.0},  # the kept run, stored under its probe key before a move
        },
        "speed": {"rows/cuda": {"speedup": 0.8}},
        "memory/cuda": {"rss_ratio": 0.1},
        "commands": {"accuracy": ["a", "b"]},
    }
    path = tmp_path / "other.json"
    path.write_text(json.dumps(other))
    merge_stores(store, [str(path)])
    assert store["accuracy"] == {"5/rows/l1/0/e20": kept, "5/rows/l1/1/e20": {"acc": 91.0}}  # kept entries win
    assert store["speed"] == {"rows/cuda": {"speedup": 0.8}} and store["memory/cuda"] == {"rss_ratio": 0.1}
    assert store["commands"] == {"accuracy": ["a", "b"]}


def test_rnn_tables_probes_get_their_own_keys_and_report_rows():
    from benchmarks.report import _rnn
    from benchmarks.rnn_tables import _key, _probe_lines, parse_overrides

    overrides = parse_overrides(["rnn_fraction=0.5", "scheduler=cosine", "lr=2e-3"])
    assert overrides == {"rnn_fraction": 0.5, "scheduler": "cosine", "lr": 0.002}
    key = _key("5", "eeg", "l1", 0, 20, False, overrides)
    assert key == '5/eeg/l1/0/e20/lr=0.002,rnn_fraction=0.5,scheduler="cosine"'
    assert _key("5", "eeg", "l1", 0, 20, False, {}) == "5/eeg/l1/0/e20"
    with pytest.raises(SystemExit, match="KEY one of"):
        parse_overrides(["hidden=3"])
    store = {
        "accuracy": {
            "5/eeg/l1/0/e20": {"acc": 93.0, "val_acc": [94.0]},
            key: {"acc": 92.0, "val_acc": [90.0], "device": "NVIDIA H200, torch 2.11.0"},
            "5/eeg/l1/0/e3/quick": {"acc": 50.0},
        }
    }
    rows = [line for line in _probe_lines(store) if line.startswith("| `")]
    assert rows == [
        '| `5/eeg/l1/0/e20` | `lr=0.002,rnn_fraction=0.5,scheduler="cosine"` | 90.00 | 92.00 (H200) | 94.00 '
        "| 93.00 (cpu) |"
    ]
    (summary,) = _rnn(store, quick=False)  # the probe stays out of the paper-report summary
    assert "l1 93.0" in summary[2] and "92.0" not in summary[2]


def test_rnn_tables_side_store_gets_its_own_report_and_layerwise_speed_rows(tmp_path):
    from argparse import Namespace

    from benchmarks.rnn_tables import RESULTS, _report_path, _timing_lines

    assert _report_path(Namespace(store=str(tmp_path / "side.json"))) == tmp_path / "side.md"
    assert _report_path(Namespace(store=None)) == RESULTS / "rnn_tables.md"
    speed = {
        "bptt_s": 3.0, "local_s": 2.0, "local_bf16_s": 1.5, "speedup": 1.5, "speedup_bf16": 2.0, "batches": 30,
        "threads": 1, "layerwise_rnn_s": 1.8, "layerwise_head_s": 0.5, "layerwise_schedule": [3, 17],
        "speedup_rnn_stage": 1.67, "speedup_rnn_stage_cpu": 1.6, "speedup_schedule": 4.2, "speedup_schedule_cpu": 4.0,
    }  # fmt: skip
    lines = _timing_lines({"speed": {"rows": speed}}, Namespace())
    assert "| Seq. MNIST (rows) | 1 | 3 + 17 | 3.0 | 1.8 | 1.67× / 1.60× | 0.5 | 4.20× / 4.00× |" in lines


@pytest.mark.shared_data
def test_rnn_saturation_measures_every_rule(tmp_path):
    data = ROOT / ".." / "shared" / "data"
    if not (data / "epileptic_seizure.npz").is_file():
        pytest.skip(f"{data / 'epileptic_seizure.npz'} not available")
    cmd = [sys.executable, "-m", "benchmarks.rnn_saturation", "--data-dir", str(data), "--dataset", "eeg"]
    args = ["--epochs", "1", "--train-subset", "256", "--samples", "128", "--out", str(tmp_path / "sat")]
    subprocess.run([*cmd, *args], cwd=ROOT, check=True, timeout=600, capture_output=True)
    store = json.loads((tmp_path / "sat.json").read_text())
    configs = store["eeg"]["configs"]
    assert len(configs) == 6 and all(0 <= row["probe"] <= 100 for rows in configs.values() for row in rows)
    assert "| DRTP, the dataset's lr | adam 0.001 | 1 |" in (tmp_path / "sat.md").read_text()  # EEG's lr
    subprocess.run([*cmd, *args, "--model", "rnn2"], cwd=ROOT, check=True, timeout=600, capture_output=True)
    store = json.loads((tmp_path / "sat.json").read_text())
    assert set(store) == {"eeg", "eeg/rnn2"} and len(store["eeg"]["configs"]) == 6  # the rnn1 section is kept
    stacked = store["eeg/rnn2"]["configs"]["DRTP (the tables)"]
    assert [(row["epoch"], row["layer"]) for row in stacked] == [(1, 0), (1, 1)]
    assert "## eeg, Table 7 (two stacked layers)" in (tmp_path / "sat.md").read_text()


def test_rnn_tables_adopts_a_columns_own_settings(monkeypatch):
    from benchmarks import rnn_tables

    monkeypatch.setattr(rnn_tables, "COLUMN_SETTINGS", {"bp": {"pixels": {"lr": 2e-4}}})
    old = {"acc": 9.8, "settings": {"lr": 0.002, "rnn_fraction": 0.25}}
    new = {"acc": 94.3, "settings": {"lr": 0.0002, "rnn_fraction": 0.25}}
    kept = {"5/pixels/l1/0/e20": {"acc": 86.0, "settings": {"lr": 0.002}}, "5/pixels/bp/1/e20/bp_grad_clip=null": {}}
    store = {"accuracy": {"5/pixels/bp/0/e20": old, "5/pixels/bp/0/e20/lr=0.0002": new, **kept}}
    moves = rnn_tables.adopt_column_settings(store)
    assert sorted(moves) == [
        ("5/pixels/bp/0/e20", "5/pixels/bp/0/e20/lr=0.002"),
        ("5/pixels/bp/0/e20/lr=0.0002", "5/pixels/bp/0/e20"),
    ]
    assert store["accuracy"] == {"5/pixels/bp/0/e20": new, "5/pixels/bp/0/e20/lr=0.002": old, **kept}
    assert rnn_tables.adopt_column_settings(store) == []  # nothing left to move
    store["accuracy"]["5/pixels/bp/0/e20/lr=0.0002"] = dict(new)  # the same side store merged once more
    assert rnn_tables.adopt_column_settings(store) == [] and "5/pixels/bp/0/e20/lr=0.0002" not in store["accuracy"]
    store["accuracy"]["5/pixels/bp/0/e20/lr=0.0002"] = {**new, "acc": 95.0}  # another run with those settings
    with pytest.raises(ValueError, match="another run is stored there"):
        rnn_tables.adopt_column_settings(store)


def test_rnn_tables_a_columns_settings_for_one_table(monkeypatch):
    from benchmarks import rnn_tables

    own = {"twitter": {"rnn_lr": 3e-5}, "7/twitter": {"feature_norm": "batch"}}
    monkeypatch.setattr(rnn_tables, "COLUMN_SETTINGS", {"drtp": own})
    assert rnn_tables.settings_for("5", "twitter", "drtp")["rnn_lr"] == 3e-5
    assert rnn_tables.settings_for("5", "twitter", "drtp").get("feature_norm") is None
    assert rnn_tables.settings_for("7", "twitter", "drtp")["feature_norm"] == "batch"
    assert rnn_tables.control_overrides("7", "twitter", "drtp") == {"feature_norm": "batch"}
    assert rnn_tables.control_overrides("5", "twitter", "drtp") == {}
    before = {"acc": 64.0, "settings": {"rnn_lr": 3e-5}}
    after = {"acc": 67.0, "settings": {"rnn_lr": 3e-5, "feature_norm": "batch"}}
    single = {"acc": 67.3, "settings": {"rnn_lr": 3e-5}}
    store = {
        "accuracy": {
            "7/twitter/drtp/0/e20": before,
            '7/twitter/drtp/0/e20/feature_norm="batch",rnn_lr=3e-05': after,
            "5/twitter/drtp/0/e20": single,
        }
    }
    assert sorted(rnn_tables.adopt_column_settings(store)) == [
        ("7/twitter/drtp/0/e20", "7/twitter/drtp/0/e20/feature_norm=null,rnn_lr=3e-05"),
        ('7/twitter/drtp/0/e20/feature_norm="batch",rnn_lr=3e-05', "7/twitter/drtp/0/e20"),
    ]
    assert store["accuracy"]["7/twitter/drtp/0/e20"] is after and store["accuracy"]["5/twitter/drtp/0/e20"] is single


def test_rnn_tables_compares_a_column_with_a_control_built_like_it(monkeypatch):
    from argparse import Namespace

    from benchmarks import rnn_tables

    monkeypatch.setattr(rnn_tables, "COLUMN_SETTINGS", {"drtp": {"pixels": {"nonlinearity": "sigmoid", "lr": 0.1}}})
    assert rnn_tables.control_overrides("5", "pixels", "drtp") == {"nonlinearity": "sigmoid"}
    assert rnn_tables.control_overrides("5", "pixels", "l1") == {} == rnn_tables.control_overrides("5", "rows", "drtp")
    run = lambda acc: {"acc": acc, "val_acc": [acc]}  # noqa: E731
    accuracy = {
        "5/pixels/drtp/0/e20": run(60.0),
        "5/pixels/l1/0/e20": run(86.0),
        "5/pixels/random_rnn/0/e20": run(23.0),
        '5/pixels/random_rnn/0/e20/nonlinearity="sigmoid"': run(40.0),
        '5/pixels/random_rnn/0/e20/lr=0.1,nonlinearity="sigmoid"': run(1.0),  # another probe: not the control
    }
    args = Namespace(tables=["5"], datasets=["pixels"], epochs=20, quick=False)
    (row,) = [line for line in rnn_tables._comparison_lines({"accuracy": accuracy}, args) if line.startswith("| 5 |")]
    assert row == "| 5 | Seq. MNIST (pixels) | +20.00 | +20.00 | +63.00 | +63.00 | – | – | – |"
    accuracy |= {"7/pixels/drtp/0/e20": run(50.0), "7/pixels/l1/0/e20": run(87.0)}
    args.tables = ["5", "7"]
    lines = rnn_tables._comparison_lines({"accuracy": accuracy}, args)
    (row,) = [line for line in lines if line.startswith("| 7 |")]
    assert row.endswith("| -10.00 | +1.00 | +1.00 |")  # each column vs its own single-layer run, then best vs best
    assert "More than 2 points below the single-layer network: DRTP in Table 7 on Seq. MNIST (pixels) (-10.00)." in (
        lines
    )


def test_rnn_tables_names_the_cells_with_fewer_seeds():
    from argparse import Namespace

    from benchmarks import rnn_tables

    run = lambda acc, fit_s=600.0: {"acc": acc, "fit_s": fit_s, "device": "cpu"}  # noqa: E731
    accuracy = {f"7/rows/{column}/{seed}/e20": run(80.0) for column in ("l1", "drtp") for seed in range(3)}
    accuracy |= {"7/rows/bp/0/e20": run(98.0, 1800.0), "7/rows/bp/0/e20/lr=0.002": run(9.8)}  # a probe: not counted
    args = Namespace(tables=["7"], datasets=["rows"], epochs=20, quick=False)

    def seed_lines() -> list[str]:  # as the report builds them: from the runs of each table cell
        cells = [("7", "rows", column) for column in rnn_tables.COLUMNS]
        store = {"accuracy": accuracy}
        return rnn_tables._seed_lines({cell: rnn_tables._runs(store, *cell, args.epochs, args.quick) for cell in cells})

    lines = seed_lines()
    assert "fewer runs than the 3 of most cells" in lines[0]
    assert "Table 7 Seq. MNIST (rows) BP (n=1, 30 min a run on cpu)." in lines[1]
    accuracy |= {f"7/rows/bp/{seed}/e20": run(98.0) for seed in (1, 2)}
    assert seed_lines() == []
