"""quietstar: fast Quiet-STaR (language models that think before each token)."""

from quietstar.mixing import MixingHead
from quietstar.ops import linear_cross_entropy
from quietstar.ops import tree_attention

__version__ = "0.1.0"

__all__ = ["tree_attention"]
__all__ += ["linear_cross_entropy", "MixingHead"]
