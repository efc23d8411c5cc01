"""Functional, differentiable ops; each dispatches to a reference, torch or triton backend."""

from quietstar.ops.tree_attention import tree_attention

__all__ = ["tree_attention"]
