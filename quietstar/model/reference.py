"""The step-by-step dense reference: the authors' algorithm, written plainly.

This mirrors the paper's code (SPEC section 1): the batch is repeated once per thought,
then ``1 + C`` incremental passes run through a KV cache, each over ``L`` new tokens with
gradients kept. Step ``c`` attends through a dense ``[L, L * (1 + c)]`` mask (the causal
base block followed by one identity block per earlier step) with eager float32 softmax
attention (``tree_attention``'s ``reference`` backend, which builds exactly that mask from
the rule), and every step materialises full-vocabulary logits. Losses are computed step by
step from those logits.

It is the ground truth for ``QuietStarModel`` (same thoughts -> same losses and gradients)
and the baseline of the end-to-end benchmark. Its memory grows as ``L^2 C^2``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from quietstar.model.backbone import run_backbone
from quietstar.model.cache import KVCache
from quietstar.model.quietstar_model import QuietStarModel, QuietStarOutput
from quietstar.model.sampling import head_logits
from quietstar.ops.layout import TreeLayout, base_positions
from quietstar.ops.linear_cross_entropy import IGNORE_INDEX


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``-log softmax(logits)[target]``, 0 where ignored: ``[..., V], [...] -> [...]``."""
    valid = targets != IGNORE_INDEX
    picked = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return -picked * valid


@contextlib.contextmanager
def _cache_kept(model: torch.nn.Module) -> Iterator[None]:
    """transformers' gradient checkpointing (``gradient_checkpointing_enable``) drops the KV
    cache of a layer that trains with gradients on, so each step would see only its own tokens;
    it is switched off inside the block (the same mathematics, without the memory saving)."""
    checkpointed = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    for module in checkpointed:
        module.gradient_checkpointing = False
    try:
        yield
    finally:
        for module in checkpointed:
            module.gradient_checkpointing = True


def reference_forward(
    qs: QuietStarModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    thoughts: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> QuietStarOutput:
    """``QuietStarModel.forward``'s mathematics, step by step with dense masks and full logits.

    Arguments and result as ``QuietStarModel.forward``; the parameters are ``qs``'s own.
    """
    input_ids, attention_mask, labels, _ = qs._check_inputs(input_ids, attention_mask, labels)
    cfg = qs.config
    batch, length = input_ids.shape
    n, t_len, k_len = cfg.n_thoughts, cfg.thought_tokens, cfg.talk_tokens
    if thoughts is not None:
        thoughts = qs._check_thoughts(thoughts, batch, length)
    weight, bias = qs.lm_head

    def logits_of(hidden, temperature=1.0):
        return head_logits(hidden, weight, bias, qs.masked_vocab, temperature)

    # The paper's code runs one copy of the batch per thought.
    rows = batch * n
    ids = input_ids.repeat_interleave(n, dim=0)
    lab = labels.repeat_interleave(n, dim=0)
    mask = None if attention_mask is None else attention_mask.bool().repeat_interleave(n, dim=0)
    if mask is not None:  # padding is never a target, whatever the labels hold there
        lab = lab.masked_fill(~mask, IGNORE_INDEX)
    layout = TreeLayout(length, 1, mask, backend="reference")
    positions = base_positions(mask, rows, length, input_ids.device)
    cache = KVCache()

    def step(embeds, c):
        with _cache_kept(qs.model):
            return run_backbone(qs.model, embeds, positions + c, cache=cache, tree_layout=layout)

    # Shifted targets: target[k][r, i] = lab[r, i + 1 + k].
    pad = torch.full((rows, k_len + 1), IGNORE_INDEX, dtype=torch.long, device=ids.device)
    lab_ext = torch.cat([lab, pad], dim=1)
    target = [lab_ext[:, 1 + k : 1 + k + length] for k in range(k_len)]
    if mask is not None:  # a padding position predicts nothing (the last left pad: the first real token)
        target = [t.masked_fill(~mask, IGNORE_INDEX) for t in target]
    ids_ext = torch.cat([ids, torch.zeros_like(pad)], dim=1)

    # Step 0: the base text.
    h_base = step(qs.embed(ids), 0)
    nll_base_rows = _nll(logits_of(h_base), target[0])  # [rows, L]
    h_base_ext = torch.cat([h_base, h_base.new_zeros(rows, k_len, h_base.shape[-1])], dim=1)
    nll_base_ext = torch.cat([nll_base_rows, nll_base_rows.new_zeros(rows, k_len)], dim=1)

    # Steps 1..T: start, then one sampled thought token per step.
    sampled = []
    thought_logp = []
    embeds = qs.meta_embedding(0).expand(rows, length, -1)
    for t in range(t_len):
        hidden = step(embeds, 1 + t)
        if thoughts is None:
            with torch.no_grad():
                token = qs.sample(hidden, generator)
        else:
            token = thoughts[:, :, :, t].reshape(rows, length)
        sampled.append(token)
        thought_logp.append(-_nll(logits_of(hidden, cfg.policy_temperature), token))
        embeds = qs.embed(token)
    step(embeds, 1 + t_len)  # the last thought token: only its keys and values are used

    # Step T+2 ends the thought; steps T+3.. feed the true next tokens (teacher forcing).
    nll_talk, weights = [], []
    embeds = qs.meta_embedding(1).expand(rows, length, -1)
    for k in range(k_len):
        h_talk = step(embeds, 2 + t_len + k)
        h_shift = h_base_ext[:, k : k + length]
        w = qs.mixing_head(h_shift, h_talk)
        if cfg.mix == "hidden":
            mixed = (1 - w[..., None]) * h_shift + w[..., None] * h_talk
            nll = _nll(logits_of(mixed), target[k])
        else:
            logp_talk = -_nll(logits_of(h_talk), target[k])
            nll = -((1 - w) * -nll_base_ext[:, k : k + length] + w * logp_talk) * (target[k] != IGNORE_INDEX)
        nll_talk.append(nll)
        weights.append(w)
        embeds = qs.embed(ids_ext[:, 1 + k : 1 + k + length])

    # Losses, as the authors' code forms them.
    base_valid = target[0] != IGNORE_INDEX
    base_term = nll_base_rows.sum() / base_valid.sum().clamp(min=1)
    talk_means = [nll.sum() / (target[k] != IGNORE_INDEX).sum() for k, nll in enumerate(nll_talk) if (target[k] != IGNORE_INDEX).any()]
    talk_term = torch.stack(talk_means).mean() if talk_means else base_term * 0
    nll_loss = cfg.base_loss_weight * base_term + (1 - cfg.base_loss_weight) * talk_term

    reward = torch.zeros(rows, length, dtype=nll_base_rows.dtype, device=ids.device)
    for k in range(k_len):
        reward += ((nll_base_ext[:, k : k + length] - nll_talk[k]) * (target[k] != IGNORE_INDEX)).detach()
    reward = reward.view(batch, n, length)
    if n > 1:
        reward = reward - reward.mean(dim=1, keepdim=True)
    if cfg.clamp_negative_rewards:
        reward = reward.clamp(min=0)
    # The authors reinforce positions i <= L - 2 - K: the talk window and one token more are
    # real targets (on padded rows: not padding, not ignored).
    acting = torch.stack([lab_ext[:, 1 + k : 1 + k + length] != IGNORE_INDEX for k in range(k_len + 1)]).all(0)
    if mask is not None:
        acting = acting & mask
    reward_rows = reward.reshape(rows, length) * acting
    policy_sum = sum((-(reward_rows * logp)).sum() for logp in thought_logp)
    policy_loss = policy_sum / (acting.sum() * t_len).clamp(min=1)

    def per_thought(x):
        return x.reshape(batch, n, *x.shape[1:])

    return QuietStarOutput(
        loss=nll_loss + cfg.policy_weight * policy_loss,
        nll_loss=nll_loss,
        policy_loss=policy_loss,
        nll_base=nll_base_rows.view(batch, n, length)[:, 0],
        nll_talk=per_thought(torch.stack(nll_talk, dim=-1)),
        rewards=reward,
        mixing_weight=per_thought(torch.stack(weights, dim=-1)),
        thoughts=per_thought(torch.stack(sampled, dim=-1)),
    )
