"""Data-parallel tpSGD on CPU: 2 processes (gloo) against 1 with the same global batch.

Usage::

    python -m benchmarks.ddp [--epochs 4] [--batch 32]

Trains the digits MLP with ``Trainer(strategy="tpsgd_ddp", devices=2)`` (Lightning's subprocess
launcher) and with ``strategy="tpsgd"`` in one process, then prints and writes
``benchmarks/results/ddp.md``: whether every parameter is bit-identical across ranks, test accuracy,
and training throughput of 2 processes relative to 1.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    import lightning as L, torch
    from lightning_tpsgd import TPSGDDDPStrategy, TPSGDStrategy
    from lightning_tpsgd.data import DigitsDataModule
    from zoo import ImageClassifier

    out, strategy, rule = sys.argv[1], sys.argv[4], sys.argv[6]
    devices, batch_size, epochs = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[5])
    strategy = {"tpsgd": TPSGDStrategy, "tpsgd_ddp": TPSGDDDPStrategy}[strategy](rule=rule)
    L.seed_everything(0)
    dm = DigitsDataModule(batch_size=batch_size, flatten=True)
    model = ImageClassifier(model="mlp", model_kwargs={"in_features": 64, "hidden": [64, 32]}, lr=3e-3)
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_epochs=epochs, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0)
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    seconds = time.perf_counter() - start
    rank = trainer.global_rank
    torch.save(model.state_dict(), f"{out}/rank{rank}.pt")
    acc = trainer.test(model, datamodule=dm, verbose=False)[0]["test_acc"]
    if rank == 0:
        samples = trainer.global_step * batch_size * devices
        json.dump({"acc": acc, "seconds": seconds, "steps": trainer.global_step, "samples_per_s": samples / seconds},
                  open(f"{out}/result.json", "w"))
    """
)


def run(out: Path, devices: int, batch_size: int, strategy: str, epochs: int = 4, rule: str = "ce") -> dict:
    """Train in a fresh process (Lightning launches the other ranks); returns rank 0's result.

    ``rule``: the strategy's local rule; ``"ce"`` (what ``ddp.md`` was measured with) unless given.
    """
    out.mkdir(parents=True, exist_ok=True)
    script = out / "train.py"
    script.write_text(SCRIPT)
    cmd = [sys.executable, str(script), str(out), str(devices), str(batch_size), strategy, str(epochs), rule]
    done = subprocess.run(cmd, timeout=900, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {done.returncode}:\n{done.stderr[-4000:]}")
    return json.loads((out / "result.json").read_text())


def ranks_identical(out: Path, world_size: int) -> bool:
    states = [torch.load(out / f"rank{r}.pt") for r in range(world_size)]
    return all(torch.equal(states[0][k], s[k]) for s in states[1:] for k in states[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32, help="global batch size")
    parser.add_argument("--workdir", default="/tmp/tpsgd_ddp_benchmark")
    args = parser.parse_args()
    work = Path(args.workdir)
    two = run(work / "two", 2, args.batch // 2, "tpsgd_ddp", args.epochs)
    one = run(work / "one", 1, args.batch, "tpsgd", args.epochs)
    identical = ranks_identical(work / "two", 2)
    lines = [
        "# Data-parallel tpSGD on CPU (gloo): 2 processes vs 1, same global batch",
        "",
        f"Command: `python -m benchmarks.ddp --epochs {args.epochs} --batch {args.batch}` "
        "(digits MLP 64-64-32-10, rule `ce`).",
        "",
        "| run | test acc | optimizer steps | samples/s | parameters bit-identical across ranks |",
        "|---|---|---|---|---|",
        f"| 1 process, batch {args.batch} | {100 * one['acc']:.2f} % | {one['steps']} | "
        f"{one['samples_per_s']:.0f} | – |",
        f"| 2 processes, batch {args.batch // 2} each | {100 * two['acc']:.2f} % | {two['steps']} | "
        f"{two['samples_per_s']:.0f} | {'yes' if identical else 'NO'} |",
        "",
        f"Throughput of 2 processes relative to 1: {two['samples_per_s'] / one['samples_per_s']:.2f}×.",
        "",
    ]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ddp.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
