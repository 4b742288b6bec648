"""``benchmarks/figures.py`` (Figures 3 and 4, Table 4's VGG11 row) end to end on tiny synthetic data."""

import dataclasses
import json

import pytest

from benchmarks import _harness as H
from benchmarks import figures

TINY = {
    "fig3": {"filters": [1, 2], "epochs": 1, "train_subset": 128, "test_subset": 64},
    "fig4": {"n_conv": [0, 1], "n_hidden": [0, 1], "epochs": 1, "train_subset": 128, "test_subset": 64},
    "vgg11": {"image_size": 32, "width": 0.125, "epochs": 2, "train_subset": 128, "test_subset": 64},
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TINY))
def test_quick_run_writes_labelled_report_and_resumes(name, synthetic_data, tmp_path, monkeypatch):
    fig = figures.FIGURES[name]
    monkeypatch.setitem(figures.FIGURES, name, dataclasses.replace(fig, quick=TINY[name]))
    argv = [
        name,
        "--data-dir",
        str(synthetic_data),
        "--seeds",
        "2",
        "--quick",
        "--threads",
        "1",
        "--out",
        str(tmp_path),
    ]
    store = figures.main(argv)
    md = (tmp_path / f"{fig.name}.md").read_text()
    assert md.startswith(f"# {fig.title}") and "QUICK RUN" in md and f"benchmarks.figures {name}" in md
    assert (tmp_path / f"{fig.name}.png").stat().st_size > 0
    assert store.settings["quick"] and all(0 <= r["acc"] <= 100 and r["fit_s"] >= 0 for r in store.runs.values())
    if name != "fig3":  # the rule-"learned" runs are trained and reported beside the others
        assert any(k.startswith("tpsgd-learned") for k in store.runs) and "learned" in md
    before = json.loads((tmp_path / f"{fig.name}.json").read_text())["runs"]
    assert figures.main(argv).runs == before  # a second call resumes: every run is stored, nothing retrained


def test_fig3_verdict_reads_the_data(tmp_path):
    """Filter gains a lot with K, naive does not: the finding holds for ce; l2 gains alike, so it does not."""
    store = H.Store(tmp_path / "fig3.json", settings={"l2_target_scale": 1.0})
    for seed, jitter in enumerate((0.0, 0.2)):
        for k, (filt, naive) in {1: (80.0, 80.0), 32: (90.0, 80.5)}.items():
            for rule in ("ce", "l2"):
                store.runs[f"filter-{rule}/{k}/{seed}"] = {"acc": filt + jitter}
                store.runs[f"naive-{rule}/{k}/{seed}"] = {"acc": (naive if rule == "ce" else filt) + jitter}
    ce, l2 = (line for line in figures.fig3_verdict(store, [1, 32]) if "paper's finding" in line)
    assert "**holds**" in ce and "**does not hold**" in l2


def test_only_trains_the_matching_runs_and_records_each_command(tmp_path):
    trained: list[str] = []

    def jobs(seeds: list[int]):
        for key in (f"{row}/{seed}" for seed in seeds for row in ("bp", "tpsgd")):
            yield key, lambda key=key: trained.append(key) or {"acc": 50.0}

    store = H.Store.open(tmp_path / "demo.json", {"quick": False})
    store.add_command("demo", ["--seeds", "1"])
    store.run(jobs([0]))
    store.add_command("demo", ["--seeds", "3", "--only", "bp/*"])
    store.run(jobs([0, 1, 2]), only=["bp/*"])
    assert trained == ["bp/0", "tpsgd/0", "bp/1", "bp/2"]
    assert len(store.commands) == 2 and "--only 'bp/*'" in store.commands[1]  # shell-quoted
    store.save()
    with pytest.raises(SystemExit, match="pass --fresh"):  # runs of another budget are never mixed in
        H.Store.open(tmp_path / "demo.json", {"quick": True})
    assert H.Store.open(tmp_path / "demo.json", {"quick": True}, fresh=True).runs == {}
