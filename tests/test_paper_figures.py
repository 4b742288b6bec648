"""The paper-figure benchmarks (fig3, fig4, vgg11_imagenette) run end to end on tiny synthetic data."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from benchmarks import _paper_runs, fig3, fig4, vgg11_imagenette


def _images(rng: np.random.Generator, n: int, shape: tuple[int, ...]) -> np.ndarray:
    return rng.integers(0, 256, (n, *shape), dtype=np.uint8)


def _labels(n: int) -> np.ndarray:
    return (np.arange(n) % 10).astype(np.uint8)


def _jpegs(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    blobs = []
    for img in _images(rng, n, (40, 40, 3)):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG")
        blobs.append(np.frombuffer(buf.getvalue(), dtype=np.uint8))
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
    return np.concatenate(blobs), offsets


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """mnist.npz, cifar10.npz and imagenette_112_jpeg.npz with random images (64 train / 32 test each)."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for name, shape in (("mnist", (28, 28)), ("cifar10", (32, 32, 3))):
        np.savez(
            root / f"{name}.npz",
            x_train=_images(rng, 64, shape),
            y_train=_labels(64),
            x_test=_images(rng, 32, shape),
            y_test=_labels(32),
        )
    (xtr, otr), (xte, ote) = _jpegs(rng, 64), _jpegs(rng, 32)
    np.savez(
        root / "imagenette_112_jpeg.npz",
        x_train_jpeg=xtr,
        x_train_offsets=otr,
        y_train=_labels(64),
        x_test_jpeg=xte,
        x_test_offsets=ote,
        y_test=_labels(32),
    )
    return root


TINY = {
    fig3: {"filters": [1, 2], "epochs": 1, "train_subset": None, "test_subset": None},
    fig4: {"n_conv": [0, 1], "n_hidden": [0, 1], "epochs": 1, "train_subset": None, "test_subset": None},
    vgg11_imagenette: {"image_size": 32, "width": 0.125, "epochs": 2, "train_subset": None, "test_subset": None},
}


@pytest.mark.slow
@pytest.mark.parametrize("module", list(TINY), ids=lambda m: m.NAME)
def test_quick_run_writes_labelled_report(module, data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(module, "QUICK", TINY[module])
    out = tmp_path / "out"
    argv = ["--data-dir", str(data_dir), "--seeds", "2", "--quick", "--threads", "1", "--out-dir", str(out)]
    module.main(argv)
    md = (out / f"{module.NAME}.md").read_text()
    assert md.startswith("## ") and f"(benchmarks/{module.NAME}.py)" in md.splitlines()[0]
    assert "QUICK RUN" in md and "--quick" in md
    assert (out / f"{module.NAME}.png").stat().st_size > 0
    store = json.loads((out / f"{module.NAME}.json").read_text())
    assert store["settings"]["quick"] is True and store["runs"]
    assert all(0.0 <= r["acc"] <= 100.0 and r["fit_s"] >= 0 for r in store["runs"].values())
    if module is not fig3:  # the rule-"learned" tpSGD runs are trained and reported beside the others
        assert any(k.startswith("tpsgd-learned") for k in store["runs"]) and "tpsgd-learned" in md
    # a second call resumes: every run is already stored, nothing is retrained
    before = (out / f"{module.NAME}.json").read_text()
    module.main(argv)
    assert json.loads((out / f"{module.NAME}.json").read_text())["runs"] == json.loads(before)["runs"]


def test_quick_results_never_overwrite_full_results():
    parse = _paper_runs.parser(None, seeds=1).parse_args
    assert _paper_runs.out_dir(parse(["--quick"])) == _paper_runs.RESULTS / "quick"
    assert _paper_runs.out_dir(parse([])) == _paper_runs.RESULTS


def test_fig3_verdict_reads_the_data(tmp_path):
    """Filter gains a lot with K, naive does not: the report says the paper's finding holds (and vice versa)."""
    store = _paper_runs.Store(tmp_path / "fig3.json", fresh=True, settings={})
    store.data["seeds"] = 2
    for seed, jitter in enumerate((0.0, 0.2)):
        for k, (filt, naive) in {1: (80.0, 80.0), 32: (90.0, 80.5)}.items():
            for rule in ("ce", "l2"):
                store.runs[f"filter-{rule}/{k}/{seed}"] = {"acc": filt + jitter}
                store.runs[f"naive-{rule}/{k}/{seed}"] = {"acc": (naive if rule == "ce" else filt) + jitter}
    text = "\n".join(fig3.verdict(store, [1, 32]))
    ce, l2 = (line for line in text.splitlines() if "paper's finding" in line)
    assert "**holds**" in ce and "**does not hold**" in l2


def test_only_trains_the_matching_runs_and_records_its_command(tmp_path):
    trained: list[str] = []

    def jobs(seeds, settings, data_dir):
        for seed in range(seeds):
            for row in ("bp", "tpsgd"):
                key = f"{row}/{seed}"
                yield key, lambda key=key: trained.append(key) or {"acc": 50.0, "fit_s": 0.0}

    reports: list[_paper_runs.Store] = []
    full = ["--seeds", "1", "--out-dir", str(tmp_path)]
    _paper_runs.run_benchmark("demo", full, None, 1, ({}, {}, {}), jobs, lambda s, out, q: reports.append(s))
    partial = ["--seeds", "3", "--only", "bp/*", "--out-dir", str(tmp_path)]
    _paper_runs.run_benchmark("demo", partial, None, 1, ({}, {}, {}), jobs, lambda s, out, q: reports.append(s))
    assert trained == ["bp/0", "tpsgd/0", "bp/1", "bp/2"]
    store = reports[-1]
    assert store.data["seeds"] == 3 and len(store.commands) == 2
    assert "--only 'bp/*'" in store.commands[1]  # shell-quoted
