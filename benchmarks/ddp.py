"""Data-parallel tpSGD on CPU: ``strategy="tpsgd_ddp"`` with 2 processes (gloo) against 1, same global batch.

Usage: ``python -m benchmarks.ddp --epochs 4 --batch 32``
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import torch

from . import _harness as H

SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    import lightning as L, torch
    from lightning_tpsgd import TPSGDDDPStrategy, TPSGDStrategy
    from lightning_tpsgd.data import DigitsDataModule
    from zoo import ImageClassifier

    out, devices, batch, strategy, epochs, rule = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:]
    strategy = {"tpsgd": TPSGDStrategy, "tpsgd_ddp": TPSGDDDPStrategy}[strategy](rule=rule)
    L.seed_everything(0)
    dm = DigitsDataModule(batch_size=batch, flatten=True)
    model = ImageClassifier(model="mlp", model_kwargs={"in_features": 64, "hidden": [64, 32]}, lr=3e-3)
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_epochs=int(epochs), logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0)
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    seconds = time.perf_counter() - start
    torch.save(model.state_dict(), f"{out}/rank{trainer.global_rank}.pt")
    acc = trainer.test(model, datamodule=dm, verbose=False)[0]["test_acc"]
    if trainer.global_rank == 0:
        samples = trainer.global_step * batch * devices
        json.dump({"acc": acc, "seconds": seconds, "steps": trainer.global_step, "samples_per_s": samples / seconds},
                  open(f"{out}/result.json", "w"))
    """
)


def run(out: Path, devices: int, batch_size: int, strategy: str, epochs: int = 4, rule: str = "ce") -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.py").write_text(SCRIPT)
    cmd = [sys.executable, str(out / "train.py"), str(out), str(devices), str(batch_size), strategy, str(epochs), rule]
    done = subprocess.run(cmd, timeout=900, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {done.returncode}:\n{done.stderr[-4000:]}")
    return json.loads((out / "result.json").read_text())


def ranks_identical(out: Path, world_size: int) -> bool:
    states = [torch.load(out / f"rank{r}.pt") for r in range(world_size)]
    return all(torch.equal(states[0][k], s[k]) for s in states[1:] for k in states[0])


def main(argv: list[str] | None = None) -> H.Store:
    p = H.parser(__doc__, epochs=4)
    p.add_argument("--batch", type=int, default=32, help="the global batch size")
    p.add_argument("--rule", default="ce", help="the local rule")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/tpsgd_ddp_benchmark"))
    args = p.parse_args(argv)
    settings = None if args.report_only else {"batch": args.batch, "rule": args.rule, "epochs": args.epochs}
    store = H.Store.open(H.setup(args) / "ddp.json", settings, fresh=not args.report_only)
    if not args.report_only:
        store.add_command("ddp", argv)
        for n in (2, 1):
            strategy = "tpsgd_ddp" if n > 1 else "tpsgd"
            store.runs[str(n)] = run(args.workdir / str(n), n, args.batch // n, strategy, args.epochs, args.rule)
        store.runs["2"]["identical"] = ranks_identical(args.workdir / "2", 2)
        store.save()
    (one, two), s = (store.runs[n] for n in "12"), store.settings
    rows = [[f"{n} process(es), batch {s['batch'] // n} each", f"{100 * r['acc']:.2f} %", r["steps"]]
            + [f"{r['samples_per_s']:.0f}"] for n, r in ((1, one), (2, two))]  # fmt: skip
    body = [f"Digits MLP 64-64-32-10, rule `{s['rule']}`, {s['epochs']} epochs, global batch {s['batch']}.", ""]
    body += H.md_table(["run", "test acc", "optimizer steps", "samples/s"], rows)
    body += [
        f"Parameters bit-identical across the 2 ranks: {'yes' if two.get('identical') else 'NO'}. Throughput of 2 "
    ]
    body[-1] += f"processes relative to 1: {two['samples_per_s'] / one['samples_per_s']:.2f}×."
    store.write_report("Data-parallel tpSGD on CPU (gloo): 2 processes vs 1, same global batch", body)
    return store


if __name__ == "__main__":
    main()
