"""QuietStarModel's fast training step against the step-by-step dense reference."""

from __future__ import annotations

import pytest
import torch
from helpers import ARCHITECTURES, quietstar_model, relative_error, tiny_causal_lm, tiny_tokenizer

from quietstar import QuietStarConfig, QuietStarModel
from quietstar.model.quietstar_model import Targets
from quietstar.model.reference import reference_forward

LOSS_FIELDS = ["loss", "nll_loss", "policy_loss", "nll_base", "nll_talk", "mixing_weight"]


def make_model(architecture="llama", mix="hidden", n_thoughts=2, **config):
    options = dict(thought_tokens=3, talk_tokens=3, n_thoughts=n_thoughts, policy_weight=1.0, mix=mix)
    return quietstar_model(architecture, **{**options, **config})


def batch(padding="both", length=10, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 97, (2, length), generator=gen)
    mask = torch.ones(2, length, dtype=torch.long)
    if padding in ("left", "both"):
        mask[0, :3] = 0
    if padding in ("right", "both"):
        mask[1, -2:] = 0
    return ids, mask


def parameter_grads(qs, loss):
    qs.zero_grad()
    loss.backward()
    return {name: p.grad.clone() for name, p in qs.named_parameters() if p.grad is not None}


# (outputs, gradients) relative tolerances. float64 is not exact either: transformers' RMSNorm
# computes in float32 for any input dtype, so the gradients below it carry float32 rounding
# (one ulp, about 6e-8, wherever the two paths' upstream gradients round differently). In
# float32 the rewards are differences of NLLs about 1000x larger than themselves, so the
# policy loss keeps only about 3-4 digits.
TOLERANCE = {torch.float64: (1e-8, 1e-6), torch.float32: (1e-4, 1e-3)}
FLOAT32_POLICY_TOLERANCE = 1e-3


def assert_fast_step_equals_reference(qs, ids, mask, seed, dtype=torch.float64):
    qs = qs.to(dtype)
    out_tol, grad_tol = TOLERANCE[dtype]
    fast = qs(ids, mask, generator=torch.Generator().manual_seed(seed))
    fast_grads = parameter_grads(qs, fast.loss)
    ref = reference_forward(qs, ids, mask, thoughts=fast.thoughts)
    ref_grads = parameter_grads(qs, ref.loss)
    for field in LOSS_FIELDS:
        tol = FLOAT32_POLICY_TOLERANCE if (field, dtype) == ("policy_loss", torch.float32) else out_tol
        assert relative_error(getattr(fast, field), getattr(ref, field)) <= tol, (field, relative_error(getattr(fast, field), getattr(ref, field)))
    # Rewards are differences of NLLs: compare on the scale of the NLLs.
    assert (fast.rewards - ref.rewards).abs().max() <= out_tol * ref.nll_talk.abs().max()
    assert set(fast_grads) == set(ref_grads) == {n for n, p in qs.named_parameters() if p.requires_grad}
    for name, grad in ref_grads.items():
        assert relative_error(fast_grads[name], grad) <= grad_tol, (name, relative_error(fast_grads[name], grad))
    # The think phase: the reference sampling step by step draws the same thoughts.
    sampled = reference_forward(qs, ids, mask, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(sampled.thoughts, fast.thoughts)


def test_reference_is_unchanged_by_transformers_gradient_checkpointing_in_train_mode():
    """transformers' checkpointing drops a training layer's KV cache when gradients are on; the
    reference's steps run through one, so it switches that off for its calls, and restores it."""
    qs = make_model(thought_tokens=2, talk_tokens=2, n_thoughts=2).train()
    ids, mask = batch()
    thoughts = qs.sample_thoughts(ids, mask, torch.Generator().manual_seed(0))
    plain = reference_forward(qs, ids, mask, thoughts=thoughts)
    qs.model.gradient_checkpointing_enable()
    checkpointed = reference_forward(qs, ids, mask, thoughts=thoughts)
    for field in LOSS_FIELDS:
        torch.testing.assert_close(getattr(checkpointed, field), getattr(plain, field))
    assert all(layer.gradient_checkpointing for layer in qs.model.model.layers)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("n_thoughts", [1, 2])
def test_fast_step_equals_step_by_step_reference(architecture, n_thoughts):
    assert_fast_step_equals_reference(make_model(architecture, n_thoughts=n_thoughts), *batch(), seed=0)


@pytest.mark.parametrize("mix", ["hidden", "logprobs"])
@pytest.mark.parametrize("padding", ["left", "right"])
def test_fast_step_equals_reference_for_each_mix_mode(mix, padding):
    assert_fast_step_equals_reference(make_model(mix=mix, clamp_negative_rewards=False), *batch(padding), seed=1)


@pytest.mark.parametrize("padding", ["none", "both"])
def test_fast_step_equals_reference_with_one_thought_token_and_one_talk_token(padding):
    qs = make_model(thought_tokens=1, talk_tokens=1)
    assert_fast_step_equals_reference(qs, *batch(padding), seed=3)


@pytest.mark.parametrize("step", ["forward", "evaluate"])
def test_a_row_scores_the_same_alone_and_padded_on_either_side(step):
    """A padding position predicts nothing and does not act, not even the last left pad, whose
    next tokens are the text's first: losses, rewards and the policy term are the row's own."""
    qs = make_model(n_thoughts=1, clamp_negative_rewards=False).double().eval()
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 97, (1, 8), generator=gen)
    thoughts = torch.randint(0, 97, (1, 1, 8, 3), generator=gen)
    pad, pad_thoughts = torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 1, 3, 3, dtype=torch.long)
    alone = qs(ids, thoughts=thoughts)
    padded = {
        "left": (torch.cat([pad, ids], 1), torch.cat([pad, torch.ones_like(ids)], 1), torch.cat([pad_thoughts, thoughts], 2)),
        "right": (torch.cat([ids, pad], 1), torch.cat([torch.ones_like(ids), pad], 1), torch.cat([thoughts, pad_thoughts], 2)),
    }
    for side, (p_ids, p_mask, p_thoughts) in padded.items():
        if step == "forward":  # labels that hold the pad tokens too: padding is never a target
            out = qs(p_ids, p_mask, labels=p_ids, thoughts=p_thoughts)
        else:  # evaluate samples its thoughts: compare what does not depend on them
            out = qs.evaluate(p_ids, p_mask, generator=torch.Generator().manual_seed(0))
            alone = qs.evaluate(ids, generator=torch.Generator().manual_seed(0))
        real = slice(3, None) if side == "left" else slice(0, 8)
        fields = ("nll_loss", "loss", "policy_loss") if step == "forward" else ()
        for name in fields:
            torch.testing.assert_close(getattr(out, name), getattr(alone, name), msg=f"{side} {name}")
        torch.testing.assert_close(out.nll_base[:, real], alone.nll_base, msg=f"{side} nll_base")
        if side == "left":
            assert (out.nll_base[:, :3] == 0).all() and (out.rewards[..., :3] == 0).all()


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
def test_token_ids_of_any_integer_dtype_score_as_int64_ones(dtype):
    qs = make_model(n_thoughts=1).eval()
    gen = torch.Generator().manual_seed(5)
    ids, thoughts = torch.randint(0, 97, (2, 6), generator=gen), torch.randint(0, 97, (2, 1, 6, 3), generator=gen)
    expected = qs(ids, thoughts=thoughts)
    out = qs(ids.to(dtype), labels=ids.to(dtype), thoughts=thoughts.to(dtype))
    torch.testing.assert_close(out.loss, expected.loss, rtol=0, atol=0)
    states = qs.next_token_states(ids.to(dtype), generator=torch.Generator().manual_seed(0))
    assert states[3].dtype == torch.long


def test_fast_step_equals_reference_with_distinct_start_and_end_embeddings():
    qs = make_model()
    # Both meta embeddings start at the same init; make them differ so a swap would show.
    with torch.no_grad():
        qs.meta_embeddings[1] += torch.randn(qs.meta_embeddings.shape[1], generator=torch.Generator().manual_seed(4)) * 0.01
    assert_fast_step_equals_reference(qs, *batch(), seed=4)


@pytest.mark.parametrize("n_thoughts", [1, 2])
def test_fast_step_equals_reference_in_float32(n_thoughts):
    assert_fast_step_equals_reference(make_model(n_thoughts=n_thoughts), *batch(), seed=5, dtype=torch.float32)


@pytest.mark.parametrize("checkpointing", [True, False], ids=["checkpointing", "no-checkpointing"])
def test_fast_step_with_and_without_checkpointing_equals_reference(checkpointing):
    qs = make_model()
    qs.gradient_checkpointing = checkpointing
    assert_fast_step_equals_reference(qs, *batch(), seed=2)


def test_auto_checkpointing_recomputes_only_when_activations_would_crowd_memory(monkeypatch):
    import quietstar.model.quietstar_model as module

    qs = make_model()
    assert qs.gradient_checkpointing == "auto"
    needed = qs.activation_bytes(300, torch.float32)
    assert needed == 300 * 2 * (12 * 32 + 4 * 64) * 4  # tokens x layers x values per token x bytes
    monkeypatch.setattr(module, "available_memory", lambda device: 4 * needed)
    assert not qs._needs_checkpointing(300)
    monkeypatch.setattr(module, "available_memory", lambda device: needed)
    assert qs._needs_checkpointing(300)
    qs.gradient_checkpointing = True
    monkeypatch.setattr(module, "available_memory", lambda device: 4 * needed)
    assert qs._needs_checkpointing(300)
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        QuietStarModel(tiny_causal_lm(), gradient_checkpointing="sometimes")


def test_fresh_mixing_head_makes_talk_equal_base():
    qs = QuietStarModel(tiny_causal_lm(), config=QuietStarConfig(thought_tokens=2, talk_tokens=3, n_thoughts=2))
    ids, mask = batch("right")
    out = qs(ids, mask)
    assert torch.equal(out.mixing_weight, torch.zeros_like(out.mixing_weight))
    length, k_len = ids.shape[1], 3
    for k in range(k_len):
        expected = torch.zeros_like(out.nll_base)
        expected[:, : length - k] = out.nll_base[:, k:]
        for t in range(2):
            torch.testing.assert_close(out.nll_talk[:, t, :, k], expected, rtol=1e-5, atol=1e-6)
    assert out.rewards.abs().max() <= 1e-5  # no gain (up to float32 rounding)
    assert out.policy_loss.abs() <= 1e-5 * out.nll_loss


def test_output_shapes_and_ignored_positions():
    qs = make_model(n_thoughts=2)
    ids, mask = batch("right", length=8)
    out = qs(ids, mask)
    assert out.nll_base.shape == (2, 8)
    assert out.nll_talk.shape == out.mixing_weight.shape == (2, 2, 8, 3)
    assert out.rewards.shape == (2, 2, 8)
    assert out.thoughts.shape == (2, 2, 8, 3) and out.thoughts.dtype == torch.long
    assert out.nll_base[:, -1].eq(0).all()  # last position has no target
    assert out.nll_talk[1, :, -3:].eq(0).all()  # targets in the right padding are ignored
    assert torch.isfinite(out.loss) and out.loss.dim() == 0


def test_sampling_is_reproducible_with_a_generator():
    qs = make_model()
    ids, mask = batch()
    first = qs.sample_thoughts(ids, mask, torch.Generator().manual_seed(5))
    second = qs.sample_thoughts(ids, mask, torch.Generator().manual_seed(5))
    assert torch.equal(first, second)


# Whether each head call of a step found scratch left by the one before: the forward's three
# (base, talk, policy), then with mix="logprobs" the unweighted form's two backward calls,
# which run after ``losses`` has returned.
SCRATCH_FOUND = {"hidden": [False, True, True], "logprobs": [False, True, True, False, False]}


@pytest.mark.parametrize("mix", list(SCRATCH_FOUND))
def test_a_steps_head_calls_share_their_cpu_scratch_and_leave_none_behind(mix, monkeypatch):
    """The forward's head calls pass one CPU scratch along, and none is held once the step is
    done: between steps the caching allocator reuses freed blocks."""
    import quietstar.ops.linear_cross_entropy_torch as torch_backend

    found = []
    init = torch_backend._Scores.__init__

    def spy(self, hidden, lm_weight, *args):
        found.append(lm_weight in (torch_backend._open_workspaces() or {}))
        init(self, hidden, lm_weight, *args)

    monkeypatch.setattr(torch_backend._Scores, "__init__", spy)
    qs = make_model(n_thoughts=1, mix=mix)
    ids, mask = batch()
    qs(ids, mask, generator=torch.Generator().manual_seed(0)).loss.backward()
    assert found == SCRATCH_FOUND[mix]
    assert torch_backend._open_workspaces() is None


def test_training_step_lowers_the_loss_on_a_repeated_batch():
    qs = make_model(n_thoughts=1, policy_weight=0.0)
    ids, mask = batch("none")
    thoughts = qs.sample_thoughts(ids, mask, torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(qs.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        out = qs(ids, mask, thoughts=thoughts)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize(
    "values,field",
    [
        (dict(thought_tokens=0), "thought_tokens"),
        (dict(talk_tokens=1.5), "talk_tokens"),
        (dict(n_thoughts=True), "n_thoughts"),
        (dict(policy_temperature=0), "policy_temperature"),
        (dict(sampling_temperature=float("inf")), "sampling_temperature"),
        (dict(policy_temperature=1e-38), "policy_temperature must be a finite number >= 1e-06"),  # NaN losses
        (dict(policy_weight=-1), "policy_weight"),
        (dict(base_loss_weight=2), "base_loss_weight"),
        (dict(meta_token_scale=float("nan")), "meta_token_scale"),
        (dict(mix="logits"), "mix"),
        (dict(clamp_negative_rewards="yes"), "clamp_negative_rewards"),
    ],
)
def test_config_rejects_bad_values(values, field):
    with pytest.raises(ValueError, match=field):
        QuietStarConfig(**values)


def test_config_defaults_follow_the_reference_code():
    cfg = QuietStarConfig()
    assert (cfg.thought_tokens, cfg.talk_tokens, cfg.n_thoughts) == (9, 4, 2)
    assert cfg.chain_steps == 14
    assert (cfg.sampling_temperature, cfg.policy_temperature, cfg.base_loss_weight) == (1.0, 3.0, 0.5)
    assert cfg.clamp_negative_rewards and cfg.meta_token_scale == 100 and cfg.mix == "hidden"


@pytest.mark.parametrize(
    "call,argument",
    [
        (lambda qs, ids, mask: qs(ids[0]), "input_ids"),
        (lambda qs, ids, mask: qs(ids + 1000), "input_ids"),
        (lambda qs, ids, mask: qs(ids, mask[:, :3]), "attention_mask"),
        (lambda qs, ids, mask: qs(ids, mask, labels=ids[:, :4]), "labels"),
        (lambda qs, ids, mask: qs(ids, mask, labels=ids.index_fill(1, torch.tensor([3]), 1000)), "labels must be token ids"),
        (lambda qs, ids, mask: qs(ids, mask, labels=ids.index_fill(1, torch.tensor([3]), -7)), "labels must be token ids"),
        (lambda qs, ids, mask: qs(ids, mask, thoughts=torch.zeros(2, 2, 10, 2, dtype=torch.long)), "thoughts"),
        (lambda qs, ids, mask: qs(ids, mask, thoughts=torch.full((2, 2, 10, 3), 500)), "thoughts"),
    ],
)
def test_forward_rejects_bad_inputs(call, argument):
    qs = make_model()
    ids, mask = batch()
    with pytest.raises(ValueError, match=argument):
        call(qs, ids, mask)


class TokenizerSplittingTheInitText:
    """A stand-in tokenizer that encodes "---" as two tokens, "--" (id 7) then "-" (id 3)."""

    def __init__(self):
        self.vocab = {"--": 7, "-": 3}

    def get_vocab(self):
        return dict(self.vocab)

    def add_tokens(self, tokens, special_tokens=False):
        for token in tokens:
            self.vocab[token] = 97 + len(self.vocab) - 2

    def convert_tokens_to_ids(self, token):
        return self.vocab[token]

    def encode(self, text, add_special_tokens=False):
        assert text == "---"
        return [7, 3]


def test_meta_tokens_start_from_the_first_token_of_the_init_text():
    """The authors' code starts both meta embeddings at the embedding of the first token of
    "---", not at the mean of its tokens."""
    qs = make_model(tokenizer=TokenizerSplittingTheInitText())
    embedding = qs.model.get_input_embeddings().weight
    torch.testing.assert_close(qs.meta_embedding(0), embedding[7])
    torch.testing.assert_close(qs.meta_embedding(1), embedding[7])
    torch.testing.assert_close(qs.meta_embeddings[0] * 100, embedding[7])


def test_meta_tokens_start_from_the_mean_embedding_without_a_tokenizer():
    qs = make_model()
    embedding = qs.model.get_input_embeddings().weight
    torch.testing.assert_close(qs.meta_embedding(0), embedding.mean(0))
    torch.testing.assert_close(qs.meta_embeddings[1] * 100, embedding.mean(0))


@pytest.mark.parametrize("where", ["input_ids", "labels"])
def test_a_thought_marker_as_a_target_is_refused_naming_its_argument(where):
    """The markers sit inside the lm_head's rows with a padded vocabulary: as a token to predict
    they are refused before the forward runs, naming the argument that holds them."""
    tokenizer = tiny_tokenizer()
    qs = QuietStarModel(tiny_causal_lm("llama", vocab_size=len(tokenizer) + 8), tokenizer, QuietStarConfig(thought_tokens=2))
    ids = torch.tensor([tokenizer("The quick brown fox jumps")["input_ids"]])
    marked = ids.index_fill(1, torch.tensor([2]), qs.meta_token_ids[0])
    call = dict(input_ids=marked) if where == "input_ids" else dict(input_ids=ids, labels=marked)
    with pytest.raises(ValueError, match=f"{where} hold a thought marker"):
        qs(**call)
    ignored = marked.index_fill(1, torch.tensor([2]), -100)  # as context only: accepted
    assert torch.isfinite(qs(marked, labels=ignored, generator=torch.Generator().manual_seed(0)).loss)


def test_labels_under_padding_are_not_checked_as_they_are_never_targets():
    """Padding is never a target whatever its labels hold, nor is a left-padded row's first real
    token: junk there scores as the clean labels do."""
    qs = make_model()
    ids, mask = batch()
    junk = ids.masked_fill(~mask.bool(), -1)
    junk[0, 3] = 1000  # the first real token of the left-padded row: its own label, never predicted
    generator = torch.Generator().manual_seed(0)
    thoughts = qs.sample_thoughts(ids, mask, generator)
    clean, dirty = (qs(ids, mask, labels=labels, thoughts=thoughts) for labels in (ids, junk))
    assert torch.equal(clean.loss, dirty.loss)


@pytest.mark.parametrize("entry", ["forward", "evaluate"])
def test_the_targets_are_built_once_per_call_and_are_the_ones_checked(entry, monkeypatch):
    """The checks and the losses share one ``Targets``: no second copy of the shifted labels
    (and its kernel launches) per step, and what the losses score is what was checked."""
    qs = make_model()
    ids, mask = batch()
    built = []
    from_labels = Targets.from_labels.__func__

    def counting(cls, *args, **kwargs):
        built.append(from_labels(cls, *args, **kwargs))
        return built[-1]

    monkeypatch.setattr(Targets, "from_labels", classmethod(counting))
    seen = []
    losses = QuietStarModel.losses
    monkeypatch.setattr(QuietStarModel, "losses", lambda self, *a, **k: seen.append(a[2]) or losses(self, *a, **k))
    generator = torch.Generator().manual_seed(0)
    out = getattr(qs, entry)(ids, mask, generator=generator) if entry == "evaluate" else qs(ids, mask, generator=generator)
    assert torch.isfinite(out.loss)
    assert len(built) == 1 and len(seen) == 1 and seen[0] is built[0]
