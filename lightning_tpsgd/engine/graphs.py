"""``LocalLearner(cuda_graph=True)``: whole training steps captured as CUDA graphs and replayed."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["GraphedSteps"]


class GraphedSteps:
    """``LocalLearner(cuda_graph=True)``: whole training steps captured as CUDA graphs and replayed.

    One graph per (input shape and dtype, layer-wise stage, autocast state), captured after ``warmup`` eager
    steps on a side stream (optimizer state, projections and kernels are created there), all graphs sharing one
    memory pool. A replay copies the batch into the graph's static input and runs forward, local updates, output
    backward and optimizer step as one launch; the host then only does the validation bookkeeping.

    Args:
        body: ``body(x, y) -> logs``: one eager training step after ``zero_grad`` (what a graph captures).
        after_replay: the host's bookkeeping after each replay (the validation reads).
    """

    warmup = 3

    def __init__(self, body: Callable[[Tensor, Tensor], dict[str, Tensor]], after_replay: Callable[[], None]) -> None:
        self.body, self.after_replay = body, after_replay
        self._graphs: dict[tuple[Any, ...], tuple[Tensor, Tensor, Any, list[str], Tensor]] = {}
        self._eager_steps: dict[tuple[Any, ...], int] = {}
        self._pool: Any = None
        self._stream: Any = None  # one side stream for warm-up and capture (each stream gets its own workspaces)

    def step(self, x: Any, y: Tensor, optimizer: torch.optim.Optimizer, stage: int | None) -> dict[str, Tensor]:
        """One training step: eager (warm-up), captured, or replayed; one graph per shape, dtype and ``stage``."""
        if not (isinstance(x, Tensor) and x.is_cuda and isinstance(y, Tensor) and y.is_cuda):
            raise ValueError(
                "cuda_graph=True captures the step on a CUDA device: x must be one CUDA tensor and y CUDA labels "
                f"(got {type(x).__name__} on {getattr(x, 'device', '?')} and labels on {getattr(y, 'device', '?')}). "
                "Move the model and the batches to the GPU, or use cuda_graph=False."
            )
        key = (tuple(x.shape), x.dtype, tuple(y.shape), y.dtype, stage, torch.is_autocast_enabled("cuda"))
        entry = self._graphs.get(key)
        if entry is None:
            done = self._eager_steps.get(key, 0)
            if done < self.warmup:
                self._eager_steps[key] = done + 1
                return self._on_side_stream(lambda: self._eager(x, y, optimizer))
            entry = self._capture(key, x, y, optimizer)
        static_x, static_y, graph, names, stacked = entry
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        self.after_replay()
        return dict(zip(names, stacked.clone().unbind(), strict=True))

    def _eager(self, x: Tensor, y: Tensor, optimizer: torch.optim.Optimizer) -> dict[str, Tensor]:
        optimizer.zero_grad(set_to_none=True)
        return self.body(x, y)

    def _on_side_stream(self, fn: Callable[[], Any]) -> Any:
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        self._stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._stream):
            out = fn()
        torch.cuda.current_stream().wait_stream(self._stream)
        return out

    def _capture(
        self, key: tuple[Any, ...], x: Tensor, y: Tensor, optimizer: torch.optim.Optimizer
    ) -> tuple[Tensor, Tensor, Any, list[str], Tensor]:
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        static_x, static_y = x.clone(), y.clone()
        graph = torch.cuda.CUDAGraph()
        optimizer.zero_grad(set_to_none=True)  # the captured backward allocates .grad in the graph's pool
        with torch.cuda.graph(graph, pool=self._pool, stream=self._stream):
            logs = self.body(static_x, static_y)
            stacked = torch.stack([v.float() for v in logs.values()])
        entry = (static_x, static_y, graph, list(logs), stacked)
        self._graphs[key] = entry
        return entry
