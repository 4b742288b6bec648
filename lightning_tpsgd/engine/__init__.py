"""The tpSGD engine: split a model into blocks, give each hidden block a projected target, train it locally.

One concept per module: :mod:`.blocks` (what a block is; the trace of the first batch and its locality checks),
:mod:`.blockwise` (submodules as blocks), :mod:`.recompute` (recomputation inside blocks), :mod:`.tracing` (the
first training forward, then the hooks of its plan), :mod:`.configure` (each hidden block's rule, tap and projection
from the options), :mod:`.forward` (the state of a training step, and the hooks that end each block),
:mod:`.kernels` (rule → local gradient, one dispatch), :mod:`.store` (projections: build, regenerate, restore),
:mod:`.schedule` (simultaneous or layer-wise), :mod:`.checks` (validation that never stalls the device),
:mod:`.graphs` (the CUDA-graph step) and :mod:`.learner` (:class:`LocalLearner`, which composes them).
"""

from .blocks import TRAINABLE_LAYERS, Block, cross_block_guard, find_blocks, register_activation
from .configure import AUTO_RULES
from .forward import GradSync, StopForward
from .kernels import LocalGrad, local_grad
from .learner import LocalLearner

__all__ = [
    "AUTO_RULES",
    "Block",
    "GradSync",
    "LocalGrad",
    "LocalLearner",
    "StopForward",
    "TRAINABLE_LAYERS",
    "cross_block_guard",
    "find_blocks",
    "local_grad",
    "register_activation",
]
