"""Argument checks shared by the public entry points: every failure names the argument."""

from __future__ import annotations

from collections.abc import Sequence

import torch

HALF_DTYPES = (torch.float16, torch.bfloat16)
FLOAT_DTYPES = (*HALF_DTYPES, torch.float32, torch.float64)
INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
INT64_MIN, INT64_MAX = torch.iinfo(torch.int64).min, torch.iinfo(torch.int64).max


def check_tensor(
    name: str,
    value: object,
    *,
    ndim: int | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Raise ``ValueError`` unless ``value`` is a tensor of the given rank, dtype and device."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}")
    if dtypes is not None and value.dtype not in dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{name} must have dtype in ({allowed}), got {value.dtype}")
    if device is not None and value.device != device:
        raise ValueError(f"{name} must be on {device}, got {value.device}")
    return value


def check_int(name: str, value: object, *, minimum: int | None = None) -> int:
    """Raise ``ValueError`` unless ``value`` is an int (not bool), at least ``minimum`` if given,
    that fits in int64 (what torch and the native ops take: a larger one would overflow there,
    or compare as a different number in a tensor)."""
    bound = "" if minimum is None else f" >= {minimum}"
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        raise ValueError(f"{name} must be an int{bound}, got {value!r}")
    if not INT64_MIN <= value <= INT64_MAX:
        raise ValueError(f"{name} must fit in int64, got {value}")
    return value


# torch's random generators take seeds of 64 bits.
GENERATOR_SEED_MODULUS = 2**64


def check_seed(name: str, value: object) -> int:
    """Raise ``ValueError`` unless ``value`` is an int (not bool) a torch generator takes as its
    seed: ``0 <= value < 2**64``."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < GENERATOR_SEED_MODULUS:
        raise ValueError(f"{name} must be an int >= 0 and below 2**64 (a generator's seed), got {value!r}")
    return value


def check_positive_float(name: str, value: object) -> float:
    """Raise ``ValueError`` unless ``value`` is a finite number greater than zero."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


# The smallest temperature taken: logits up to 1e32 in magnitude divided by it stay finite in
# float32 (a temperature of 1e-45 made every NLL NaN), and a smaller one changes nothing useful,
# the distribution being its argmax's for any logit gap of 1e-4 or more.
MIN_TEMPERATURE = 1e-6


def check_temperature(name: str, value: object) -> float:
    """Raise ``ValueError`` unless ``value`` is a finite number of at least ``MIN_TEMPERATURE``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not MIN_TEMPERATURE <= value < float("inf"):
        raise ValueError(f"{name} must be a finite number >= {MIN_TEMPERATURE:g}, got {value}")
    return value


def check_bool(name: str, value: object) -> bool:
    """Raise ``ValueError`` unless ``value`` is a bool (a string such as ``"no"`` would be true)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def check_attention_mask(mask: torch.Tensor) -> torch.Tensor:
    """Raise ``ValueError`` unless ``mask`` holds only 0 and 1 (or is bool): a value such as 0.5
    would be padding where it is cast to int and a real token where it is cast to bool."""
    if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (real tokens), or be bool")
    return mask


def check_token_ids(name: str, ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """Raise ``ValueError`` unless every id of ``ids`` (an integer tensor) is in ``[0, vocab)``;
    returns them as int64 (the embedding takes int64 or int32 ids only)."""
    if bool(((ids < 0) | (ids >= vocab)).any()):
        raise ValueError(f"{name} must be token ids in [0, {vocab})")
    return ids.long()
