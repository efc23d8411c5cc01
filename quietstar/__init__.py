"""quietstar: fast Quiet-STaR (language models that think before each token).

The ops (``tree_attention``, ``linear_cross_entropy``, ``weighted_linear_cross_entropy``) load
with the package; the model layer's names (``QuietStarModel`` and the rest), which need
Hugging Face transformers (about two seconds to import), load at their first use.
"""

from __future__ import annotations

import importlib

from quietstar.ops import linear_cross_entropy, tree_attention, weighted_linear_cross_entropy

__version__ = "0.2.0"

# Names of quietstar.model, imported when first asked for.
MODEL_NAMES = ("MixingHead", "QuietStarAttention", "QuietStarConfig", "QuietStarModel", "QuietStarOutput", "patch")

__all__ = [*MODEL_NAMES, "linear_cross_entropy", "tree_attention", "weighted_linear_cross_entropy"]


def __getattr__(name: str):
    if name == "model":
        return importlib.import_module("quietstar.model")
    if name in MODEL_NAMES:
        value = getattr(importlib.import_module("quietstar.model"), name)
        globals()[name] = value  # later lookups find it directly
        return value
    raise AttributeError(f"module 'quietstar' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *MODEL_NAMES})
