"""The decoder's norms and MLPs on quietstar's fused ops (``rms_norm``, ``swiglu``), as
Liger-Kernel patches them: same arithmetic, fewer passes over memory.

* ``QuietStarRMSNorm``: built from a Llama-family RMSNorm, sharing its ``weight``.
* ``QuietStarMLP``: built from a Llama-family MLP with the SiLU gate, sharing its three
  projection modules (so projection replay and hooks on them see the same modules).
* ``fuse_layers(model)``: swaps every decoder layer's two norms and its MLP, and the final norm,
  in place. Weights, state-dict keys and outputs stay the original's (to float32 rounding).
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers.activations import SiLUActivation
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm
from transformers.models.mistral.modeling_mistral import MistralMLP, MistralRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP, Qwen2RMSNorm
from transformers.models.qwen3.modeling_qwen3 import Qwen3MLP, Qwen3RMSNorm

from quietstar.model.attention import autocast_dtype, decoder_layers
from quietstar.ops.rms_norm import rms_norm
from quietstar.ops.swiglu import swiglu

logger = logging.getLogger(__name__)

# Exactly these classes (a subclass may compute something else) are swapped.
RMS_NORM_TYPES = (LlamaRMSNorm, MistralRMSNorm, Qwen2RMSNorm, Qwen3RMSNorm)
MLP_TYPES = (LlamaMLP, MistralMLP, Qwen2MLP, Qwen3MLP)
NORM_NAMES = ("input_layernorm", "post_attention_layernorm")


class QuietStarRMSNorm(nn.Module):
    """``weight * (x * rsqrt(mean(x^2) + eps))`` through ``rms_norm``; ``[..., d] -> [..., d]``.

    With ``feeds_projections`` (a decoder layer's two norms, whose outputs only enter the
    attention's and the MLP's projections) the result comes in the autocast dtype while autocast
    is on: the values the projections would have cast it to, cast once in the norm's kernel
    instead of once per projection (three for q/k/v, two for gate/up; about 5% of a bfloat16
    training step on a 2-core AMD EPYC, docs/benchmarks.md). Their input gradients then add up
    in that dtype before the norm's backward, as they would in a model stored in it.
    """

    def __init__(self, norm: nn.Module, feeds_projections: bool = False) -> None:
        super().__init__()
        self.weight = norm.weight
        self.variance_epsilon = norm.variance_epsilon
        self.feeds_projections = feeds_projections

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        out_dtype = autocast_dtype(hidden_states.device) if self.feeds_projections else None
        return rms_norm(hidden_states, self.weight, self.variance_epsilon, out_dtype=out_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}, feeds_projections={self.feeds_projections}"


class QuietStarMLP(nn.Module):
    """``down_proj(swiglu(gate_proj(x), up_proj(x)))``; ``[..., d] -> [..., d]``."""

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


# Every kind of hook a module can carry; a swap would drop them with the module.
HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def _has_hooks(module: nn.Module) -> bool:
    return any(getattr(module, name, None) for name in HOOK_DICTS)


def _swappable(module: nn.Module, types: tuple[type, ...]) -> bool:
    """An instance of exactly one of ``types``, with no hooks or instance ``forward`` of its own
    (a swap would drop them)."""
    return type(module) in types and not _has_hooks(module) and "forward" not in vars(module)


def _silu_gate(mlp: nn.Module) -> bool:
    """The MLP's activation is SiLU (transformers' or torch's module) and carries no hooks."""
    act = getattr(mlp, "act_fn", None)
    return type(act) in (SiLUActivation, nn.SiLU) and not _has_hooks(act)


def fuse_layers(model: nn.Module) -> nn.Module:
    """Swap the decoder's RMSNorms and SiLU-gated MLPs of a Llama-family causal LM for
    ``QuietStarRMSNorm`` and ``QuietStarMLP`` in place; returns the model. Modules of another
    type (a subclass, another activation module) or with hooks of any kind (on the module or
    on its activation) stay as they are; swapping twice is a no-op."""
    kept = 0
    for layer in decoder_layers(model):
        for name in NORM_NAMES:
            norm = getattr(layer, name, None)
            if _swappable(norm, RMS_NORM_TYPES):
                setattr(layer, name, QuietStarRMSNorm(norm, feeds_projections=True).train(norm.training))
            elif not isinstance(norm, QuietStarRMSNorm):
                kept += 1
        if _swappable(layer.mlp, MLP_TYPES) and _silu_gate(layer.mlp):
            layer.mlp = QuietStarMLP(layer.mlp).train(layer.mlp.training)
        elif not isinstance(layer.mlp, QuietStarMLP):
            kept += 1
    inner = getattr(model, "model", model)
    if _swappable(getattr(inner, "norm", None), RMS_NORM_TYPES):
        inner.norm = QuietStarRMSNorm(inner.norm).train(inner.norm.training)
    if kept:
        logger.info("fuse_layers: %d decoder norms or MLPs are not the Llama family's own; they run as they are", kept)
    return model
