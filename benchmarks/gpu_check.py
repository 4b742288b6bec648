"""One-shot device check: throughput and peak memory of BP vs tpSGD, fp32 and bf16, eager and captured.

Models: the paper's shallow CNN (MNIST size), the 4-layer conv net of the core benchmark (32 channels,
64x64), the zoo adaptor on a frozen ``tf_efficientnet_lite0`` (random weights: speed and memory do not
depend on them) and the recurrent ``rnn1`` (Seq-MNIST rows: 28 steps of 28 inputs, hidden 512, ℓ1 on the
recurrent layer). Methods, each on the same model, batch and precision:

- ``bp``: backpropagation, an eager step with ``Adam``; ``bp-graph``: the same step captured as a CUDA graph
  (the fair reference for the captured tpSGD step);
- ``tpsgd``: ``LocalLearner.step`` with rule ``ce``; ``tpsgd-compile``: ``compile=True`` (each block's local
  gradient fused by ``torch.compile``); ``tpsgd-graph``: ``cuda_graph=True`` (the whole step captured);
  ``tpsgd-compile-graph``: both; the same four with the library's default rule (``"auto"``: ``learned`` readouts
  on Linear/Conv blocks) as ``tpsgd@auto``, ...;
- ``tpsgd-lean`` / ``tpsgd-lean-graph``: lean-memory mode (rule ``ce``, what ``"auto"`` picks there), eager and
  captured.

With ``--lightning`` it also times ``Trainer.fit`` of ``zoo.ImageClassifier("convnet4")`` under
``strategy="auto"`` (backprop), ``TPSGDStrategy(rule="ce")``, ``TPSGDStrategy()`` (the default rule) and both
with ``compile=True``, the way a user runs it (Lightning's loop, logging and optimizer step included; no CUDA
graph there).

On CUDA it reports ``torch.cuda.max_memory_allocated`` above the memory held before the measured steps; on
CPU (a smaller, slower run that CI exercises; graph methods are skipped there) the peak RSS increase. A
method that fails is reported with its error instead of stopping the run.

Usage::

    python -m benchmarks.gpu_check                 # CUDA if available, full size (about 5 minutes on one H200)
    python -m benchmarks.gpu_check --device cpu --quick

Writes ``benchmarks/results/gpu_check.md`` (and ``.json``), with the torch and CUDA versions.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_tpsgd import LocalLearner

from ._memory import reset_peak_rss, status_bytes
from ._paper_runs import quiet_trainer

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = (
    "bp",
    "bp-graph",
    "tpsgd",
    "tpsgd-compile",
    "tpsgd-graph",
    "tpsgd-compile-graph",
    "tpsgd-lean",
    "tpsgd-lean-graph",
)
Step = Callable[[torch.Tensor, torch.Tensor], Any]


def _models(quick: bool) -> dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], tuple[int, ...], dict]]:
    """name -> (factory, input shape, batch sizes, LocalLearner options)."""
    from zoo import create_model

    def adaptor() -> nn.Module:
        from zoo import TimmAdaptor

        return TimmAdaptor("tf_efficientnet_lite0", num_classes=10, pretrained=False, img_size=112)

    size = 32 if quick else 64
    small, large = (16,), ((128, 512) if not quick else (16,))
    return {
        "cnn2": (lambda: create_model("cnn2", num_classes=10, in_chans=1, input_size=28), (1, 28, 28), large, {}),
        "convnet4": (
            lambda: create_model("convnet4", num_classes=10, in_chans=3, input_size=size, channels=32),
            (3, size, size),
            large,
            {},
        ),
        "adaptor": (adaptor, (3, 112, 112), (8,) if quick else (64,), {}),
        "rnn1": (
            lambda: create_model("rnn1", num_classes=10, input_size=28, hidden_size=64 if quick else 512),
            (28, 28),
            small if quick else (128,),
            {"overrides": {"0": {"rule": "l1"}}},
        ),
    }


def _graphed(step: Step, zero_grad: Callable[[], None], x: torch.Tensor, y: torch.Tensor, warmup: int = 3) -> Step:
    """Capture ``step`` (without its ``zero_grad``) as a CUDA graph after ``warmup`` eager runs on a side stream."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            zero_grad()
            step(x, y)
    torch.cuda.current_stream().wait_stream(stream)
    static_x, static_y = x.clone(), y.clone()
    graph = torch.cuda.CUDAGraph()
    zero_grad()
    with torch.cuda.graph(graph, stream=stream):
        step(static_x, static_y)

    def replay(xb: torch.Tensor, yb: torch.Tensor) -> None:
        static_x.copy_(xb)
        static_y.copy_(yb)
        graph.replay()

    return replay


def _bp(model: nn.Module, graph: bool, x: torch.Tensor, y: torch.Tensor) -> Step:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-3, capturable=graph)

    def step(xb: torch.Tensor, yb: torch.Tensor) -> None:
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        optimizer.step()

    def zero_grad() -> None:
        optimizer.zero_grad(set_to_none=True)

    if graph:
        return _graphed(step, zero_grad, x, y)
    return lambda xb, yb: (zero_grad(), step(xb, yb))


def _tpsgd(model: nn.Module, method: str, options: dict) -> Step:
    outputs = getattr(model, "tpsgd_output_layers", None)
    method, _, rule = method.partition("@")
    graph = method.endswith("-graph")
    learner = LocalLearner(
        model,
        rule=rule or "ce",
        output_layers=outputs,
        lean="lean" in method,
        compile="compile" in method,
        cuda_graph=graph,
        optimizer=lambda p: torch.optim.Adam(p, lr=1e-3, capturable=graph),
        **options,
    )
    return learner.step


def _peak_tracker(device: torch.device) -> tuple[Callable[[], int], Callable[[], int]]:
    """``(reset, peak)``: ``reset()`` starts a new peak and returns the bytes in use; ``peak()`` the peak since."""
    if device.type == "cuda":

        def reset() -> int:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()

        return reset, torch.cuda.max_memory_allocated
    return reset_peak_rss, lambda: status_bytes("VmHWM")


def measure(name: str, method: str, dtype: str, batch: int, device: torch.device, quick: bool, steps: int) -> dict:
    factory, shape, _, options = _models(quick)[name]
    torch.manual_seed(0)
    model = factory().to(device)
    x = torch.randn(batch, *shape, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    autocast = (
        (lambda: torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False))
        if dtype == "bf16"
        else contextlib.nullcontext
    )
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    reset, peak = _peak_tracker(device)
    base = reset()  # the run's peak covers warm-up and capture too: a graph's memory pool is allocated there
    with autocast():
        run = _bp(model, method == "bp-graph", x, y) if method.startswith("bp") else _tpsgd(model, method, options)
    for _ in range(5):  # warm-up: optimizer state, projections, compilation, capture
        with autocast():
            run(x, y)
    sync()
    warmup_peak = peak()
    step_base = reset()  # a steady step's own peak (eager methods; a replayed graph allocates nothing)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        with autocast():
            run(x, y)
        sync()
        times.append(time.perf_counter() - start)
    seconds = sorted(times)[len(times) // 2]  # the median step
    step_peak = peak()
    return {
        "samples_per_s": batch / seconds,
        "step_ms": 1e3 * seconds,
        "peak_bytes": max(warmup_peak, step_peak) - base,
        "step_peak_bytes": step_peak - step_base,
        "batch": batch,
    }


def lightning_fit(strategy: str, precision: str, device: torch.device, quick: bool, steps: int) -> dict:
    """Median seconds per training step of ``Trainer.fit`` (after warm-up steps), as a user runs it."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_tpsgd import TPSGDStrategy
    from zoo import ImageClassifier

    size, batch = (32, 16) if quick else (64, 128)
    warmup = 5
    times: list[float] = []

    class Timer(L.Callback):
        def on_train_batch_start(self, *args: Any) -> None:
            if device.type == "cuda":
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            if device.type == "cuda":
                torch.cuda.synchronize()
            if trainer.global_step > warmup:
                times.append(time.perf_counter() - self.start)

    torch.manual_seed(0)
    data = TensorDataset(
        torch.randn((warmup + steps) * batch, 3, size, size), torch.randint(0, 10, ((warmup + steps) * batch,))
    )
    model = ImageClassifier(
        "convnet4", num_classes=10, model_kwargs={"in_chans": 3, "input_size": size, "channels": 32}
    )
    chosen: Any = {
        "bp": "auto",
        "tpsgd": TPSGDStrategy(rule="ce"),
        "tpsgd-compile": TPSGDStrategy(rule="ce", compile=True),
        "tpsgd-nolog": TPSGDStrategy(rule="ce", log_local_losses=False),
        "tpsgd@auto": TPSGDStrategy(),
        "tpsgd-compile@auto": TPSGDStrategy(compile=True),
    }[strategy]
    trainer = quiet_trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        strategy=chosen,
        precision="bf16-mixed" if precision == "bf16" else "32-true",
        max_epochs=1,
        callbacks=[Timer()],
    )
    trainer.fit(model, DataLoader(data, batch_size=batch, pin_memory=device.type == "cuda"))
    seconds = sorted(times)[len(times) // 2]
    return {"samples_per_s": batch / seconds, "step_ms": 1e3 * seconds, "batch": batch}


def _ratio(value: float, reference: float, floor: float = 0.0) -> str:
    return f"{value / reference:.2f}" if reference > floor else "–"


def _versions(device: torch.device) -> str:
    import lightning
    import timm

    cuda = f"CUDA {torch.version.cuda}, " if device.type == "cuda" else ""
    return (
        f"torch {torch.__version__}, {cuda}Lightning {lightning.__version__}, timm {timm.__version__}, "
        f"Python {platform.python_version()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small inputs and batches (CI on CPU)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per measurement (median reported)")
    parser.add_argument("--models", nargs="+", default=["cnn2", "convnet4", "adaptor", "rnn1"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument(
        "--rules", nargs="+", default=["ce", "auto"], help="rules of the non-lean tpSGD methods (ce: no suffix)"
    )
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--lightning", action="store_true", help="also time Trainer.fit with each strategy")
    parser.add_argument("--out", default=str(RESULTS / "gpu_check.md"))
    args = parser.parse_args()
    device = torch.device(args.device)
    steps = args.steps or (2 if args.quick else 20)
    methods = [m for m in args.methods if device.type == "cuda" or not m.endswith("-graph")]
    if "bp" not in methods:
        methods.insert(0, "bp")
    methods += [  # the same methods under other rules, after the ce ones
        f"{m}@{rule}"
        for rule in args.rules
        if rule != "ce"
        for m in list(methods)
        if m.startswith("tpsgd") and "lean" not in m
    ]
    rows, results = [], {}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        for batch in _models(args.quick)[name][2]:
            for dtype in args.precisions:
                base = None
                for method in methods:
                    if name in ("adaptor", "rnn1") and "lean" in method:
                        continue  # lean mode has nothing to save on these (no Linear/Conv + ReLU block to speak of)
                    key = f"{name}/{dtype}/b{batch}/{method}"
                    try:
                        r = measure(name, method, dtype, batch, device, args.quick, steps)
                    except Exception as err:  # noqa: BLE001 - a failing variant is reported, the others still run
                        results[key] = {"error": f"{type(err).__name__}: {err}"[:300]}
                        rows.append(f"| {name} | {dtype} | {batch} | {method} | failed: {results[key]['error']} ||||||")
                        print(rows[-1], flush=True)
                        continue
                    finally:
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                    base = r if method == "bp" else base
                    results[key] = r
                    speed = _ratio(r["samples_per_s"], base["samples_per_s"]) if base else "–"
                    memory = _ratio(r["peak_bytes"], base["peak_bytes"], 2**20) if base else "–"
                    graph = method.split("@")[0].endswith("-graph")
                    step_memory = (
                        "–" if graph or not base else _ratio(r["step_peak_bytes"], base["step_peak_bytes"], 2**20)
                    )
                    rows.append(
                        f"| {name} | {dtype} | {batch} | {method} | {r['samples_per_s']:.0f} | {r['step_ms']:.2f} | "
                        f"{speed}× | {r['peak_bytes'] / 2**20:.0f} | {memory} | {step_memory} |"
                    )
                    print(rows[-1], flush=True)
                    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    fit_rows = []
    if args.lightning:
        for dtype in args.precisions:
            base = None
            for strategy in ("bp", "tpsgd", "tpsgd-nolog", "tpsgd-compile", "tpsgd@auto", "tpsgd-compile@auto"):
                key = f"lightning/convnet4/{dtype}/{strategy}"
                try:
                    r = lightning_fit(strategy, dtype, device, args.quick, steps)
                except Exception as err:  # noqa: BLE001 - reported in the table
                    results[key] = {"error": f"{type(err).__name__}: {err}"[:300]}
                    fit_rows.append(f"| {dtype} | {strategy} | failed: {results[key]['error']} |||")
                    continue
                base = r if strategy == "bp" else base
                results[key] = r
                speed = _ratio(r["samples_per_s"], base["samples_per_s"]) if base else "–"
                fit_rows.append(f"| {dtype} | {strategy} | {r['samples_per_s']:.0f} | {r['step_ms']:.2f} | {speed}× |")
                print(fit_rows[-1], flush=True)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    memory_kind = "CUDA max_memory_allocated" if device.type == "cuda" else "peak RSS increase"
    lines = [
        f"# Device check on {device_name}",
        "",
        f"Command: `python -m benchmarks.gpu_check {shlex.join(sys.argv[1:])}` ({_versions(device)}); "
        f"median of {steps} timed steps after 5 warm-up steps; peak memory = {memory_kind} above the memory held "
        "before the model's first step (warm-up, compilation and graph capture included); step memory = the peak "
        "of the timed steps above the memory held before them (eager methods: a replayed graph allocates nothing). "
        "Ratios against `bp`, the eager backpropagation step of the same model, batch and precision.",
        "",
        "| model | precision | batch | method | samples/s | step ms | speed vs bp | peak MiB | memory vs bp "
        "| step memory vs bp |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]
    if fit_rows:
        lines += [
            "## `Trainer.fit` (Lightning's loop), convnet4",
            "",
            '`zoo.ImageClassifier("convnet4")` (32 channels, Adam), batch '
            f"{results.get('lightning/convnet4/fp32/bp', {}).get('batch', '–')}, "
            '`precision="32-true"` or `"bf16-mixed"`; median step time from `on_train_batch_start` to '
            "`on_train_batch_end` after 5 warm-up steps.",
            "",
            "| precision | strategy | samples/s | step ms | speed vs bp |",
            "|---|---|---|---|---|",
            *fit_rows,
            "",
        ]
    out.write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
