"""Sampling tokens from hidden states without holding ``[N, V]`` logits for all rows."""

from __future__ import annotations

import torch

from quietstar.ops.head_softmax import exp_block_sums_
from quietstar.ops.onednn_linear import onednn_linear

# Float32 logits scored at a time on the CPU: 64 MiB, whatever the vocabulary (rows = this // V).
SAMPLE_CHUNK_ELEMENTS = 16 * 2**20
# On a GPU, the share of its memory that one chunk's float32 logits may take: 2.5 GiB on an
# 80 GiB H100, where the 1B bench step's draws (4,096 rows, V=128,256) then run as one chunk
# and its sampling pass took 313 ms against 488 ms in 130-row chunks (bench/results/gpu-h100.md).
GPU_SAMPLE_CHUNK_MEMORY_SHARE = 1 / 32
# Vocabulary entries whose weights are summed in float32 before their blocks' sums go float64.
CDF_BLOCK = 256


def head_logits(
    hidden: torch.Tensor,
    lm_weight: torch.Tensor,
    lm_bias: torch.Tensor | None,
    masked_vocab: torch.Tensor | None,
    temperature: float = 1.0,
    *,
    vocab_major: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Float32 logits ``[N, V]`` (float64 for float64 inputs) of ``hidden [N, d]`` divided by
    ``temperature``, masked ids -inf; with ``vocab_major``, transposed: ``[V, N]`` from the
    product ``W h^T``, which with the vocabulary as its long side runs about 1.3x faster on CPU
    than ``h W^T`` for a few hundred rows. With ``out`` (the result's shape, any strides, the
    result's dtype or a half one, which then holds the logits rounded to it), the logits are
    also written there; the result is then ``out`` itself where a half-precision product was
    converted straight into it, else a fresh tensor. The bias, temperature and mask are applied
    in place: one pass fewer over the ``N x V`` logits each."""
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    # ``linear`` hands autocast the weight itself (a leaf), whose cast autocast then caches for
    # the rest of its region; a transposed view would be cast again at every call.
    if vocab_major:  # float32 on the CPU through oneDNN (onednn_linear), 1.2-1.4x MKL's product here
        product, vocab_axis = onednn_linear(lm_weight, hidden), 0
    else:
        product, vocab_axis = torch.nn.functional.linear(hidden, lm_weight), -1
    # The product is a fresh tensor, ours to change in place. A half-precision one is converted
    # straight into a float32 out; else the logits are finished first, then copied into out
    # (the product, contiguous, is the result).
    convert_into_out = out is not None and product.dtype != dtype and out.dtype == dtype
    logits = out.copy_(product) if convert_into_out else product.to(dtype)
    if lm_bias is not None:
        logits += lm_bias.to(dtype)[:, None] if vocab_major else lm_bias.to(dtype)
    if temperature != 1.0:
        logits /= temperature
    if masked_vocab is not None and masked_vocab.numel():
        logits.index_fill_(vocab_axis, masked_vocab, float("-inf"))
    if out is not None and not convert_into_out:
        out.copy_(logits)
    return logits


def mixed_log_probs(
    base_logits: torch.Tensor, talk_logits: torch.Tensor, w: torch.Tensor, masked_vocab: torch.Tensor
) -> torch.Tensor:
    """The paper's mixed prediction (``mix="logprobs"``), ``(1 - w) log_softmax(base) + w
    log_softmax(talk)``: ``[R, V]`` from logits ``[R, V]`` (masked ids -inf) and weights ``w
    [R]``. Masked ids stay -inf: where ``w`` is exactly 0 or 1 (its sigmoid saturates, in
    bfloat16 from a mixing logit of about 6) one term would be ``0 * -inf``, NaN, which
    ``argmax`` picks, so greedy decoding would emit a thought marker."""
    logp = (1 - w[:, None]) * torch.log_softmax(base_logits, -1) + w[:, None] * torch.log_softmax(talk_logits, -1)
    if masked_vocab.numel():
        logp.index_fill_(-1, masked_vocab, float("-inf"))
    return logp


def draw_by_inverse_cdf(
    logits: torch.Tensor, generator: torch.Generator | None = None, *, overwrite: bool = False
) -> torch.Tensor:
    """One sample per column of ``logits [V, N]`` from ``softmax`` over ``V``: ``[N]`` int64.

    Inverse-CDF sampling with one uniform number per column (Gumbel-max needs ``V``): the
    weights ``exp(logit - max)`` are summed in float32 within blocks of ``CDF_BLOCK`` entries
    (``exp_block_sums_``), the block sums run in float64 to pick the block, and only the picked
    block's running sum is taken to pick the entry; so a token's share is resolved to float32
    precision of its block's sum, not of the whole vocabulary's. An entry of weight 0 (a masked
    id) is never drawn: the draw is clamped below its block's and the column's total. With
    ``overwrite``, the weights take the place of ``logits`` (no copy).
    """
    vocab, columns = logits.shape
    weights = logits if overwrite else logits.clone()
    block_cdf = exp_block_sums_(weights, CDF_BLOCK).double().cumsum(0).t().contiguous()  # [N, blocks]
    total = block_cdf[:, -1:]
    zero = total.new_zeros(())
    target = torch.rand(columns, 1, generator=generator, dtype=torch.float64, device=logits.device) * total
    target = torch.minimum(target, total.nextafter(zero))
    # The first block whose running sum exceeds the target (clamped, for non-finite logits).
    block = torch.searchsorted(block_cdf, target, right=True).clamp_(max=block_cdf.shape[1] - 1)
    before = torch.where(block > 0, block_cdf.gather(1, (block - 1).clamp(min=0)), zero)
    entries = block * CDF_BLOCK + torch.arange(CDF_BLOCK, device=logits.device)  # [N, CDF_BLOCK]
    inside = weights.gather(0, entries.clamp(max=vocab - 1).t()).t()  # the picked block's weights
    inside = inside.masked_fill_(entries >= vocab, 0.0).cumsum(1)  # past the vocabulary: weight 0
    rest = (target - before).to(inside.dtype)
    rest = torch.minimum(rest, inside[:, -1:].nextafter(inside.new_zeros(()))).clamp_(min=0)
    offset = torch.searchsorted(inside, rest, right=True).clamp_(max=CDF_BLOCK - 1)
    # Clamped into the vocabulary: a column of NaN or +inf logits (a diverged model, which its
    # loss reports) must still give a token id, as Gumbel-max's argmax did.
    return (block * CDF_BLOCK + offset)[:, 0].clamp_(max=vocab - 1)


def sample_chunk_rows(vocab_size: int, device: torch.device) -> int:
    """Rows whose logits ``sample_tokens`` scores at a time: ``SAMPLE_CHUNK_ELEMENTS`` logits on
    the CPU; on a GPU, ``GPU_SAMPLE_CHUNK_MEMORY_SHARE`` of its memory in float32 logits (larger
    products and fewer launches of the draw's elementwise kernels)."""
    if device.type == "cuda":
        memory = torch.cuda.get_device_properties(device).total_memory
        elements = int(memory * GPU_SAMPLE_CHUNK_MEMORY_SHARE) // torch.float32.itemsize
    else:
        elements = SAMPLE_CHUNK_ELEMENTS
    return max(1, elements // vocab_size)


@torch.no_grad()
def sample_tokens(
    hidden: torch.Tensor,
    lm_weight: torch.Tensor,
    lm_bias: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    masked_vocab: torch.Tensor | None = None,
    greedy: bool = False,
    generator: torch.Generator | None = None,
    logits_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One token per row of ``hidden [..., d]``: a sample from ``softmax(logits / temperature)``
    (``draw_by_inverse_cdf``: the distribution of the hard Gumbel-softmax, from one uniform
    number per row) or the argmax; masked ids are never drawn. With ``logits_out`` (``[V,
    rows]``, vocabulary-major), the logits divided by ``temperature`` (``head_logits``) are
    also written there.

    Returns:
        ``[...]`` int64.
    """
    flat = hidden.reshape(-1, hidden.shape[-1])
    out = torch.empty(flat.shape[0], dtype=torch.long, device=hidden.device)
    chunk = sample_chunk_rows(lm_weight.shape[0], hidden.device)
    for start in range(0, flat.shape[0], chunk):
        rows = flat[start : start + chunk]
        into = None if logits_out is None else logits_out[:, start : start + chunk]
        logits = head_logits(rows, lm_weight, lm_bias, masked_vocab, temperature, vocab_major=True, out=into)
        # The logits are ours to overwrite unless they are what was written into logits_out.
        draw = logits.argmax(0) if greedy else draw_by_inverse_cdf(logits, generator, overwrite=logits is not into)
        out[start : start + chunk] = draw
    return out.view(hidden.shape[:-1])
