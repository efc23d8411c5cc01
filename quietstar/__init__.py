"""quietstar: fast Quiet-STaR (language models that think before each token)."""

from quietstar.model import MixingHead, QuietStarAttention, QuietStarConfig, QuietStarModel, QuietStarOutput, patch
from quietstar.ops import linear_cross_entropy, tree_attention, weighted_linear_cross_entropy

__version__ = "0.2.0"

__all__ = [
    "MixingHead",
    "QuietStarAttention",
    "QuietStarConfig",
    "QuietStarModel",
    "QuietStarOutput",
    "linear_cross_entropy",
    "patch",
    "tree_attention",
    "weighted_linear_cross_entropy",
]
