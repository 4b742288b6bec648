"""Data-parallel local learning with 2 CPU processes (gloo), launched by Lightning's subprocess launcher."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    import lightning as L, torch
    from torch.utils.data import DataLoader
    import lightning_tpsgd  # registers tpsgd_ddp
    from lightning_tpsgd.data import DigitsDataModule
    from zoo import ImageClassifier

    out, devices, batch_size, strategy = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    L.seed_everything(0)
    dm = DigitsDataModule(batch_size=batch_size, flatten=True)
    model = ImageClassifier(model="mlp", model_kwargs={"in_features": 64, "hidden": [64, 32]}, lr=3e-3)
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_epochs=4, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=True, limit_val_batches=0)
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    seconds = time.perf_counter() - start
    rank = trainer.global_rank
    torch.save(model.state_dict(), f"{out}/rank{rank}.pt")
    acc = trainer.test(model, datamodule=dm, verbose=False)[0]["test_acc"]
    if rank == 0:
        json.dump({"acc": acc, "seconds": seconds, "steps": trainer.global_step}, open(f"{out}/result.json", "w"))
    """
)


def _run(tmp_path, devices, batch_size, strategy):
    out = tmp_path / f"{strategy}{devices}"
    out.mkdir()
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    subprocess.run(
        [sys.executable, str(script), str(out), str(devices), str(batch_size), strategy],
        check=True,
        timeout=600,
        capture_output=True,
    )
    return out, json.loads((out / "result.json").read_text())


@pytest.mark.slow
def test_two_processes_stay_bit_identical_and_match_one_process(tmp_path):
    out, two = _run(tmp_path, 2, 16, "tpsgd_ddp")
    rank0, rank1 = torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")
    assert rank0.keys() == rank1.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    _, one = _run(tmp_path, 1, 32, "tpsgd")  # the same global batch in one process
    assert two["steps"] == one["steps"]
    assert abs(two["acc"] - one["acc"]) < 0.05, (two, one)
    print(f"2 processes: {two}; 1 process: {one}")
