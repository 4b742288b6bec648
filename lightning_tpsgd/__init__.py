"""lightning-tpsgd: train neural networks without global backpropagation (tpSGD, DRTP, local losses).

Importing the package registers ``Trainer(strategy="tpsgd")`` and ``"tpsgd_ddp"`` in Lightning's strategy
registry.
"""

from lightning.pytorch.strategies import StrategyRegistry

from .config import TPSGDConfig
from .engine import Block, LocalLearner, find_blocks
from .projections import create_projection, list_projections
from .rules import create_rule, list_rules
from .strategy import TPSGDDDPStrategy, TPSGDStrategy

__version__ = "0.1.0"
__all__ = [
    "Block",
    "LocalLearner",
    "TPSGDConfig",
    "TPSGDDDPStrategy",
    "TPSGDStrategy",
    "create_projection",
    "create_rule",
    "find_blocks",
    "list_projections",
    "list_rules",
]

for _strategy in (TPSGDStrategy, TPSGDDDPStrategy):
    if _strategy.strategy_name not in StrategyRegistry:
        _strategy.register_strategies(StrategyRegistry)
