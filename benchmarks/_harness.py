"""The benchmark harness: options, result store, Markdown, methods, training steps and memory meters of every script."""

import argparse
import ctypes
import ctypes.util
import fnmatch
import gc
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MiB = 2**20
Job = tuple[str, Callable[[], dict[str, Any]]]


def parser(doc: str | None, *, seeds: int | None = 3, epochs: int | None = None) -> argparse.ArgumentParser:
    """The options every benchmark script takes; a script adds its own (``seeds=None``: the script decides)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = os.environ.get("TPSGD_DATA_DIR", "../shared/data")
    p.add_argument("--data-dir", default=data, help="folder of the .npz files ($TPSGD_DATA_DIR)")
    p.add_argument("--seeds", type=int, default=seeds, help="seeds 0..N-1")
    p.add_argument("--seed-ids", type=int, nargs="+", help="these seeds instead")
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--out", type=Path, help="results folder (default: benchmarks/results[/quick])")
    p.add_argument("--threads", type=int, help="torch threads")
    p.add_argument("--quick", action="store_true", help="a labelled smoke test: small subsets and budgets")
    p.add_argument("--fresh", action="store_true", help="ignore the stored runs")
    p.add_argument("--only", nargs="+", metavar="PATTERN", help="only the runs whose key matches")
    p.add_argument("--report-only", action="store_true", help="rewrite the report from the stored runs")
    p.add_argument("--no-report", action="store_true")
    return p


def setup(args: argparse.Namespace) -> Path:
    if args.seeds is not None and args.seeds < 1:
        raise SystemExit(f"--seeds must be >= 1, got {args.seeds}")
    if args.threads:
        torch.set_num_threads(args.threads)
    return args.out or (RESULTS / "quick" if args.quick else RESULTS)


def seeds(args: argparse.Namespace, default: int = 3) -> list[int]:
    return list(args.seed_ids) if args.seed_ids else list(range(args.seeds or default))


def mean(values: Iterable[float]) -> float:
    values = list(values)
    return statistics.mean(values) if values else float("nan")


def std(values: Sequence[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def mean_std(values: Sequence[float], digits: int = 2, n: bool = False) -> str:
    """``"m ± s"`` over runs (``n``: with ``" (n=k)"``); one run: ``"v (n=1)"``; none: ``"–"``."""
    if len(values) < 2:
        return f"{values[0]:.{digits}f} (n=1)" if values else "–"
    return f"{mean(values):.{digits}f} ± {std(values):.{digits}f}" + (f" (n={len(values)})" if n else "")


def signed(value: float, digits: int = 2) -> str:
    """``+1.23`` / ``-0.40``; ``"–"`` for NaN (not measured)."""
    return f"{value:+.{digits}f}" if value == value else "–"


def md_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return [*lines, *("| " + " | ".join(map(str, row)) + " |" for row in rows), ""]


@dataclass
class Store:
    """``<folder>/<name>.json`` (report ``.md``, figure ``.png``): ``runs`` keyed ``"bp/16/0"``, saved after each."""

    path: Path
    settings: dict[str, Any] = field(default_factory=dict)
    commands: list[str] = field(default_factory=list)
    machine: str = ""
    notes: list[str] = field(default_factory=list)
    runs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def open(cls, path: Path, settings: dict[str, Any] | None = None, fresh: bool = False) -> "Store":
        data = json.loads(path.read_text()) if path.exists() and not fresh else {}
        store = cls(path, **{k: v for k, v in data.items() if k in cls.__dataclass_fields__})
        settings = json.loads(json.dumps(settings)) if settings is not None else None  # tuples become lists
        if settings is not None and store.runs and store.settings != settings:
            raise SystemExit(
                f"{path} holds runs made with the settings {store.settings}, not {settings}: pass --fresh to start "
                "over or --out to write elsewhere."
            )
        store.settings = store.settings if settings is None else settings
        return store

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = {k: v for k, v in asdict(self).items() if k != "path"}
        self.path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")

    def add_command(self, module: str, argv: Sequence[str] | None = None) -> None:
        cmd = f"python -m benchmarks.{module} " + shlex.join(sys.argv[1:] if argv is None else argv)
        self.commands += [] if cmd in self.commands else [cmd]
        gpu = f"{torch.cuda.get_device_name()}, CUDA {torch.version.cuda}, " if torch.cuda.is_available() else ""
        self.machine = f"{os.cpu_count()} CPU cores, {gpu}torch {torch.__version__}, Python {platform.python_version()}"

    def run(self, jobs: Iterable[Job], only: Sequence[str] | None = None) -> None:
        for key, job in jobs:
            if key in self.runs or (only and not any(fnmatch.fnmatchcase(key, p) for p in only)):
                continue
            self.runs[key] = record = job()
            print(f"{key}: " + ", ".join(f"{k} {v:.3g}" for k, v in record.items() if isinstance(v, float)), flush=True)
            self.save()

    def select(self, pattern: str) -> list[dict[str, Any]]:
        return [self.runs[k] for k in sorted(self.runs) if fnmatch.fnmatchcase(k, pattern)]

    def values(self, pattern: str, name: str = "acc") -> list[float]:
        return [float(r[name]) for r in self.select(pattern) if name in r]

    def write_report(self, title: str, body: list[str], quick: bool = False, figure: bool = False) -> Path:
        lines = [f"# {title}", ""]
        lines += ["**QUICK RUN**: small subsets and budgets, a smoke test, not the result.", ""] if quick else []
        lines += [f"Machine: {self.machine or 'not recorded'}.", "", "Commands (repository root):", ""]
        lines += [*(f"- `{c}`" for c in self.commands), "", *body]
        lines += ["## Notes", "", *(line for note in self.notes for line in (note, ""))] if self.notes else []
        lines += [f"![{title}]({self.path.stem}.png)", ""] if figure else []
        path = self.path.with_suffix(".md")
        path.write_text("\n".join(lines).rstrip("\n") + "\n")
        print(f"wrote {path}")
        return path


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    pyplot().close(fig)


@dataclass
class Panel:
    """One bar chart: ``series[label][g]``, the values of group ``g``; ``paper``: black marks, per series and group."""

    title: str
    groups: Sequence[str]
    series: dict[str, list[list[float]]]
    ylabel: str = ""
    paper: dict[str, list[float | None]] | None = None
    log: bool = False


def bar_chart(path: Path, title: str, panels: Sequence[Panel]) -> None:
    fig, axes = pyplot().subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), squeeze=False)
    for ax, p in zip(axes[0], panels, strict=True):
        width = 0.8 / len(p.series)
        for i, (label, runs) in enumerate(p.series.items()):
            xs = [g + i * width for g in range(len(p.groups))]
            ax.bar(xs, [mean(r) if r else 0 for r in runs], width, yerr=[std(r) for r in runs], capsize=2, label=label)
            marks = [(x, v) for x, v in zip(xs, (p.paper or {}).get(label, []), strict=False) if v is not None]
            if marks:
                ax.scatter(*zip(*marks, strict=True), marker="_", s=150, color="k", zorder=3)
        ax.set_xticks([g + 0.4 - width / 2 for g in range(len(p.groups))], p.groups, fontsize=8)
        ax.set(title=p.title, ylabel=p.ylabel, yscale="log" if p.log else "linear")
        if len(p.series) > 1:
            ax.legend(fontsize=7)
    fig.suptitle(title + (" (black marks: the paper)" if any(p.paper for p in panels) else ""))
    save_figure(fig, path)


FLAGS = {"lean": "lean", "compile": "compile", "graph": "cuda_graph"}


@dataclass(frozen=True)
class Method:
    """``kind``: ``"bp"``, ``"control"`` (all but the last layer frozen) or ``"tpsgd"``, with its ``options``."""

    name: str
    kind: str
    options: dict[str, Any]


def _split(text: str) -> list[str]:
    """``text`` split at the commas outside brackets and quotes (JSON option values may hold commas)."""
    parts, depth, quoted, start = [], 0, False, 0
    for i, ch in enumerate(text):
        quoted ^= ch == '"'
        depth += (ch in "[{") - (ch in "]}") if not quoted else 0
        if ch == "," and not depth and not quoted:
            parts, start = [*parts, text[start:i]], i + 1
    return [*parts, text[start:]]


def parse_method(name: str) -> Method:
    """``bp[-graph]``, ``control`` or ``tpsgd[-<rule>[@<target_scale>]][-lean][-compile][-graph][,<option>=<JSON>]``."""
    head, *pairs = _split(name)
    kind, *parts = head.split("-")
    if kind not in ("bp", "control", "tpsgd"):
        raise ValueError(f"Unknown method {name!r}: use bp, control or tpsgd[-<rule>[@<scale>]][-lean|-compile|-graph]")
    options: dict[str, Any] = {}
    for part in parts:
        if part in FLAGS and (kind == "tpsgd" or part == "graph"):
            options[FLAGS[part]] = True
        elif kind == "tpsgd" and not options and part not in FLAGS:
            rule, _, scale = part.partition("@")
            options.update(rule=rule, **({"target_scale": float(scale)} if scale else {}))
        else:
            raise ValueError(f"Method {name!r}: unexpected {part!r} (the rule comes first, then lean/compile/graph).")
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or kind != "tpsgd":
            raise ValueError(f"Method {name!r}: options are <key>=<value> after a tpsgd method, got {pair!r}.")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return Method(name, kind, options)


def strategy_for(method: str | Method) -> Any:
    from lightning_tpsgd import TPSGDStrategy

    m = parse_method(method) if isinstance(method, str) else method
    return "auto" if m.kind != "tpsgd" else TPSGDStrategy(**m.options) if m.options else "tpsgd"


def freeze_hidden(model: nn.Module) -> None:
    """The control: every module with parameters of its own, but the last, keeps its random initialisation."""
    layers = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
    for layer in layers[:-1]:
        layer.requires_grad_(False)


def adam(lr: float = 1e-3, **kwargs: Any) -> Callable[[Any], torch.optim.Optimizer]:
    return lambda params: torch.optim.Adam(params, lr=lr, **kwargs)


class StepFn:
    """``step(x, y)``: one training step of a method on ``model`` (default Adam, lr 1e-3); ``logits=True`` returns the
    (B, C) output (tpSGD: by a forward hook; not with ``cuda_graph``). Call :meth:`close` when done."""

    def __init__(
        self, model: nn.Module, method: str | Method, optimizer: Any = None, *, logits: bool = False, **options: Any
    ) -> None:
        from lightning_tpsgd import LocalLearner

        self.method = parse_method(method) if isinstance(method, str) else method
        self.model, self.logits, self.learner, self.handle, self.outputs = model, logits, None, None, []
        optimizer = optimizer or adam()
        if self.method.kind == "control":
            freeze_hidden(model)
        if self.method.kind != "tpsgd":
            self.optimizer = optimizer([p for p in model.parameters() if p.requires_grad])
            return
        self.learner = LocalLearner(model, optimizer=optimizer, **{**self.method.options, **options})
        if logits:
            self.handle = model.register_forward_hook(lambda m, i, o: self.outputs.append(o.detach()))

    def __call__(self, x: Tensor, y: Tensor) -> Tensor | None:
        if self.learner is not None:
            self.outputs.clear()
            self.learner.step(x, y)
            return self.outputs[-1] if self.logits else None
        self.optimizer.zero_grad(set_to_none=True)
        out = self.model(x)
        F.cross_entropy(out, y).backward()
        self.optimizer.step()
        return out.detach() if self.logits else None

    def close(self) -> None:
        if self.handle is not None:
            self.handle.remove()
        if self.learner is not None:
            self.learner.close()


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable) -> float:
    was_training, device = model.training, next(model.parameters()).device
    correct = total = 0
    for x, y in loader:
        correct += int((model.eval()(x.to(device)).argmax(1) == y.to(device)).sum())
        total += len(y)
    model.train(was_training)
    return 100.0 * correct / max(total, 1)


def train(
    model: nn.Module, method: str, loader: Iterable, epochs: int, *, lr: float, seed: int, test_loader: Any = None
) -> dict[str, Any]:
    """A plain loop of :class:`StepFn` steps: ``fit_s``, ``epoch_s``, ``train_acc`` (and ``test_curve``)."""
    torch.manual_seed(seed)  # the shuffling order
    m = parse_method(method)
    step = StepFn(model.train(), m, adam(lr), logits=True, **({"seed": seed} if m.kind == "tpsgd" else {}))
    out: dict[str, Any] = {"epoch_s": [], "train_acc": [], **({"test_curve": []} if test_loader is not None else {})}
    for _ in range(epochs):
        start, correct, total = time.perf_counter(), 0, 0
        for x, y in loader:
            correct += int((step(x, y).argmax(1) == y).sum())
            total += len(y)
        out["epoch_s"].append(time.perf_counter() - start)
        out["train_acc"].append(100.0 * correct / max(total, 1))
        if test_loader is not None:
            out["test_curve"].append(evaluate(model, test_loader))
    step.close()
    return {"fit_s": sum(out["epoch_s"]), **out}


def quiet_trainer(**kwargs: Any) -> Any:
    import lightning as L

    quiet = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    return L.Trainer(**{**quiet, "num_sanity_val_steps": 0, **kwargs})


def device_name(device: torch.device) -> str:
    """E.g. ``"cpu, torch 2.14.1"`` or ``"NVIDIA H200, torch 2.11.0"``: where a run was measured."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return f"{name}, torch {torch.__version__.split('+')[0]}"


def fit(module: Any, datamodule: Any, method: str, epochs: int, **trainer_kwargs: Any) -> dict[str, Any]:
    """``Trainer.fit`` with ``method`` (``epochs=0``: untrained), then test: ``acc``, ``fit_s``, ``epochs``, device."""
    m = parse_method(method)
    if m.kind == "control":
        freeze_hidden(module)
    kwargs = {"accelerator": "cpu", "max_epochs": epochs, "strategy": strategy_for(m), **trainer_kwargs}
    trainer, start = quiet_trainer(**kwargs), time.perf_counter()
    if epochs:
        trainer.fit(module, datamodule=datamodule)
    fit_s, device = time.perf_counter() - start, trainer.strategy.root_device
    datamodule.setup("test")
    acc = evaluate(module.to(device), datamodule.test_dataloader())
    return {"acc": acc, "fit_s": fit_s, "epochs": trainer.current_epoch, "device": device_name(device)}


def _libc() -> Any:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def mmap_large_blocks(threshold: int = 65536) -> bool:
    """Serve allocations of ``threshold`` bytes or more by ``mmap`` (glibc), so that freed tensors go back to the OS."""
    libc = _libc()
    return bool(libc is not None and hasattr(libc, "mallopt") and libc.mallopt(-3, int(threshold)))


class MemoryMeter:
    """Peak memory in MiB since :meth:`reset`: the CUDA allocator's on a GPU, else the process's peak RSS (Linux)."""

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.cuda = torch.device(device).type == "cuda"

    @staticmethod
    def rss(name: str = "VmRSS") -> float:
        """A ``kB`` field of ``/proc/self/status`` in MiB (``VmHWM``: the peak since the reset)."""
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1]) * 1024 / MiB
        raise RuntimeError(f"{name} is not in /proc/self/status: the memory meter needs Linux.")

    def reset(self) -> float:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated() / MiB
        if (libc := _libc()) is not None and hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        return self.rss()

    def peak(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / MiB
        return self.rss("VmHWM")


class SavedTensorMeter:
    """Peak bytes of the distinct storages autograd holds for backward, as ``saved_tensors_hooks(pack, unpack)``."""

    def __init__(self) -> None:
        self.live: dict[int, int] = {}
        self.refs: dict[int, int] = {}
        self.peak = 0

    def pack(self, t: Tensor) -> Any:
        key = t.untyped_storage().data_ptr()
        self.refs[key] = self.refs.get(key, 0) + 1
        self.live[key] = t.untyped_storage().nbytes()
        self.peak = max(self.peak, sum(self.live.values()))
        return _Saved(self, key, t)

    @staticmethod
    def unpack(saved: Any) -> Tensor:
        return saved.t


class _Saved:
    def __init__(self, meter: SavedTensorMeter, key: int, t: Tensor) -> None:
        self.meter, self.key, self.t = meter, key, t

    def __del__(self) -> None:
        refs = self.meter.refs
        refs[self.key] -= 1
        if refs[self.key] == 0:
            del refs[self.key], self.meter.live[self.key]


def child(module: str, argv: Sequence[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """``python -m benchmarks.<module> <argv>`` in a fresh process: the JSON of its ``RESULT {...}`` line."""
    cmd, result = [sys.executable, "-m", f"benchmarks.{module}", *argv], None
    with tempfile.TemporaryFile("w+") as err:  # a file, so that a chatty child cannot block on a full pipe
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT, env={**os.environ, **(env or {})}
        )
        for line in proc.stdout or ():
            if line.startswith("RESULT "):
                result = json.loads(line[len("RESULT ") :])
            elif line.startswith("["):
                print(line.rstrip(), flush=True)
        proc.wait()
        err.seek(0)
        if result is None:
            raise RuntimeError(f"{shlex.join(cmd)} failed (exit code {proc.returncode}):\n{err.read()[-5000:]}")
    return result
