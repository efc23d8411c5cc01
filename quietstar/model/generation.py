"""Generation with thoughts (SPEC section 5).

For every new token of every row: append ``<|startthought|>`` after the text, sample ``T``
thought tokens, append ``<|endthought|>``, mix its hidden state with the text's last hidden
state through the mixing head, and draw the next token from the mixed prediction; then drop
the thought from the KV cache and append the token. Rows are left padded; the meta tokens
are never emitted (their logits are -inf).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from quietstar._checks import (
    INT_DTYPES,
    check_attention_mask,
    check_bool,
    check_int,
    check_temperature,
    check_tensor,
    check_token_ids,
)
from quietstar.model.attention import decoder_layers
from quietstar.model.backbone import layer_window, run_backbone
from quietstar.model.cache import KVCache
from quietstar.model.sampling import head_logits, mixed_log_probs, sample_tokens
from quietstar.ops.layout import TreeLayout, base_positions


@dataclass
class GenerationOutput:
    """``sequences [B, P + new]`` (prompt then generated tokens) and, when asked for,
    ``thoughts [B, new, T]``: the thought each generated token was predicted after."""

    sequences: torch.Tensor
    thoughts: torch.Tensor | None = None


class _TextState:
    """The text so far of a left-padded batch: which cached keys are real and their positions,
    and the decoder layers' sliding windows (None: full attention)."""

    def __init__(self, attention_mask: torch.Tensor, windows: set[int | None]) -> None:
        self.key_real = attention_mask.bool()
        self.key_pos = base_positions(attention_mask, *attention_mask.shape, attention_mask.device)
        self.last_pos = self.key_pos[:, -1]
        self.windows = windows

    def mask(self, n_chain: int, queries: int = 1) -> dict[int | None, torch.Tensor]:
        """``{window: [B, 1, queries, text + n_chain]}`` bool, for the last ``queries`` of
        ``n_chain`` tokens after the last text token (chain tokens; a query of chain count 0 is
        the last text token itself): each sees the real text keys (within the layer's window,
        counted from the last text token, as the tree rule does) and the chain up to itself."""
        counts = torch.arange(n_chain - queries + 1, n_chain + 1, device=self.key_real.device)
        chain = torch.arange(n_chain, device=self.key_real.device) < counts[:, None]  # [queries, n_chain]
        batch = self.key_real.shape[0]
        masks = {}
        for window in self.windows:
            visible = self.key_real
            if window is not None:
                visible = visible & (self.last_pos[:, None] - self.key_pos < window)
            masks[window] = torch.cat([visible[:, None].expand(-1, queries, -1), chain.expand(batch, -1, -1)], dim=2)[:, None]
        return masks

    def append(self) -> None:
        self.last_pos = self.last_pos + 1
        self.key_real = torch.cat([self.key_real, self.key_real.new_ones(self.key_real.shape[0], 1)], dim=1)
        self.key_pos = torch.cat([self.key_pos, self.last_pos[:, None]], dim=1)


def _draw(logits: torch.Tensor, do_sample: bool, generator: torch.Generator | None) -> torch.Tensor:
    """A sample from ``softmax(logits [B, V])`` (or its argmax): ``[B]``."""
    if not do_sample:
        return logits.argmax(-1)
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)[:, 0]


def _token_ids(name: str, ids: int | Sequence[int] | None, vocab: int, device: torch.device) -> torch.Tensor | None:
    """``ids`` (a token id or a non-empty sequence of them, each in ``[0, vocab)``) as an int64
    tensor, or None for None; else a ``ValueError`` naming ``name``."""
    if ids is None:
        return None
    listed = [ids] if isinstance(ids, numbers.Integral) else ids
    if (
        not isinstance(listed, Sequence)
        or isinstance(listed, str)
        or not listed
        or not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) and 0 <= i < vocab for i in listed)
    ):
        raise ValueError(f"{name} must be a token id in [0, {vocab}), a non-empty sequence of them, or None, got {ids!r}")
    return torch.tensor([int(i) for i in listed], dtype=torch.long, device=device)


def _step(qs, embeds, positions, cache, mask) -> torch.Tensor:
    """``embeds [B, n, d]`` at ``positions [B, n]`` through the cache, appended to it, each
    seeing what its layer's ``mask [B, 1, n, keys]`` lets it: ``[B, n, d]``."""
    return run_backbone(qs.model, embeds, positions, cache=cache, attention_mask=mask)


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
    eos_token_id: int | Sequence[int] | None = None,
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
        eos_token_id: a token id, or several (as Hugging Face generation configs list them):
            rows that produced one continue with ``pad_token_id``.
        return_thoughts: also return the thoughts.
        generator: random generator for all sampling.
    """
    check_tensor("input_ids", input_ids, ndim=2, dtypes=INT_DTYPES)
    check_int("max_new_tokens", max_new_tokens, minimum=0)
    for name, value in (("do_sample", do_sample), ("sample_thoughts", sample_thoughts), ("return_thoughts", return_thoughts)):
        check_bool(name, value)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    temperature = check_temperature("temperature", temperature)
    batch, prompt_len = input_ids.shape
    if batch == 0 or prompt_len == 0:
        raise ValueError(f"input_ids must be [B, P] prompts with B, P >= 1, got {tuple(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
    check_tensor("attention_mask", attention_mask, ndim=2, device=input_ids.device)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}")
    check_attention_mask(attention_mask)
    if not bool(attention_mask.bool()[:, -1].all()):
        raise ValueError("attention_mask: generate needs left padding (every row's last prompt token real)")

    cfg = qs.config
    weight, bias = qs.lm_head
    vocab = weight.shape[0]
    input_ids = check_token_ids("input_ids", input_ids, vocab)
    if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int) or not 0 <= pad_token_id < vocab:
        raise ValueError(f"pad_token_id must be a token id in [0, {vocab}), got {pad_token_id!r}")
    eos_ids = _token_ids("eos_token_id", eos_token_id, vocab, input_ids.device)
    text = _TextState(attention_mask, {layer_window(layer) for layer in decoder_layers(qs.model)})
    cache = KVCache(capacity=prompt_len + max_new_tokens + cfg.thought_tokens + 2)
    layout = TreeLayout(prompt_len, 1, text.key_real)
    h_last = run_backbone(qs.model, qs.embed(input_ids), text.key_pos, cache=cache, tree_layout=layout)[:, -1]
    finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    new_tokens, thoughts = [], []
    text_len = prompt_len
    two = torch.arange(2, device=input_ids.device)
    # One pass reads every weight whatever its few tokens, so tokens that are known together run
    # together: the last thought token with the end token, and each drawn token with the next
    # thought's start token (T + 1 passes per new token instead of T + 3).
    if max_new_tokens:
        start = qs.meta_embedding(0).expand(batch, 1, -1)
        hidden = _step(qs, start, text.last_pos[:, None] + 1, cache, text.mask(1))[:, -1]
    for index in range(max_new_tokens):
        # Think: T thought tokens after the start token, one token per row per step.
        thought = []
        for c in range(1, cfg.thought_tokens + 1):
            if c > 1:
                embeds = qs.embed(thought[-1])[:, None]
                hidden = _step(qs, embeds, text.last_pos[:, None] + c, cache, text.mask(c))[:, -1]
            thought.append(qs.sample(hidden, generator, greedy=not sample_thoughts))
        c = cfg.thought_tokens + 1
        ends = torch.stack([qs.embed(thought[-1]), qs.meta_embedding(1).expand(batch, -1)], dim=1)
        h_talk = _step(qs, ends, text.last_pos[:, None] + c + two, cache, text.mask(c + 1, queries=2))[:, -1]
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
            masked = qs.masked_vocab
            base, talk = (head_logits(h, weight, bias, masked) for h in (h_last, h_talk))
            logp = mixed_log_probs(base, talk, w, masked)
            token = _draw(logp / temperature, do_sample, generator)
        token = token.masked_fill(finished, pad_token_id)
        if eos_ids is not None:
            finished |= torch.isin(token, eos_ids)
        new_tokens.append(token)
        thoughts.append(torch.stack(thought, dim=-1))

        # Append the token to the text (its hidden state predicts the next one) with the next
        # thought's start token, if there is a next token.
        if index + 1 < max_new_tokens:
            text.append()
            text_len += 1
            pair = torch.stack([qs.embed(token), qs.meta_embedding(0).expand(batch, -1)], dim=1)
            h_last, hidden = _step(qs, pair, text.last_pos[:, None] + two, cache, text.mask(1, queries=2)).unbind(1)
    sequences = torch.cat([input_ids, *(t[:, None] for t in new_tokens)], dim=1)
    stacked = torch.stack(thoughts, dim=1) if thoughts else input_ids.new_zeros(batch, 0, cfg.thought_tokens)
    return GenerationOutput(sequences=sequences, thoughts=stacked if return_thoughts else None)
