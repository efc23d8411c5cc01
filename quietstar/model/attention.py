"""Tree attention inside Hugging Face Llama-family models.

* ``quietstar_attention_forward``: an attention function with transformers' interface. With a
  ``tree_layout`` keyword it runs ``tree_attention``; without one it is ordinary attention
  (transformers' SDPA function) with the mask the model built.
* ``QuietStarAttention``: a drop-in attention module built from a model's own attention layer
  (the same projection modules, so the same weights and state-dict keys; RoPE, GQA, the
  Qwen3 query/key norms and the sliding window carried over).
* ``patch(model)``: swaps every decoder layer's attention for ``QuietStarAttention`` in place
  and registers ``"quietstar"`` with transformers' ``AttentionInterface`` and
  ``AttentionMaskInterface`` (so, once registered in the process, ``attn_implementation="quietstar"`` also works).
"""

from __future__ import annotations

import copy
import functools
import logging

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from quietstar.ops.layout import TreeLayout
from quietstar.ops.rotary_embedding import rotary_embedding
from quietstar.ops.tree_attention import tree_attention
from quietstar.ops.tree_attention_native import half_precision_pays
from quietstar.ops.tree_attention_rows import TreeAttentionRows

logger = logging.getLogger(__name__)

ATTENTION_NAME = "quietstar"
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@functools.lru_cache(maxsize=None)
def _log_dropout_not_applied(dropout: float) -> None:
    """Say once per dropout rate that the tree passes run without it."""
    logger.warning(
        "attention dropout %g is not applied in the tree passes (tree_attention has no dropout); "
        "set the model config's attention_dropout to 0 to silence this",
        dropout,
    )


def quietstar_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    tree_layout: TreeLayout | None = None,
    known_rows: TreeAttentionRows | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention with transformers' calling convention.

    Args:
        module: the attention layer (for ``is_causal`` and GQA bookkeeping on ordinary input).
        query: ``[B, Hq, Tq, D]``; key, value: ``[B, Hkv, Tk, D]`` (the cache included).
        attention_mask: the model's mask for ordinary input; unused with ``tree_layout``.
        tree_layout: the queries and keys hold the tree layout: run ``tree_attention``, which
            has no dropout (a warning says so once where ``dropout`` is set).
        known_rows: with ``tree_layout``, ``tree_attention``'s rows kept across calls.

    Returns:
        ``([B, Tq, Hq, D], None)``.
    """
    if tree_layout is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, sliding_window=sliding_window,
            **kwargs,
        )
    if dropout:
        _log_dropout_not_applied(dropout)
    # Under autocast, RoPE (float32 cos/sin) leaves q and k in float32 while v is half; the op
    # takes one dtype. On CUDA the autocast one (the kernels multiply in it). On CPU the
    # autocast one only at long slots on a CPU that multiplies bfloat16 (``half_precision_pays``:
    # the native backend multiplies it there); elsewhere every CPU backend computes half
    # precision in float32, so float32: v is cast up once instead of q and k making a round trip.
    dtype = autocast_dtype(query.device)
    if dtype is None:
        dtype = query.dtype
    elif query.device.type == "cpu" and not half_precision_pays(dtype, query.device, tree_layout.slot_len):
        dtype = torch.float32
    query, key, value = (t.to(dtype) for t in (query, key, value))
    out = tree_attention(
        query,
        key,
        value,
        tree_layout.slot_len,
        n_thoughts=tree_layout.n_thoughts,
        key_padding_mask=tree_layout.key_padding_mask,
        sliding_window=sliding_window,
        scale=scaling,
        backend=tree_layout.backend,
        known_rows=known_rows,
    )
    return out.transpose(1, 2), None


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast computes in on ``device`` right now, or None when it is off."""
    if not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


def register_attention() -> None:
    """Register ``"quietstar"`` with transformers' attention and mask interfaces (idempotent).

    Both are needed: a function known to ``AttentionInterface`` alone gets no padding mask.
    """
    AttentionInterface.register(ATTENTION_NAME, quietstar_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


class QuietStarAttention(nn.Module):
    """A Llama-family attention layer that also understands the tree layout.

    Built from an existing ``LlamaAttention``/``MistralAttention``/``Qwen2Attention``/
    ``Qwen3Attention``: it shares that layer's projection (and Qwen3 norm) modules, so its
    weights and state-dict keys are the original's. Called like the original (the decoder
    layer's keywords, ``cache=`` or ``past_key_values=``), it returns the same output on
    ordinary input; with ``tree_layout=TreeLayout(...)`` it applies the tree rule.

    Shapes:
        ``forward(hidden_states [B, T, d], position_embeddings (cos, sin) [B, T, D], ...)
        -> (out [B, T, d], None)``.

    ``known_rows`` (``TreeAttentionRows`` or None) is handed to ``tree_attention`` with the tree
    layout: ``projection_replay`` sets it while a training step samples and replays.
    """

    known_rows: TreeAttentionRows | None = None

    def __init__(self, attention: nn.Module) -> None:
        super().__init__()
        missing = [n for n in ("q_proj", "k_proj", "v_proj", "o_proj", "config", "layer_idx") if not hasattr(attention, n)]
        if missing:
            raise ValueError(
                f"attention must be a Llama-family attention layer ({', '.join(SUPPORTED_MODEL_TYPES)}); "
                f"{type(attention).__name__} lacks {missing}"
            )
        config = attention.config
        self.config = config
        self.layer_idx = attention.layer_idx
        self.head_dim = getattr(attention, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = getattr(attention, "scaling", self.head_dim**-0.5)
        self.attention_dropout = getattr(attention, "attention_dropout", 0.0)
        self.is_causal = True
        # Qwen2/Qwen3 keep the window per layer; Mistral reads it from the config.
        self.sliding_window = getattr(attention, "sliding_window", getattr(config, "sliding_window", None))
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (
            attention.q_proj,
            attention.k_proj,
            attention.v_proj,
            attention.o_proj,
        )
        self.q_norm = getattr(attention, "q_norm", None)
        self.k_norm = getattr(attention, "k_norm", None)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache=None,
        past_key_values=None,
        tree_layout: TreeLayout | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        cache = cache if cache is not None else past_key_values
        batch, length, _ = hidden_states.shape
        shape = (batch, length, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(shape)
        key = self.k_proj(hidden_states).view(shape)
        value = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        if self.q_norm is not None:
            query, key = self.q_norm(query), self.k_norm(key)
        cos, sin = position_embeddings
        query, key = rotary_embedding(query, cos, sin), rotary_embedding(key, cos, sin)  # [B, H, T, D]
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        out, _ = quietstar_attention_forward(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            tree_layout=tree_layout,
            known_rows=self.known_rows,
        )
        return self.o_proj(out.reshape(batch, length, -1)), None


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a causal LM (``model.model.layers``) or of its inner model."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"model must be a Llama-family causal LM with .model.layers, got {type(model).__name__}")
    return layers


def check_supported(model: nn.Module) -> None:
    """Raise ``ValueError`` listing the supported architectures unless ``model`` is one."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model architecture {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )


def patch(model: nn.Module) -> nn.Module:
    """Switch a loaded Llama-family model to ``QuietStarAttention`` in place; returns it.

    The model's config is deep-copied first (models built from one config share it), and
    its attention implementation set to ``"quietstar"``, whose mask function is SDPA's: on
    ordinary input the patched model's logits equal the unpatched model's. Patching twice
    is a no-op.

    Raises:
        ValueError: the architecture is not one of ``SUPPORTED_MODEL_TYPES``.
    """
    check_supported(model)
    register_attention()
    old_config = model.config
    if old_config._attn_implementation != ATTENTION_NAME:
        new_config = copy.deepcopy(old_config)
        new_config._attn_implementation = ATTENTION_NAME
        for module in model.modules():
            if getattr(module, "config", None) is old_config:
                module.config = new_config
    for layer in decoder_layers(model):
        if not isinstance(layer.self_attn, QuietStarAttention):
            layer.self_attn = QuietStarAttention(layer.self_attn)
    return model
