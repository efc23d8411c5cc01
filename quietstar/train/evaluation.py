"""Does thinking help? Held-out perplexity by difficulty and the paper's zero-shot scores.

``perplexity``: per-token NLL of the next token, without a thought (the base model) and with one
(the mixed prediction after a thought at that position, as generation makes it), overall and
by decile of the base NLL. One pass per batch: the KV cache that samples the thoughts carries
on to the end token (``QuietStarModel.next_token_states``), ``1 + T + 2`` slots of work.

``answer_scores``: the authors' zero-shot scoring of GSM8K and CommonsenseQA. An item's score is
the product, over the gold answer's tokens, of the gold token's probability renormalised over
the answer vocabulary (the tokens the task's answers use); the task's score is the mean.

Both think with one thought per position (``N = 1``) and report the same numbers with thinking
off in the same run. ``docs/evaluation.md`` gives each protocol.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from quietstar._checks import INT_DTYPES, check_int, check_seed, check_temperature, check_tensor
from quietstar.model.quietstar_model import QuietStarModel
from quietstar.model.sampling import head_logits, mixed_log_probs
from quietstar.ops.linear_cross_entropy import IGNORE_INDEX
from quietstar.ops.linear_cross_entropy_torch import reusing_scratch
from quietstar.train.eval_data import AnswerItem

logger = logging.getLogger(__name__)

DECILES = 10
DEFAULT_THOUGHT_TEMPERATURE = 0.1  # a near-greedy thought


@dataclass
class EvalOptions:
    """How an evaluation runs.

    Attributes:
        thought_tokens: thought length (None: the model's).
        temperature: sampling temperature of the thought tokens.
        batch_size: sequences per forward.
        limit: score at most this many items (a seeded subset; None: all).
        seed: seed of the subset and of the thought sampling.
        seq_len: tokens per window (perplexity).
    """

    thought_tokens: int | None = None
    temperature: float = DEFAULT_THOUGHT_TEMPERATURE
    batch_size: int = 8
    limit: int | None = None
    seed: int = 0
    seq_len: int = 256

    def __post_init__(self) -> None:
        if self.thought_tokens is not None:
            check_int("thought_tokens", self.thought_tokens, minimum=1)
        check_temperature("temperature", self.temperature)
        check_int("batch_size", self.batch_size, minimum=1)
        if self.limit is not None:
            check_int("limit", self.limit, minimum=1)
        check_seed("seed", self.seed)
        check_int("seq_len", self.seq_len, minimum=2)


@contextlib.contextmanager
def thinking(qs: QuietStarModel, options: EvalOptions) -> Iterator[QuietStarModel]:
    """``qs`` set, for the block, to think once per position with the evaluation's thought
    length and temperature, rewards unclamped (the raw gain of the thought), in eval mode; its
    config and each module's train/eval mode are restored on exit, so a later call (or
    training) sees the model as it was."""
    changes = dict(n_thoughts=1, sampling_temperature=options.temperature, clamp_negative_rewards=False)
    if options.thought_tokens is not None:
        changes["thought_tokens"] = options.thought_tokens
    config, modes = qs.config, {module: module.training for module in qs.modules()}  # a loaded base model is in eval mode
    qs.config = dataclasses.replace(config, **changes)
    qs.eval()
    try:
        yield qs
    finally:
        qs.config = config
        for module, training in modes.items():
            module.training = training


def seeded_subset(count: int, limit: int | None, seed: int) -> list[int]:
    """Indices of ``limit`` of ``count`` items drawn with ``seed`` (in their original order), or
    all of them."""
    if limit is None or limit >= count:
        return list(range(count))
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))[:limit]
    return sorted(order.tolist())


def _pad(rows: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``[B, L]`` ids (0 in the padding) and their attention mask."""
    length = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = True
    return ids.to(device), mask.to(device)


def _device(qs: QuietStarModel) -> torch.device:
    return qs.meta_embeddings.device


# --- perplexity -------------------------------------------------------------------------


def windows_of(documents: list[torch.Tensor], seq_len: int) -> list[list[int]]:
    """Every document (token ids ``[n_i]``, an integer tensor) cut into consecutive windows of
    ``seq_len`` tokens (a last shorter one kept if it has a next token to predict).

    Raises:
        ValueError: a document that is not a 1-D integer tensor, naming it (``documents[i]``).
    """
    windows = []
    for i, doc in enumerate(documents):
        check_tensor(f"documents[{i}]", doc, ndim=1, dtypes=INT_DTYPES)
        ids = doc.tolist()
        windows.extend(ids[s : s + seq_len] for s in range(0, len(ids), seq_len) if len(ids[s : s + seq_len]) >= 2)
    return windows


@reusing_scratch()  # the two head calls share their CPU scratch
def next_token_nll(
    qs: QuietStarModel, ids: torch.Tensor, mask: torch.Tensor, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``-log p(x[i+1])`` ``[B, L-1]`` from the base state and from the thinking prediction
    (the mixed prediction after a thought at ``i``, as generation makes it) of right-padded
    ``ids [B, L]``; positions whose next token is padding hold 0."""
    h_base, h_talk, w, _ = qs.next_token_states(ids, mask, generator)
    targets = ids[:, 1:].masked_fill(~mask[:, 1:], IGNORE_INDEX)
    h_base, h_talk, w = h_base[:, :-1], h_talk[:, 0, :-1], w[:, 0, :-1]
    nll_base = qs.head_nll(h_base, targets)
    if qs.config.mix == "hidden":
        return nll_base, qs.head_nll(h_talk, targets, mix=(h_base, w))
    return nll_base, (1 - w) * nll_base + w * qs.head_nll(h_talk, targets)


def _quantiles(values: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``torch.quantile(values, q)`` (linear interpolation) from one sort, for any number of
    values: ``torch.quantile`` refuses more than 2**24 (a corpus of about 17M tokens)."""
    ordered = values.flatten().sort().values
    position = q.to(ordered.dtype) * (ordered.numel() - 1)
    low, high = position.floor().long(), position.ceil().long()
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def decile_table(nll_base: torch.Tensor, nll_thinking: torch.Tensor) -> list[dict]:
    """Ten rows, tokens grouped by decile of ``nll_base`` (the last row: the hardest tenth):
    the range, token count, mean NLLs, their difference (positive: thinking helped) and the
    fraction of tokens where thinking lowered the NLL."""
    edges = _quantiles(nll_base.double(), torch.linspace(0, 1, DECILES + 1, dtype=torch.float64))
    bucket = torch.bucketize(nll_base.double(), edges[1:-1], right=True)
    rows = []
    for d in range(DECILES):
        chosen = bucket == d
        base, thinking = nll_base[chosen].double(), nll_thinking[chosen].double()
        count = int(chosen.sum())
        rows.append({
            "decile": d + 1,
            "base_nll_from": float(edges[d]),
            "base_nll_to": float(edges[d + 1]),
            "tokens": count,
            "nll_base": float(base.mean()) if count else None,
            "nll_thinking": float(thinking.mean()) if count else None,
            "gain": float((base - thinking).mean()) if count else None,
            "helped_fraction": float((thinking < base).double().mean()) if count else None,
        })
    return rows


@torch.no_grad()
def perplexity(qs: QuietStarModel, documents: list[torch.Tensor], options: EvalOptions, progress: bool = True) -> dict:
    """Next-token NLL with and without thinking over ``documents`` (token ids ``[n_i]``), cut
    into windows of ``options.seq_len`` tokens.

    Returns:
        the report: ``task``, ``items`` (windows), ``tokens``, ``score_base`` and
        ``score_thinking`` (mean NLLs, nats), their perplexities, ``helped_fraction`` and
        ``by_decile`` (``decile_table``).
    """
    with thinking(qs, options):
        windows = windows_of(documents, options.seq_len)
        if not windows:
            raise ValueError("data: no window of at least two tokens to score")
        windows = [windows[i] for i in seeded_subset(len(windows), options.limit, options.seed)]
        device = _device(qs)
        generator = torch.Generator(device).manual_seed(options.seed)
        base_parts, thinking_parts = [], []
        start = time.perf_counter()
        batches = range(0, len(windows), options.batch_size)
        for first in tqdm(batches, desc="perplexity", unit="batch", disable=not progress):
            ids, mask = _pad(windows[first : first + options.batch_size], device)
            nll_base, nll_thinking = next_token_nll(qs, ids, mask, generator)
            scored = mask[:, 1:]  # position i is scored when x[i+1] is real
            base_parts.append(nll_base[scored].float().cpu())
            thinking_parts.append(nll_thinking[scored].float().cpu())
        seconds = time.perf_counter() - start
        nll_base, nll_thinking = torch.cat(base_parts), torch.cat(thinking_parts)
        return {
            "task": "perplexity",
            "items": len(windows),
            "tokens": int(nll_base.numel()),
            "score_base": float(nll_base.double().mean()),
            "score_thinking": float(nll_thinking.double().mean()),
            "perplexity_base": math.exp(float(nll_base.double().mean())),
            "perplexity_thinking": math.exp(float(nll_thinking.double().mean())),
            "helped_fraction": float((nll_thinking < nll_base).double().mean()),
            "by_decile": decile_table(nll_base, nll_thinking),
            "seconds": seconds,
            "tokens_per_s": sum(len(w) for w in windows) / seconds,
            "seq_len": options.seq_len,
            **_settings(qs, options),
        }


def _settings(qs: QuietStarModel, options: EvalOptions) -> dict:
    """The options a report was made with."""
    return {"thought_tokens": qs.config.thought_tokens, "temperature": options.temperature, "seed": options.seed,
            "limit": options.limit, "batch_size": options.batch_size}


# --- zero-shot answers -----------------------------------------------------------------


@dataclass
class TokenizedItem:
    """An item's token ids (prompt and answer) and the indices of its answer tokens."""

    ids: list[int]
    answer_positions: list[int]


def tokenize_item(tokenizer, item: AnswerItem) -> TokenizedItem:
    """Token ids of ``item.prompt + item.answer`` and which of them are the answer's: the
    tokens that overlap the answer's characters after its leading space. A token that is only
    that space (as the authors' tokenizer makes it) is not scored; a token that joins the space
    to the answer (as byte-level BPE tokenizers do) is.

    Raises:
        ValueError: a tokenizer without offsets (a slow tokenizer), or an answer that starts
            the text (nothing to predict it from).
    """
    text = item.prompt + item.answer
    try:
        encoded = tokenizer(text, return_offsets_mapping=True)
    except NotImplementedError:
        raise ValueError("model: its tokenizer gives no character offsets (use a fast tokenizer)") from None
    answer_from = len(item.prompt) + 1  # after the space
    positions = [j for j, (_, end) in enumerate(encoded["offset_mapping"]) if end > answer_from]
    if not positions or positions[0] == 0:
        raise ValueError(f"{item.origin}: the answer has no token after the prompt to score")
    return TokenizedItem(list(encoded["input_ids"]), positions)


def answer_vocabulary(items: list[TokenizedItem]) -> torch.Tensor:
    """Sorted token ids that the items' answers use: the vocabulary the scores renormalise
    over (for GSM8K with a digit-by-digit tokenizer: the digits and the newline)."""
    return torch.tensor(sorted({item.ids[j] for item in items for j in item.answer_positions}))


def renormalised_log_probs(logits: torch.Tensor, vocabulary: torch.Tensor) -> torch.Tensor:
    """``log p(s | s in S)`` ``[R, |S|]``: the log-softmax of ``logits [R, V]`` (or of
    unnormalised log-probabilities) restricted to the columns ``vocabulary`` (S)."""
    return torch.log_softmax(logits[:, vocabulary.to(logits.device)], dim=-1)


def _answer_logits(qs: QuietStarModel, h_base: torch.Tensor, h_talk: torch.Tensor, w: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-vocabulary logits (or log-probabilities) ``[R, V]`` of the rows' base states
    ``[R, d]`` and of their thinking prediction (talk states ``[R, d]`` mixed with weight
    ``w [R]``, as generation mixes them)."""
    weight, bias = qs.lm_head
    masked = qs.masked_vocab
    base = head_logits(h_base, weight, bias, masked)
    if qs.config.mix == "hidden":
        return base, head_logits((1 - w[:, None]) * h_base + w[:, None] * h_talk, weight, bias, masked)
    return base, mixed_log_probs(base, head_logits(h_talk, weight, bias, masked), w, masked)


@torch.no_grad()
def answer_scores(qs: QuietStarModel, task: str, items: list[AnswerItem], options: EvalOptions,
                  progress: bool = True) -> dict:
    """The authors' zero-shot score of ``items``, with and without thinking.

    Returns:
        the report: ``task``, ``items``, ``score_base`` and ``score_thinking`` (mean over items
        of the product of the renormalised gold-token probabilities), ``exact_base`` and
        ``exact_thinking`` (the share of items whose every gold token is the most likely one
        in the answer vocabulary), ``answer_vocabulary`` (its size) and per-item scores.
    """
    if not items:
        raise ValueError("data: no items to score")
    if qs.tokenizer is None:
        raise ValueError("model: it has no tokenizer to read the questions")
    with thinking(qs, options):
        tokenized = [tokenize_item(qs.tokenizer, item) for item in items]
        vocabulary = answer_vocabulary(tokenized)  # from every item given, whatever the subset
        chosen = seeded_subset(len(items), options.limit, options.seed)
        device = _device(qs)
        generator = torch.Generator(device).manual_seed(options.seed)
        per_item = []
        start = time.perf_counter()
        for first in tqdm(range(0, len(chosen), options.batch_size), desc=task, unit="batch", disable=not progress):
            batch = [tokenized[i] for i in chosen[first : first + options.batch_size]]
            ids, mask = _pad([t.ids for t in batch], device)
            h_base, h_talk, w, _ = qs.next_token_states(ids, mask, generator)
            rows = torch.tensor([b for b, t in enumerate(batch) for _ in t.answer_positions], device=device)
            cols = torch.tensor([j - 1 for t in batch for j in t.answer_positions], device=device)  # predicted from j-1
            gold = torch.tensor([t.ids[j] for t in batch for j in t.answer_positions])
            gold_column = torch.searchsorted(vocabulary, gold).to(device)
            logits = _answer_logits(qs, h_base[rows, cols], h_talk[rows, 0, cols], w[rows, 0, cols])
            logp_base, logp_thinking = (renormalised_log_probs(x, vocabulary) for x in logits)
            offset = 0
            for b, t in enumerate(batch):
                n = len(t.answer_positions)
                span = slice(offset, offset + n)
                offset += n
                record = {"origin": items[chosen[first + b]].origin}
                for name, logp in (("base", logp_base[span]), ("thinking", logp_thinking[span])):
                    gold_logp = logp.gather(1, gold_column[span, None])[:, 0]
                    record[f"score_{name}"] = float(gold_logp.double().sum().exp())
                    record[f"exact_{name}"] = bool((logp.argmax(-1) == gold_column[span]).all())
                per_item.append(record)
        seconds = time.perf_counter() - start

        def mean(key: str) -> float:
            return sum(float(r[key]) for r in per_item) / len(per_item)

        return {
            "task": task,
            "items": len(per_item),
            "items_in_data": len(items),
            "score_base": mean("score_base"),
            "score_thinking": mean("score_thinking"),
            "exact_base": mean("exact_base"),
            "exact_thinking": mean("exact_thinking"),
            "answer_vocabulary": len(vocabulary),
            "seconds": seconds,
            **_settings(qs, options),
            "per_item": per_item,
        }
