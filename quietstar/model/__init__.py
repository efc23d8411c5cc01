"""The model layer: Quiet-STaR over a Hugging Face causal LM (drop-in tree attention, the
mixing head, ``QuietStarModel`` with its losses, generation, checkpoints, loaders, and the
step-by-step reference). It uses the ops below it and nothing above."""

from quietstar.model.attention import QuietStarAttention, patch
from quietstar.model.config import QuietStarConfig
from quietstar.model.mixing import MixingHead
from quietstar.model.quietstar_model import QuietStarModel, QuietStarOutput

__all__ = ["MixingHead", "QuietStarAttention", "QuietStarConfig", "QuietStarModel", "QuietStarOutput", "patch"]
