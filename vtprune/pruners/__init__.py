"""The built-in pruners. Importing this package registers every one of them under its registry name.

Import order matters: `vtprune.registry` imports `vtprune.pruners.base`, so the package has to be imported
before (or instead of) `vtprune.registry`; ``vtprune/__init__.py`` does ``from . import pruners`` first.
"""

from .base import Pruner
from .dymu import DyMU, DyMUThresholds
from .divprune import DivPrune, greedy_max_min, greedy_max_min_naive, pairwise_distance
from .fastervlm import FasterVLM
from .hiprune import HiPrune
from .pool import Pool, pool_grid
from .random import RandomPruner
from .visionzip import VisionZip

__all__ = [
    "Pruner",
    "FasterVLM",
    "HiPrune",
    "DivPrune",
    "VisionZip",
    "DyMU",
    "DyMUThresholds",
    "RandomPruner",
    "Pool",
    "greedy_max_min",
    "greedy_max_min_naive",
    "pairwise_distance",
    "pool_grid",
]
