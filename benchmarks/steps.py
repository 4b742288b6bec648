"""One training step, BP against ``LocalLearner``: ``speed`` (median step, peak memory), ``memory`` (each method in a
fresh process), ``ops`` (aten ops and host reads of one step) and ``fit`` (the median ``Trainer.fit`` step), on the CPU
or a GPU; ratios against ``bp`` on the same model, batch and precision."""

import argparse
import contextlib
import itertools
import json
import statistics
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _harness as H

Step = Callable[[Tensor, Tensor], Any]


def models(quick: bool = False) -> dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], dict[str, Any]]]:
    from zoo import TimmAdaptor, create_model

    def zoo(name: str, shape: tuple[int, ...], **kwargs: Any) -> tuple[Callable[[], nn.Module], tuple[int, ...], dict]:
        options = {"overrides": {"0": {"rule": "l1"}}} if name == "rnn1" else {}  # the RNN learns by ℓ1 in every method
        return partial(create_model, name, num_classes=10, **kwargs), shape, options

    size = 32 if quick else 64
    adaptor = partial(TimmAdaptor, "tf_efficientnet_lite0", num_classes=10, pretrained=False, img_size=112)
    return {
        "cnn2": zoo("cnn2", (1, 28, 28), in_chans=1, input_size=28),
        "convnet4": zoo("convnet4", (3, size, size), in_chans=3, input_size=size, channels=32),
        "convnet4-32": zoo("convnet4", (3, 32, 32), in_chans=3, input_size=32, channels=32),
        "mlp2": zoo("mlp2", (784,), hidden=1024),
        "adaptor": (adaptor, (3, 112, 112), {}),
        "rnn1": zoo("rnn1", (28, 28), input_size=28, hidden_size=64 if quick else 512),
        "rnn1-128": zoo("rnn1", (28, 28), input_size=28, hidden_size=128),
        "rnn1-784": zoo("rnn1", (784, 1), input_size=1, hidden_size=512, nonlinearity="tanh"),  # Seq-MNIST pixels
    }


def _graphed(step: Step, zero_grad: Callable[[], None], x: Tensor, y: Tensor) -> Step:
    """``step`` (without its ``zero_grad``) captured as a CUDA graph after three eager runs on a side stream."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            zero_grad()
            step(x, y)
    torch.cuda.current_stream().wait_stream(stream)
    static_x, static_y, graph = x.clone(), y.clone(), torch.cuda.CUDAGraph()
    zero_grad()
    with torch.cuda.graph(graph, stream=stream):
        step(static_x, static_y)
    return lambda xb, yb: (static_x.copy_(xb), static_y.copy_(yb), graph.replay())


def make_step(model: nn.Module, method: str, options: dict[str, Any], x: Tensor, y: Tensor, sgd: bool = False) -> Step:
    m = H.parse_method(method)
    graph = bool(m.options.get("cuda_graph"))
    optimizer = (lambda p: torch.optim.SGD(p, lr=0.01)) if sgd else H.adam(capturable=graph)
    if m.kind == "tpsgd":
        outputs = getattr(model, "tpsgd_output_layers", None)  # the adaptor names its own
        return H.StepFn(model, m, optimizer, **options, **({"output_layers": outputs} if outputs else {}))
    opt = optimizer([p for p in model.parameters() if p.requires_grad])

    def step(xb: Tensor, yb: Tensor) -> None:
        F.cross_entropy(model(xb), yb).backward()
        opt.step()

    zero_grad = partial(opt.zero_grad, set_to_none=True)
    return _graphed(step, zero_grad, x, y) if graph else lambda xb, yb: (zero_grad(), step(xb, yb))


def _setup(name: str, method: str, precision: str, batch: int, device: str, quick: bool, sgd: bool = False) -> tuple:
    factory, shape, options = models(quick)[name]
    torch.manual_seed(0)
    model = factory().to(device)
    x, y = torch.randn(batch, *shape, device=device), torch.randint(0, 10, (batch,), device=device)
    autocast = partial(torch.autocast, torch.device(device).type, torch.bfloat16, cache_enabled=False)
    autocast = autocast if precision == "bf16" else contextlib.nullcontext
    with autocast():
        step = make_step(model, method, options, x, y, sgd)
    return step, x, y, autocast


def speed(name: str, method: str, precision: str, batch: int, device: str, quick: bool, steps: int) -> dict[str, Any]:
    """Median step time after 5 warm-up steps; peak memory from before the first step, and of the timed steps."""
    meter, sync = H.MemoryMeter(device), torch.cuda.synchronize if device == "cuda" else lambda: None
    base = meter.reset()
    step, x, y, autocast = _setup(name, method, precision, batch, device, quick)
    for _ in range(5):
        with autocast():
            step(x, y)
    warm_peak, step_base, times = meter.peak(), meter.reset(), []
    for _ in range(steps):
        start = time.perf_counter()
        with autocast():
            step(x, y)
        sync()
        times.append(time.perf_counter() - start)
    seconds, step_peak = statistics.median(times), meter.peak()
    peaks = {"peak_mib": max(warm_peak, step_peak) - base, "step_peak_mib": step_peak - step_base}
    return {"samples_per_s": batch / seconds, "step_ms": 1e3 * seconds, **peaks}


def memory(name: str, method: str, precision: str, batch: int, device: str, quick: bool) -> dict[str, Any]:
    """In this (fresh) process: extra peak RSS and CUDA peak of two steps after one, then autograd's bytes of one."""
    step, x, y, autocast = _setup(name, method, precision, batch, device, quick)
    with autocast():
        step(x, y)  # warm-up: optimizer state, projections, thread pools
    meters = [H.MemoryMeter()] + ([H.MemoryMeter("cuda")] if device == "cuda" else [])
    bases, start = [m.reset() for m in meters], time.perf_counter()
    for _ in range(2):
        with autocast():
            step(x, y)
    out = {"step_s": (time.perf_counter() - start) / 2, "extra_rss_mib": meters[0].peak() - bases[0]}
    if device == "cuda":
        out["cuda_mib"] = meters[1].peak() - bases[1]
    saved = H.SavedTensorMeter()
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack), autocast():
        step(x, y)
    return {**out, "autograd_mib": saved.peak / H.MiB}


def ops(name: str, method: str, precision: str, batch: int, device: str, quick: bool) -> dict[str, Any]:
    """aten ops and host reads of one steady step (after two), SGD for every method."""
    from torch.profiler import ProfilerActivity, profile

    step, x, y, autocast = _setup(name, method, precision, batch, "cpu", quick, sgd=True)
    with autocast():
        step(x, y), step(x, y)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                step(x, y)
    names = [e.name for e in prof.events() if e.name.startswith("aten::")]
    reads = sum(n in ("aten::_local_scalar_dense", "aten::item") for n in names)
    return {"ops": len(names) / 3, "host_reads": reads / 3}


def fit(name: str, method: str, precision: str, batch: int, device: str, quick: bool, steps: int) -> dict[str, Any]:
    """Median step of ``Trainer.fit`` (``on_train_batch_start`` to ``_end``) after 5 warm-up steps."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from zoo import ImageClassifier

    times: list[float] = []
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None

    class Timer(L.Callback):
        def on_train_batch_start(self, *args: Any) -> None:
            sync()
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            sync()
            times.extend([time.perf_counter() - self.start] if trainer.global_step > 5 else [])

    torch.manual_seed(0)
    size, n = 32 if quick else 64, (5 + steps) * batch  # convnet4, whatever the model
    kwargs = {"in_chans": 3, "input_size": size, "channels": 32}
    model = ImageClassifier("convnet4", num_classes=10, model_kwargs=kwargs)
    data = TensorDataset(torch.randn(n, 3, size, size), torch.randint(0, 10, (n,)))
    data = DataLoader(data, batch_size=batch, pin_memory=device == "cuda")
    kwargs = dict(precision="bf16-mixed" if precision == "bf16" else "32-true", max_epochs=1, callbacks=[Timer()])
    H.quiet_trainer(
        accelerator="gpu" if device == "cuda" else "cpu", devices=1, strategy=H.strategy_for(method), **kwargs
    ).fit(model, data)
    return {"samples_per_s": batch / statistics.median(times), "step_ms": 1e3 * statistics.median(times)}


TABLES = {  # part -> field -> (header, format, header of its ratio to bp or None)
    "speed": {"samples_per_s": ("samples/s", "{:.0f}", "speed vs bp"), "step_ms": ("step ms", "{:.2f}", None)}
    | {"peak_mib": ("peak MiB", "{:.0f}", "vs bp"), "step_peak_mib": ("step peak MiB", "{:.0f}", "vs bp")},
    "memory": {
        "extra_rss_mib": ("extra peak RSS MiB", "{:.1f}", "vs bp"),
        "cuda_mib": ("CUDA peak MiB", "{:.1f}", "vs bp"),
    }
    | {"autograd_mib": ("autograd-held MiB", "{:.1f}", "vs bp"), "step_s": ("step s", "{:.3f}", None)},
    "ops": {"ops": ("aten ops / step", "{:.0f}", "vs bp"), "host_reads": ("host reads / step", "{:.0f}", None)},
}


def report(store: H.Store) -> list[str]:
    lines = []
    for group in sorted({"/".join(k.split("/")[: 2 if k.startswith("fit/") else 1]) for k in store.runs}):
        keys = [k for k in store.runs if k.startswith(group + "/") and k.startswith("fit/") == group.startswith("fit/")]
        for part, fields in TABLES.items():
            keys_here = [k for k in keys if any(f in store.runs[k] for f in fields) or "error" in store.runs[k]]
            shown = [f for f in fields if any(f in store.runs[k] for k in keys_here)]
            if not shown:
                continue
            header = ["model", "precision", "batch", "method"]
            header += [h for f in shown for h in (fields[f][0], fields[f][2]) if h]
            rows = []
            for key in keys_here:
                *_, model, precision, batch, method = key.split("/")
                r, bp = store.runs[key], store.runs.get(key.rsplit("/", 1)[0] + "/bp", {})
                cells = [model, precision, batch[1:], f"`{method}`"]
                for f in shown:  # ratios: bp at least 1 MiB of memory; the step of a replayed graph allocates nothing
                    no_ratio = f not in r or not bp.get(f) or bp[f] < (1.0 if f.endswith("_mib") else 0.0)
                    no_ratio = no_ratio or (f == "step_peak_mib" and "graph" in method)
                    cells += ["–"] if f not in r else [fields[f][1].format(r[f])]
                    cells += ["–" if no_ratio else f"{r[f] / bp[f]:.2f}"] if fields[f][2] else []
                rows.append([*cells[:4], f"failed: {r['error']}"] if "error" in r else cells)
            where = f"`Trainer.fit` on {group[4:]}" if group.startswith("fit/") else f"{part} on {group}"
            lines += [f"## {where}", "", *H.md_table(header, rows)]
    return lines


def main(argv: list[str] | None = None) -> H.Store:
    p = H.parser(__doc__, seeds=None)
    p.add_argument("parts", nargs="*", default=[], help="what to measure: speed, memory, ops, fit (none: the report)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", nargs="+", default=["cnn2", "convnet4", "mlp2"], help=f"of: {', '.join(models())}")
    p.add_argument("--methods", nargs="+", default=["bp", "tpsgd-ce", "tpsgd-l2", "tpsgd-ce-lean"])
    p.add_argument("--batches", type=int, nargs="+", default=[128])
    p.add_argument("--precisions", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 20; --quick: 2)")
    p.add_argument("--name", default="steps", help="the results' file stem (default: steps)")
    p.add_argument("--title", default="One training step, BP vs tpSGD", help="the report's title")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if bad := set(args.parts) - {"speed", "memory", "ops", "fit"}:
        p.error(f"unknown parts {sorted(bad)}: choose from speed, memory, ops, fit")
    out, steps = H.setup(args), args.steps or (2 if args.quick else 20)
    if args.child:  # one memory measurement in this fresh process
        model, precision, batch, method = args.child.split("/", 3)
        result = memory(model, method, precision, int(batch[1:]), args.device, args.quick)
        print("RESULT " + json.dumps(result), flush=True)
        return H.Store(out / "child.json")
    store = H.Store.open(out / f"{args.name}.json", fresh=args.fresh)
    store.settings.setdefault("title", args.title)
    if not args.report_only:
        store.add_command("steps", argv)
        methods = [m for m in args.methods if args.device == "cuda" or "graph" not in m]  # graphs need CUDA
        device = "cuda" if args.device.startswith("cuda") else "cpu"
        methods = methods if "bp" in methods else ["bp", *methods]
        for part in args.parts:
            names = ["convnet4"] if part == "fit" else args.models
            for name, batch, precision, method in itertools.product(names, args.batches, args.precisions, methods):
                key = f"{'fit/' if part == 'fit' else ''}{device}/{name}/{precision}/b{batch}/{method}"
                store.runs.setdefault(key, {}).update(_measure(part, key, name, method, precision, batch, args, steps))
                print(f"[{part}] {key}: {store.runs[key]}", flush=True)
                store.save()
    if not args.no_report:
        store.write_report(store.settings["title"], report(store), args.quick)
    return store


def _measure(part: str, key: str, name: str, method: str, precision: str, batch: int, args: Any, steps: int) -> dict:
    try:
        if part == "memory":
            argv = ["--child", key.split("/", 1)[1], "--device", args.device, *(["--quick"] * args.quick)]
            return H.child("steps", argv, env={"MALLOC_MMAP_THRESHOLD_": "65536"})
        fn = {"speed": speed, "ops": ops, "fit": fit}[part]
        return fn(name, method, precision, batch, args.device, args.quick, *([steps] if part != "ops" else []))
    except Exception as err:  # noqa: BLE001 - a failing variant is reported in the table
        return {"error": f"{type(err).__name__}: {err}"[:300]}
    finally:
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
