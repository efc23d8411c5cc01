"""Saving and loading a ``QuietStarModel`` in safetensors.

A checkpoint directory is a plain Hugging Face model directory (loadable on its own by
``AutoModelForCausalLM.from_pretrained``, as the base model), plus the tokenizer when the
model has one, plus ``quietstar.safetensors`` (meta-token embeddings and mixing head) and
``quietstar_config.json`` (the ``QuietStarConfig``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from quietstar.model.config import QuietStarConfig
from quietstar.model.mixing import MixingHead

logger = logging.getLogger(__name__)

QUIETSTAR_WEIGHTS = "quietstar.safetensors"
LEGACY_LAST_BIAS = "mlp.4.bias"  # the mixing head's last-layer bias, saved before quietstar 0.2
QUIETSTAR_CONFIG = "quietstar_config.json"
ATTENTION_FOR_SAVING = "sdpa"


def _quietstar_state(qs) -> dict[str, torch.Tensor]:
    state = {"meta_embeddings": qs.meta_embeddings}
    state.update({f"mixing_head.{k}": v for k, v in qs.mixing_head.state_dict().items()})
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def save_pretrained(qs, directory: str | Path) -> None:
    """Write ``qs`` (base model, tokenizer, quietstar parts, config) to ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = qs.model.config
    saved_attention = config._attn_implementation
    # The saved config names a standard implementation, so the directory loads anywhere.
    config._attn_implementation = ATTENTION_FOR_SAVING
    try:
        qs.model.save_pretrained(directory, safe_serialization=True)
    finally:
        config._attn_implementation = saved_attention
    if qs.tokenizer is not None:
        qs.tokenizer.save_pretrained(directory)
    save_file(_quietstar_state(qs), str(directory / QUIETSTAR_WEIGHTS))
    (directory / QUIETSTAR_CONFIG).write_text(json.dumps(qs.config.to_dict(), indent=2))


def load_pretrained(directory: str | Path, model_class, **model_kwargs):
    """Load a ``QuietStarModel`` that ``save_pretrained`` wrote.

    Args:
        directory: the checkpoint directory.
        model_class: ``QuietStarModel`` (or a subclass): built as
            ``model_class(model, tokenizer, config)``.
        **model_kwargs: passed to ``AutoModelForCausalLM.from_pretrained`` (e.g. ``dtype``).

    Raises:
        ValueError: ``directory`` is not a quietstar checkpoint.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = Path(directory)
    for name in (QUIETSTAR_WEIGHTS, QUIETSTAR_CONFIG):
        if not (directory / name).is_file():
            raise ValueError(f"directory {str(directory)!r} is not a quietstar checkpoint: {name} is missing")
    model = AutoModelForCausalLM.from_pretrained(directory, **model_kwargs)
    tokenizer = None
    if (directory / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(directory)
    config = QuietStarConfig.from_dict(json.loads((directory / QUIETSTAR_CONFIG).read_text()))
    qs = model_class(model, tokenizer, config)
    state = load_file(str(directory / QUIETSTAR_WEIGHTS), device=str(qs.meta_embeddings.device))
    with torch.no_grad():
        qs.meta_embeddings.copy_(state.pop("meta_embeddings"))
    head_state = {k.removeprefix("mixing_head."): v for k, v in state.items()}
    if LEGACY_LAST_BIAS in head_state:
        # Saved before the mixing head lost its last-layer bias (the authors' head has none):
        # keep it, so the checkpoint computes exactly what it computed when saved.
        logger.info("%s: the mixing head has a last-layer bias (an older checkpoint); keeping it", directory)
        head = qs.mixing_head
        qs.mixing_head = MixingHead(
            head.hidden_size, sigmoid=head.sigmoid, last_layer_bias=True,
            device=qs.meta_embeddings.device, dtype=head.mlp[0].weight.dtype,
        )
    qs.mixing_head.load_state_dict(head_state)
    return qs
