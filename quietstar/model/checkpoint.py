"""Saving and loading a ``QuietStarModel`` in safetensors.

A checkpoint directory is a plain Hugging Face model directory (loadable on its own by
``AutoModelForCausalLM.from_pretrained``, as the base model), plus the tokenizer when the
model has one, plus ``quietstar.safetensors`` (meta-token embeddings and mixing head) and
``quietstar_config.json`` (the ``QuietStarConfig``).
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from quietstar.model.config import QuietStarConfig
from quietstar.model.mixing import MixingHead

logger = logging.getLogger(__name__)

MODEL_WEIGHTS = "model.safetensors"  # the base model, as transformers writes it
QUIETSTAR_WEIGHTS = "quietstar.safetensors"
LEGACY_LAST_BIAS = "mlp.4.bias"  # the mixing head's last-layer bias, saved before quietstar 0.2
QUIETSTAR_CONFIG = "quietstar_config.json"
ATTENTION_FOR_SAVING = "sdpa"
MODEL_PREFIX = "model."  # QuietStarModel's attribute holding the base model


def save_pretrained(qs, directory: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write ``qs`` (base model, tokenizer, quietstar parts, config) to ``directory``.

    Args:
        qs: the ``QuietStarModel``.
        directory: created if missing.
        state_dict: ``qs``'s full state dict to write instead of ``qs.state_dict()`` (a
            sharded model's gathered weights); keys as in ``qs.state_dict()``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = qs.state_dict() if state_dict is None else state_dict
    model_state = {k.removeprefix(MODEL_PREFIX): v for k, v in state.items() if k.startswith(MODEL_PREFIX)}
    for key in _tied_keys(qs.model):
        model_state.pop(key, None)
    quietstar_state = {k: v for k, v in state.items() if not k.startswith(MODEL_PREFIX)}
    save_file(_contiguous_cpu(model_state), str(directory / MODEL_WEIGHTS), metadata={"format": "pt"})
    save_file(_contiguous_cpu(quietstar_state), str(directory / QUIETSTAR_WEIGHTS))
    config = copy.deepcopy(qs.model.config)
    # The saved config names a standard implementation, so the directory loads anywhere.
    config._attn_implementation = ATTENTION_FOR_SAVING
    # and the dtype the weights are saved in (the config's may be the one a folder was loaded
    # in before a cast), which from_pretrained loads them as.
    config.dtype = next((v.dtype for v in model_state.values() if v.is_floating_point()), config.dtype)
    config.save_pretrained(directory)
    if getattr(qs.model, "generation_config", None) is not None:
        qs.model.generation_config.save_pretrained(directory)
    if qs.tokenizer is not None:
        qs.tokenizer.save_pretrained(directory)
    (directory / QUIETSTAR_CONFIG).write_text(json.dumps(qs.config.to_dict(), indent=2))


def read_state_dict(directory: str | Path, qs) -> dict[str, torch.Tensor]:
    """The full state dict of ``qs`` (keys as ``qs.state_dict()``) stored in a checkpoint
    ``directory``, tied weights filled in; for loading into a model that already exists."""
    directory = Path(directory)
    state = {MODEL_PREFIX + k: v for k, v in load_file(str(directory / MODEL_WEIGHTS)).items()}
    for key, source in _tied_keys(qs.model).items():
        state[MODEL_PREFIX + key] = state[MODEL_PREFIX + source]
    state.update(load_file(str(directory / QUIETSTAR_WEIGHTS)))
    return state


def _tied_keys(model) -> dict[str, str]:
    """``{key: key it shares storage with}`` of the model's tied parameters (the output
    embedding tied to the input one), which a checkpoint stores once."""
    names: dict[int, str] = {}
    tied = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in names:
            tied[name] = names[id(param)]
        else:
            names[id(param)] = name
    return tied


def _contiguous_cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def read_quietstar_config(directory: str | Path) -> QuietStarConfig:
    """The ``QuietStarConfig`` a checkpoint ``directory`` was saved with."""
    return QuietStarConfig.from_dict(json.loads((Path(directory) / QUIETSTAR_CONFIG).read_text()))


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
    qs = model_class(model, tokenizer, read_quietstar_config(directory))
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
