"""The tpSGD engine: split a model into blocks, give each hidden block a projected target, train it locally.

One concept per module: :mod:`.blocks` (what a block is; the trace of the first batch and its locality checks),
:mod:`.kernels` (rule → local gradient, one dispatch), :mod:`.store` (projections: build, regenerate, restore),
:mod:`.schedule` (simultaneous or layer-wise), :mod:`.checks` (validation that never stalls the device),
:mod:`.graphs` (the CUDA-graph step) and :mod:`.learner` (:class:`LocalLearner`, which composes them).
"""

from .blocks import TRAINABLE_LAYERS, Block, cross_block_guard, find_blocks, register_activation
from .kernels import LocalGrad, local_grad
from .learner import AUTO_RULES, GradSync, LocalLearner, StopForward

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
