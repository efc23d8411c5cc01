"""Functional, differentiable ops; each dispatches to a reference, torch, triton (or native) backend."""

from quietstar.ops.linear_cross_entropy import linear_cross_entropy, weighted_linear_cross_entropy
from quietstar.ops.tree_attention import tree_attention

__all__ = ["linear_cross_entropy", "tree_attention", "weighted_linear_cross_entropy"]
