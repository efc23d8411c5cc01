"""Generation with thoughts (SPEC section 5).

For every new token of every row: append ``<|startthought|>`` after the text, sample ``T``
thought tokens, append ``<|endthought|>``, mix its hidden state with the text's last hidden
state through the mixing head, and draw the next token from the mixed prediction; then drop
the thought from the KV cache and append the token. Rows are left padded; the meta tokens
are never emitted (their logits are -inf).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quietstar._checks import INT_DTYPES, check_int, check_positive_float, check_tensor
from quietstar.model.backbone import run_backbone
from quietstar.model.cache import KVCache
from quietstar.model.sampling import head_logits, sample_tokens
from quietstar.ops.layout import TreeLayout, base_positions


@dataclass
class GenerationOutput:
    """``sequences [B, P + new]`` (prompt then generated tokens) and, when asked for,
    ``thoughts [B, new, T]``: the thought each generated token was predicted after."""

    sequences: torch.Tensor
    thoughts: torch.Tensor | None = None


class _TextState:
    """The text so far of a left-padded batch: which cached keys are real and their positions."""

    def __init__(self, attention_mask: torch.Tensor) -> None:
        self.key_real = attention_mask.bool()
        self.key_pos = base_positions(attention_mask, *attention_mask.shape, attention_mask.device)
        self.last_pos = self.key_pos[:, -1]

    def mask(self, n_chain: int, window: int | None) -> torch.Tensor:
        """``[B, 1, 1, text + n_chain]`` bool: a query after the last text token (a thought
        token or the next token) sees the real text keys (within the window) and the chain."""
        visible = self.key_real
        if window is not None:
            visible = visible & (self.last_pos[:, None] - self.key_pos < window)
        chain = visible.new_ones(visible.shape[0], n_chain)
        return torch.cat([visible, chain], dim=1)[:, None, None, :]

    def append(self) -> None:
        self.last_pos = self.last_pos + 1
        self.key_real = torch.cat([self.key_real, self.key_real.new_ones(self.key_real.shape[0], 1)], dim=1)
        self.key_pos = torch.cat([self.key_pos, self.last_pos[:, None]], dim=1)


def _window(qs) -> int | None:
    return getattr(qs.model.config, "sliding_window", None) if getattr(qs.model.config, "use_sliding_window", True) else None


def _draw(logits: torch.Tensor, do_sample: bool, generator: torch.Generator | None) -> torch.Tensor:
    """A sample from ``softmax(logits [B, V])`` (or its argmax): ``[B]``."""
    if not do_sample:
        return logits.argmax(-1)
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)[:, 0]


def _step(qs, embeds, positions, cache, mask) -> torch.Tensor:
    """One token per row through the cache: ``[B, d] -> [B, d]``."""
    return run_backbone(qs.model, embeds[:, None], positions[:, None], cache=cache, attention_mask=mask)[:, 0]


@torch.no_grad()
def generate(
    qs,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int = 20,
    do_sample: bool = True,
    temperature: float = 1.0,
    sample_thoughts: bool = True,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
    return_thoughts: bool = False,
    generator: torch.Generator | None = None,
) -> GenerationOutput:
    """Generate ``max_new_tokens`` tokens per row, thinking before each one.

    Args:
        qs: the ``QuietStarModel``.
        input_ids: ``[B, P]`` prompts, left padded.
        attention_mask: ``[B, P]``, 1 for real tokens (padding on the left only).
        do_sample: draw the next token from the mixed distribution at ``temperature``
            (else greedy).
        sample_thoughts: draw thought tokens at the config's sampling temperature (else greedy).
        eos_token_id: rows that produced it continue with ``pad_token_id``.
        return_thoughts: also return the thoughts.
        generator: random generator for all sampling.
    """
    check_tensor("input_ids", input_ids, ndim=2, dtypes=INT_DTYPES)
    check_int("max_new_tokens", max_new_tokens, minimum=0)
    temperature = check_positive_float("temperature", temperature)
    batch, prompt_len = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
    check_tensor("attention_mask", attention_mask, ndim=2, device=input_ids.device)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}")
    if not bool(attention_mask.bool()[:, -1].all()):
        raise ValueError("attention_mask: generate needs left padding (every row's last prompt token real)")

    cfg = qs.config
    weight, bias = qs.lm_head
    vocab = weight.shape[0]
    if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int) or not 0 <= pad_token_id < vocab:
        raise ValueError(f"pad_token_id must be a token id in [0, {vocab}), got {pad_token_id!r}")
    window = _window(qs)
    text = _TextState(attention_mask)
    cache = KVCache(capacity=prompt_len + max_new_tokens + cfg.thought_tokens + 2)
    layout = TreeLayout(prompt_len, 1, text.key_real)
    h_last = run_backbone(qs.model, qs.embed(input_ids), text.key_pos, cache=cache, tree_layout=layout)[:, -1]
    finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    new_tokens, thoughts = [], []
    for index in range(max_new_tokens):
        text_len = cache.get_seq_length()
        # Think: start, T thought tokens, end; one token per row per step.
        embeds = qs.meta_embedding(0).expand(batch, -1)
        thought = []
        for c in range(1, cfg.thought_tokens + 1):
            hidden = _step(qs, embeds, text.last_pos + c, cache, text.mask(c, window))
            thought.append(qs.sample(hidden, generator, greedy=not sample_thoughts))
            embeds = qs.embed(thought[-1])
        c = cfg.thought_tokens + 1
        _step(qs, embeds, text.last_pos + c, cache, text.mask(c, window))  # the last thought token's keys
        h_talk = _step(qs, qs.meta_embedding(1).expand(batch, -1), text.last_pos + c + 1, cache, text.mask(c + 1, window))
        cache.truncate(text_len)

        # Talk: mix and draw the next token.
        w = qs.mixing_head(h_last, h_talk)
        if cfg.mix == "hidden":
            mixed = (1 - w[:, None]) * h_last + w[:, None] * h_talk
            token = sample_tokens(
                mixed, weight, bias, temperature=temperature, masked_vocab=qs.masked_vocab,
                greedy=not do_sample, generator=generator,
            )
        else:
            logp = (1 - w[:, None]) * torch.log_softmax(head_logits(h_last, weight, bias, qs.masked_vocab), -1)
            logp = logp + w[:, None] * torch.log_softmax(head_logits(h_talk, weight, bias, qs.masked_vocab), -1)
            token = _draw(logp / temperature, do_sample, generator)
        token = token.masked_fill(finished, pad_token_id)
        if eos_token_id is not None:
            finished |= token == eos_token_id
        new_tokens.append(token)
        thoughts.append(torch.stack(thought, dim=-1))

        # Append the token to the text (its hidden state predicts the next one, if any).
        if index + 1 < max_new_tokens:
            text.append()
            h_last = _step(qs, qs.embed(token), text.last_pos, cache, text.mask(0, window))
    sequences = torch.cat([input_ids, *(t[:, None] for t in new_tokens)], dim=1)
    stacked = torch.stack(thoughts, dim=1) if thoughts else input_ids.new_zeros(batch, 0, cfg.thought_tokens)
    return GenerationOutput(sequences=sequences, thoughts=stacked if return_thoughts else None)
