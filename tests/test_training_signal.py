"""The training signal written out from SPEC section 3 by hand, independently of
``quietstar/model.py`` and ``quietstar/reference.py``: every (position, thought) is one plain
causal sequence through the Hugging Face model (the text up to the position, then its own
chain), and the losses are formed from those sequences term by term. The fast step and the
step-by-step reference must both equal it."""

from __future__ import annotations

import pytest
import torch
from helpers import quietstar_model, relative_error

from quietstar.model.quietstar_model import policy_positions
from quietstar.model.reference import reference_forward

LENGTH, TALK, THOUGHTS_TOKENS = 6, 2, 1


def nll_of(qs, hidden, target, temperature=1.0):
    """``-log softmax(lm_head(hidden) / T)[target]`` for one hidden state ``[d]``."""
    weight, _ = qs.lm_head
    return -torch.log_softmax(weight @ hidden / temperature, dim=-1)[target]


def final_hidden(qs, embeds, positions):
    """The decoder's final (normed) hidden states of one plain causal sequence ``[T, d]``."""
    return qs.model.model(inputs_embeds=embeds[None], position_ids=positions[None]).last_hidden_state[0]


def spec_losses(qs, ids, thoughts):
    """``(loss, nll_loss, policy_loss)`` of SPEC section 3 for unpadded ``ids [B, L]`` and
    ``thoughts [B, N, L, T]``, one plain forward per base row and per (row, thought, position)."""
    cfg = qs.config
    batch, n_thoughts = ids.shape[0], thoughts.shape[1]
    t_len, k_len = cfg.thought_tokens, cfg.talk_tokens
    embed = qs.model.get_input_embeddings()
    start, end = qs.meta_embedding(0), qs.meta_embedding(1)
    base_terms, talk_terms = [], {k: [] for k in range(k_len)}
    policy_terms, rewards = [], {}
    for b in range(batch):
        x = ids[b]
        h_base = final_hidden(qs, embed(x), torch.arange(LENGTH))
        nll_base = {i: nll_of(qs, h_base[i], x[i + 1]) for i in range(LENGTH - 1)}
        base_terms += list(nll_base.values())
        for n in range(n_thoughts):
            for i in range(LENGTH):
                c = thoughts[b, n, i]
                talk_inputs = [x[j] if j < LENGTH else torch.tensor(0) for j in range(i + 1, i + k_len)]
                chain = torch.stack([start, *embed(c), end, *(embed(t) for t in talk_inputs)])
                sequence = torch.cat([embed(x[: i + 1]), chain])
                h = final_hidden(qs, sequence, torch.arange(sequence.shape[0]))  # step s at index i + s
                log_p = [-nll_of(qs, h[i + t], c[t - 1], cfg.policy_temperature) for t in range(1, t_len + 1)]
                gain = 0.0
                for k in range(k_len):
                    if i + 1 + k >= LENGTH:
                        continue
                    h_talk, h_shift = h[i + t_len + 2 + k], h_base[i + k]
                    w = qs.mixing_head(h_shift, h_talk)
                    nll_talk = nll_of(qs, (1 - w) * h_shift + w * h_talk, x[i + 1 + k])
                    talk_terms[k].append(nll_talk)
                    gain = gain + (nll_base[i + k] - nll_talk).detach()
                rewards[b, n, i] = gain
                policy_terms.append((b, n, i, log_p))
    nll_loss = 0.5 * torch.stack(base_terms).mean() + 0.5 * torch.stack([torch.stack(v).mean() for v in talk_terms.values()]).mean()
    policy_sum, count = 0.0, 0
    for b, n, i, log_p in policy_terms:
        if i > LENGTH - 2 - k_len:  # the authors reinforce positions i <= L - 2 - K only
            continue
        reward = rewards[b, n, i]
        if n_thoughts > 1:
            reward = reward - sum(rewards[b, m, i] for m in range(n_thoughts)) / n_thoughts
        reward = max(reward, torch.zeros_like(reward)) if cfg.clamp_negative_rewards else reward
        policy_sum = policy_sum - sum(reward * lp for lp in log_p)
        count += t_len
    policy_loss = policy_sum / count
    return nll_loss + cfg.policy_weight * policy_loss, nll_loss, policy_loss


def grads_of(qs, loss):
    qs.zero_grad()
    loss.backward()
    return {name: p.grad.clone() for name, p in qs.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("n_thoughts", [1, 2])
def test_fast_step_and_reference_equal_the_hand_written_losses(n_thoughts):
    qs = quietstar_model(
        thought_tokens=THOUGHTS_TOKENS, talk_tokens=TALK, n_thoughts=n_thoughts, policy_weight=1e6
    ).double()
    gen = torch.Generator().manual_seed(n_thoughts)
    ids = torch.randint(0, 97, (2, LENGTH), generator=gen)
    thoughts = torch.randint(0, 97, (2, n_thoughts, LENGTH, THOUGHTS_TOKENS), generator=gen)
    loss, nll_loss, policy_loss = spec_losses(qs, ids, thoughts)
    assert policy_loss != 0  # the case exercises the policy term
    expected = grads_of(qs, loss)
    for forward in (lambda: qs(ids, thoughts=thoughts), lambda: reference_forward(qs, ids, thoughts=thoughts)):
        out = forward()
        for name, want in (("loss", loss), ("nll_loss", nll_loss), ("policy_loss", policy_loss)):
            assert relative_error(getattr(out, name), want) <= 1e-8, (name, relative_error(getattr(out, name), want))
        got = grads_of(qs, out.loss)
        assert set(got) == set(expected)
        for name, grad in expected.items():
            # transformers' RMSNorm computes in float32 even for float64 weights.
            assert relative_error(got[name], grad) <= 1e-6, (name, relative_error(got[name], grad))


def test_policy_positions_are_the_authors_on_unpadded_rows_and_whole_windows_on_padded_ones():
    ignored = -100
    labels = torch.tensor(
        [
            [10, 11, 12, 13, 14, 15],  # unpadded, L = 6, K = 2: i <= L - 2 - K = 2
            [ignored, ignored, 12, 13, 14, ignored],  # left and right padding
        ]
    )
    expected = torch.tensor(
        [
            [True, True, True, False, False, False],
            [False, True, False, False, False, False],  # only i = 1 has x[2..4] all real
        ]
    )
    assert torch.equal(policy_positions(labels, talk_tokens=2), expected)
    assert not policy_positions(torch.arange(3)[None], talk_tokens=4).any()  # too short to act
