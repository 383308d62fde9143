"""vtprune: training-free visual token pruning and merging for vision-language models.

    import vtprune
    vtprune.list_pruners()
    handle = vtprune.apply(model, "fastervlm", keep=64)
    ...  # use the processor and model exactly as before
    handle.stats
    handle.remove()
"""

from . import _moved
from . import pruners  # noqa: F401  (registers the built-in pruners)
from .api import apply, remove
from .calibration import calibrate
from .budget import Budget
from .errors import (
    AlreadyPatchedError,
    BudgetError,
    ConfigError,
    MissingCLSError,
    UnsupportedModelError,
    VTPruneError,
)
from .integration import (
    EncoderMerging,
    Integration,
    VLMEncoderMerging,
    VLMIntegration,
    register_integration,
    supported_model_classes,
)
from .overlay import visualize
from .patching import PruneHandle
from .pruners.base import Pruner
from .pruners.dymu import DyMUThresholds
from .registry import create_pruner, list_pruners, register_pruner
from .tokens import CLS_INDEX, EncoderInfo, ImageStats, Reduction, TensorProbe, VisualTokens

__version__ = "0.1.0"

_moved.install()

__all__ = [
    "AlreadyPatchedError",
    "Budget",
    "BudgetError",
    "CLS_INDEX",
    "ConfigError",
    "DyMUThresholds",
    "EncoderInfo",
    "EncoderMerging",
    "ImageStats",
    "Integration",
    "MissingCLSError",
    "PruneHandle",
    "Pruner",
    "Reduction",
    "TensorProbe",
    "UnsupportedModelError",
    "VTPruneError",
    "VLMEncoderMerging",
    "VLMIntegration",
    "VisualTokens",
    "apply",
    "calibrate",
    "create_pruner",
    "list_pruners",
    "register_integration",
    "register_pruner",
    "remove",
    "supported_model_classes",
    "visualize",
]
