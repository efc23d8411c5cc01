"""Functional, differentiable ops; each dispatches to a reference, torch, triton (or native) backend."""

from quietstar.ops.linear_cross_entropy import linear_cross_entropy, weighted_linear_cross_entropy
from quietstar.ops.tree_attention import tree_attention
from quietstar.ops.tree_attention_rows import TreeAttentionRows

__all__ = ["TreeAttentionRows", "linear_cross_entropy", "tree_attention", "weighted_linear_cross_entropy"]
