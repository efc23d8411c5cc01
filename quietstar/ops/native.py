"""The native CPU kernels (``quietstar._C``, built from ``csrc/`` by ``CMakeLists.txt`` during
``pip install``): whether they are here, and why not when they are not.

Loading the extension registers its custom ops under ``torch.ops.quietstar``. It is optional:
a build that failed, a source checkout never built, or ``QUIETSTAR_NO_NATIVE=1`` leaves the
``torch`` backend in charge, and the first caller logs why (once).
"""

from __future__ import annotations

import functools
import importlib
import logging
import os

logger = logging.getLogger(__name__)

NO_NATIVE_ENV_VAR = "QUIETSTAR_NO_NATIVE"


@functools.lru_cache(maxsize=None)
def native_unavailable() -> str | None:
    """Why the native kernels cannot run here, or None when they are loaded."""
    if os.environ.get(NO_NATIVE_ENV_VAR) == "1":
        reason = f"{NO_NATIVE_ENV_VAR}=1"
    else:
        try:
            importlib.import_module("quietstar._C")
            _register_fakes()
            return None
        except ImportError as error:
            reason = f"the extension quietstar._C is not built ({error}); reinstall with `pip install -e .`"
    logger.info("native CPU kernels unavailable: %s", reason)
    return reason


def _register_fakes() -> None:
    """The custom ops without running them, for meta-device runs (shape only). The tree
    attention ops work in place on tensors they are given, as their schemas declare
    (``Tensor(a!)``), so their fakes return nothing; ``torch.compile`` traces them as those
    in-place updates. The elementwise ops return new tensors of the shapes below."""
    import torch

    @torch.library.register_fake("quietstar::tree_attention_trunk_forward_")
    def _trunk_forward(q, k, v, out, lse, key_padding_mask, sliding_window, slot_len, scale, bf16_products):
        return None  # writes out and lse

    @torch.library.register_fake("quietstar::tree_attention_trunk_backward_")
    def _trunk_backward(
        grad_out, q, k, v, out, lse, grad_q, grad_k, grad_v, key_padding_mask, sliding_window, slot_len, scale, bf16_products
    ):
        return None  # writes grad_q, adds into grad_k and grad_v

    @torch.library.register_fake("quietstar::tree_attention_chain_forward_")
    def _forward(q, k, v, out, lse, slot_len, n_thoughts, scale):
        return None  # in place on out and lse

    @torch.library.register_fake("quietstar::tree_attention_chain_backward_")
    def _backward(grad_out, q, k, v, out, lse, grad_q, grad_k, grad_v, slot_len, n_thoughts, scale):
        return None  # in place on grad_q, grad_k and grad_v

    @torch.library.register_fake("quietstar::rms_norm_forward")
    def _rms_norm_forward(x, weight, eps, out_dtype):
        return torch.empty_like(x, dtype=out_dtype), x.new_empty(x.numel() // max(x.shape[-1], 1))  # out, rstd per row

    @torch.library.register_fake("quietstar::rms_norm_backward")
    def _rms_norm_backward(grad, x, weight, rstd):
        return torch.empty_like(x), torch.empty_like(weight)

    @torch.library.register_fake("quietstar::swiglu_forward")
    def _swiglu_forward(gate, up):
        return torch.empty_like(gate)

    @torch.library.register_fake("quietstar::swiglu_backward")
    def _swiglu_backward(grad, gate, up):
        return torch.empty_like(gate), torch.empty_like(up)

    @torch.library.register_fake("quietstar::rotary_embedding_forward")
    def _rotary_forward(x, cos, sin):
        batch, length, heads, dim = x.shape
        return x.new_empty((batch, heads, length, dim), dtype=torch.float32)

    @torch.library.register_fake("quietstar::head_logsumexp")
    def _head_logsumexp(scores):
        return scores.new_empty(scores.shape[1])

    @torch.library.register_fake("quietstar::head_softmax_gradient_")
    def _head_softmax_gradient(scores, targets, scale, multiplier=1.0):
        # the float32 log-sum-exps; the scores change in place
        return scores.new_empty(scores.shape[1], dtype=torch.float32)

    @torch.library.register_fake("quietstar::head_exp_block_sums_")
    def _head_exp_block_sums(scores, block):
        return scores.new_empty((-(-scores.shape[0] // block), scores.shape[1]))  # the scores change in place

    @torch.library.register_fake("quietstar::rotary_embedding_backward")
    def _rotary_backward(grad, cos, sin, x_dtype):
        batch, heads, length, dim = grad.shape
        return grad.new_empty((batch, length, heads, dim), dtype=x_dtype)


@functools.lru_cache(maxsize=None)
def native_bf16_products() -> bool:
    """Whether the native kernels can multiply bfloat16 with this CPU's AVX-512 BF16
    dot-product instructions (the extension checks the CPU's flags)."""
    import torch

    return native_available() and bool(torch.ops.quietstar.cpu_has_avx512_bf16())


def native_available() -> bool:
    """Whether ``torch.ops.quietstar``'s native CPU kernels are loaded."""
    return native_unavailable() is None


def require_native() -> None:
    """Load the native kernels, or raise ``ValueError`` saying why they are not here."""
    reason = native_unavailable()
    if reason is not None:
        raise ValueError(f"backend='native' is unavailable: {reason}")
