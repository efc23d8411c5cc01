"""The tree pass reuses the sampling pass's projections (quietstar.model.projection_replay)."""

from __future__ import annotations

import pytest
import torch
from helpers import count_native_queries, count_onednn_products, quietstar_model, relative_error, requires_native
from torch import nn

import quietstar.ops.onednn_linear as onednn_module
from quietstar.model import projection_replay
from quietstar.model.attention import decoder_layers
from quietstar.model.projection_replay import ReplayedLinear, recording_projections, replaying_projections
from quietstar.ops.backends import fast_half_matmul
from quietstar.ops.onednn_linear import mkl_packing_available, onednn_linear_available, onednn_packing_available
from quietstar.ops.tree_attention_rows import TreeAttentionRows

# Tests that hold a sampling step against the step given its thoughts run in float64: the
# REINFORCE term (policy_weight 1e6 times rewards that are differences of losses) turns a
# product's last-bit rounding into about 1e-4 of the float32 loss, and the two passes' products
# may round differently (the replay's oneDNN and the tree pass's MKL differed on an Intel Xeon).


def test_replayed_linear_has_a_linears_outputs_and_gradients():
    torch.manual_seed(0)
    x = torch.randn(2, 7, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    expected = nn.functional.linear(x, weight, bias)
    buffer = torch.empty(2, 7, 3, dtype=torch.float64)
    buffer[:, :4] = expected[:, :4].detach()
    out = ReplayedLinear.apply(x, weight, bias, (buffer, 4, torch.float64, None))
    assert torch.equal(out, expected)
    grad = torch.randn_like(expected)
    got = torch.autograd.grad(out, (x, weight, bias), grad)
    want = torch.autograd.grad(expected, (x, weight, bias), grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def record_and_replay(linear: nn.Linear, calls: list[torch.Tensor], total_rows: int):
    with torch.no_grad(), recording_projections(linear, total_rows) as record:
        for x in calls:
            linear(x)
    return record


def test_a_projection_replays_its_recorded_rows_and_multiplies_the_rest():
    torch.manual_seed(0)
    linear = nn.Linear(4, 6)
    x = torch.randn(1, 9, 4)
    record = record_and_replay(linear, [x[:, :3], x[:, 3:6]], total_rows=9)
    assert record.rows() == 6
    # Recorded rows are returned as recorded: perturb one to see that it is not recomputed.
    record.buffers[linear][0, 0, 0] += 1.0
    with replaying_projections(record):
        out = linear(x)
        again = linear(x)  # the record is used up: computed as usual
    expected = linear(x)  # the module's own forward is back
    assert out[0, 0, 0] == expected[0, 0, 0] + 1.0
    torch.testing.assert_close(out[:, 1:], expected[:, 1:])
    torch.testing.assert_close(again, expected)


def test_a_replay_refuses_input_of_other_rows_than_recorded():
    linear = nn.Linear(4, 6)
    record = record_and_replay(linear, [torch.randn(1, 3, 4)], total_rows=9)
    with replaying_projections(record), pytest.raises(RuntimeError, match="recorded for"):
        linear(torch.randn(1, 8, 4))


def test_a_projection_not_called_while_recording_computes_as_usual():
    first, unused = nn.Linear(4, 6), nn.Linear(4, 6)
    layers = nn.ModuleList([first, unused])
    x = torch.randn(1, 9, 4)
    with torch.no_grad(), recording_projections(layers, total_rows=9) as record:
        first(x[:, :5])
    assert record.rows() == 5
    with replaying_projections(record):
        torch.testing.assert_close(unused(x), nn.functional.linear(x, unused.weight, unused.bias))
        torch.testing.assert_close(first(x), nn.functional.linear(x, first.weight, first.bias))


@pytest.mark.skipif(not mkl_packing_available(), reason="this torch cannot pack float32 weights for MKL")
@pytest.mark.parametrize("batch", [1, 2])
def test_packed_products_are_written_straight_into_the_record_and_replayed_into_it(monkeypatch, batch):
    """On an Intel CPU the sampling pass's products land in the record's rows with no copy (what
    the projection returns is those rows), a call past the record's rows is computed and not
    kept, and the tree pass's remaining rows are written after the recorded ones."""
    monkeypatch.setattr(onednn_module, "intel_cpu", lambda: True)
    torch.manual_seed(0)
    linear = nn.Linear(16, 24)
    x = torch.randn(batch, 9, 16)
    expected = nn.functional.linear(x, linear.weight, linear.bias)
    with torch.no_grad(), recording_projections(linear, total_rows=9) as record:
        outs = [linear(x[:, :3]), linear(x[:, 3:6])]
    buffer = record.buffers[linear]
    for out, start in zip(outs, (0, 3)):
        assert out.data_ptr() == buffer[:, start].data_ptr() and out.stride() == buffer[:, start : start + 3].stride()
        torch.testing.assert_close(out, expected[:, start : start + 3])
    assert record.rows() == 6
    with replaying_projections(record):
        out = linear(x)
    assert out.data_ptr() == buffer.data_ptr()
    torch.testing.assert_close(out, expected)
    with torch.no_grad(), recording_projections(linear, total_rows=4) as record:
        linear(x[:, :3])
        past = linear(x[:, 3:6])  # beyond the record's 4 rows: computed, not kept
    torch.testing.assert_close(past, expected[:, 3:6])
    assert record.rows() is None


def test_a_record_with_more_rows_than_the_tree_is_not_replayable():
    linear = nn.Linear(4, 6)
    record = record_and_replay(linear, [torch.randn(1, 5, 4), torch.randn(1, 5, 4)], total_rows=9)
    assert record.rows() is None


def count_replays(monkeypatch) -> list[int]:
    calls = []
    forward = ReplayedLinear.forward

    def counted(ctx, x, weight, bias, recorded):
        calls.append(recorded[1])
        return forward(ctx, x, weight, bias, recorded)

    monkeypatch.setattr(projection_replay.ReplayedLinear, "forward", staticmethod(counted))
    return calls


def test_a_sampling_step_replays_every_projection_of_the_sampled_slots(monkeypatch):
    qs = quietstar_model("llama", thought_tokens=3, talk_tokens=2, n_thoughts=2)
    calls = count_replays(monkeypatch)
    ids = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(0))
    qs(ids, generator=torch.Generator().manual_seed(1)).loss.backward()
    linears = [m for m in decoder_layers(qs.model).modules() if isinstance(m, nn.Linear)]
    assert len(calls) == len(linears) == 2 * 7
    # The base slot and the 3 sampling steps of 2 branches.
    assert set(calls) == {(1 + 3 * 2) * 6}


@requires_native
def test_a_sampling_step_computes_the_tree_pass_attention_only_after_the_sampled_slots(monkeypatch):
    """The tree pass's attention takes the rows the sampling computed and computes the others;
    given thoughts, or checkpointing, it computes every row."""
    rows = count_native_queries(monkeypatch)
    ids = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(0))
    qs = quietstar_model("llama", thought_tokens=3, talk_tokens=2, n_thoughts=2)
    qs(ids, generator=torch.Generator().manual_seed(1)).loss.backward()
    layers = len(decoder_layers(qs.model))
    # sampling: the base slot with the first step's 2 slots, two more steps of 2; the tree pass:
    # the 6 slots after the sampled 7 (end token, 2 talk inputs, of 2 branches)
    sampling = [3 * 6] * layers + [2 * 6] * 2 * layers
    assert rows == sampling + [6 * 6] * layers
    rows.clear()
    qs(ids, thoughts=torch.zeros(2, 2, 6, 3, dtype=torch.long)).loss.backward()
    qs.gradient_checkpointing = True
    qs(ids, generator=torch.Generator().manual_seed(1)).loss.backward()
    tree = 13 * 6  # given thoughts; checkpointed: the sampling, the tree pass, its recomputation
    assert rows == [tree] * layers + sampling + [tree] * layers + [tree] * layers


@requires_native
@pytest.mark.parametrize(("architecture", "padded"), [("llama", True), ("mistral", True), ("qwen2", False)])
def test_in_float32_the_kept_attention_rows_give_the_step_it_computes_without_them(architecture, padded, monkeypatch):
    """The float32 step with the sampling's attention rows has the losses and gradients of the
    same step computing every row (padding, windows, two branches)."""
    qs = quietstar_model(architecture, thought_tokens=3, talk_tokens=2, n_thoughts=2, policy_weight=1.0)
    params = [p for p in qs.parameters() if p.requires_grad]
    ids = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 8, dtype=torch.bool)
    if padded:
        mask[0, :3] = False
    rows = count_native_queries(monkeypatch)
    kept = qs(ids, mask, generator=torch.Generator().manual_seed(1))
    assert rows[-len(decoder_layers(qs.model)) :] == [6 * 8] * len(decoder_layers(qs.model))  # rows were kept
    kept_grads = torch.autograd.grad(kept.loss, params)
    monkeypatch.setattr(TreeAttentionRows, "take", lambda self, *args: self.drop())
    computed = qs(ids, mask, generator=torch.Generator().manual_seed(1))
    assert torch.equal(kept.thoughts, computed.thoughts)
    assert relative_error(kept.loss, computed.loss) <= 1e-6
    for a, b in zip(kept_grads, torch.autograd.grad(computed.loss, params)):
        assert relative_error(a, b) <= 1e-5


def test_given_thoughts_and_checkpointed_steps_replay_nothing(monkeypatch):
    calls = count_replays(monkeypatch)
    ids = torch.randint(0, 97, (1, 6), generator=torch.Generator().manual_seed(0))
    qs = quietstar_model("llama", thought_tokens=2, talk_tokens=2, n_thoughts=1)
    qs(ids, thoughts=torch.zeros(1, 1, 6, 2, dtype=torch.long)).loss.backward()
    checkpointed = quietstar_model("llama", thought_tokens=2, talk_tokens=2, n_thoughts=1)
    checkpointed.gradient_checkpointing = True
    checkpointed(ids, generator=torch.Generator().manual_seed(1)).loss.backward()
    assert calls == []


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_bfloat16_autocast_step_with_replay_equals_the_step_without(architecture):
    qs = quietstar_model(architecture, thought_tokens=2, talk_tokens=2, n_thoughts=2)
    params = [p for p in qs.parameters() if p.requires_grad]
    ids = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sampled = qs(ids, generator=torch.Generator().manual_seed(1))
    replayed = torch.autograd.grad(sampled.loss, params)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        given = qs(ids, thoughts=sampled.thoughts)
    computed = torch.autograd.grad(given.loss, params)
    assert relative_error(sampled.loss, given.loss) <= 1e-2
    for a, b in zip(replayed, computed):
        assert relative_error(a, b) <= 5e-2


def test_active_dropout_in_the_layers_turns_the_replay_off(monkeypatch):
    calls = count_replays(monkeypatch)
    qs = quietstar_model("llama", thought_tokens=2, talk_tokens=2, n_thoughts=1)
    mlp = decoder_layers(qs.model)[0].mlp
    mlp.down_proj = nn.Sequential(mlp.down_proj, nn.Dropout(0.1))
    ids = torch.randint(0, 97, (1, 6), generator=torch.Generator().manual_seed(0))
    qs.train()(ids, generator=torch.Generator().manual_seed(1)).loss.backward()
    assert calls == []
    qs.eval()(ids, generator=torch.Generator().manual_seed(1)).loss.backward()  # dropout off: replayed
    assert calls


def test_a_linear_subclass_computes_in_both_passes(monkeypatch):
    class ScaledLinear(nn.Linear):  # does not compute x W^T + b from .weight
        def forward(self, x):
            return 2 * super().forward(x)

    def with_scaled_down_proj(qs):
        for layer in decoder_layers(qs.model):
            old = layer.mlp.down_proj
            layer.mlp.down_proj = ScaledLinear(old.in_features, old.out_features, bias=False)
            layer.mlp.down_proj.weight = old.weight
        return qs

    calls = count_replays(monkeypatch)
    qs = with_scaled_down_proj(quietstar_model("llama", thought_tokens=2, talk_tokens=2, n_thoughts=2).double())
    ids = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(0))
    sampled = qs(ids, generator=torch.Generator().manual_seed(1))
    assert len(calls) == 2 * 6  # every projection but the two down_proj
    given = qs(ids, thoughts=sampled.thoughts)
    torch.testing.assert_close(sampled.loss, given.loss)


def test_layers_recomputed_in_the_backward_turn_the_replay_off(monkeypatch):
    """Hugging Face's gradient checkpointing recomputes a layer with its plain projections,
    which would save other tensors than the replayed ones did."""
    calls = count_replays(monkeypatch)
    qs = quietstar_model("llama", thought_tokens=2, talk_tokens=2, n_thoughts=1)
    # activation_checkpointing_enable from transformers 5.24 on, gradient_checkpointing_enable before
    if hasattr(qs.model, "activation_checkpointing_enable"):
        qs.model.activation_checkpointing_enable()
    else:
        qs.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, 97, (1, 6), generator=torch.Generator().manual_seed(0))
    qs.train()(ids, generator=torch.Generator().manual_seed(1)).loss.backward()
    assert calls == []


def test_a_projections_forward_hook_applies_once_to_replayed_rows(monkeypatch):
    calls = count_replays(monkeypatch)
    qs = quietstar_model("llama", thought_tokens=2, talk_tokens=2, n_thoughts=2).double()
    decoder_layers(qs.model)[0].mlp.down_proj.register_forward_hook(lambda module, args, output: output * 2)
    ids = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(0))
    sampled = qs(ids, generator=torch.Generator().manual_seed(1))
    assert calls
    torch.testing.assert_close(sampled.loss, qs(ids, thoughts=sampled.thoughts).loss)


def test_a_projection_with_its_own_instance_forward_is_not_replayed(monkeypatch):
    calls = count_replays(monkeypatch)
    qs = quietstar_model("llama", thought_tokens=2, talk_tokens=2, n_thoughts=1)
    hooked = decoder_layers(qs.model)[0].self_attn.q_proj
    hooked.forward = lambda x: nn.Linear.forward(hooked, x)  # as accelerate's device hooks do
    ids = torch.randint(0, 97, (1, 6), generator=torch.Generator().manual_seed(0))
    qs(ids, generator=torch.Generator().manual_seed(1)).loss.backward()
    assert len(calls) == 2 * 7 - 1 and "forward" in hooked.__dict__


def test_under_autocast_the_replay_keeps_no_cast_copy_of_the_weight():
    """The products run in bfloat16, as autocast's linear, but what is saved for the backward is
    the float32 parameter (cast again there), not a bfloat16 copy of it for every layer."""
    torch.manual_seed(0)
    linear = nn.Linear(8, 16)
    x = torch.randn(1, 6, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        record = record_and_replay(linear, [x[:, :4].detach()], total_rows=6)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            with replaying_projections(record):
                out = linear(x)
        expected = linear(x)
    assert out.dtype == expected.dtype == torch.bfloat16
    assert any(t is linear.weight for t in saved)
    assert not any(t.shape == linear.weight.shape and t.dtype == torch.bfloat16 for t in saved)
    grads = torch.autograd.grad(out.float().sum(), (x, linear.weight, linear.bias))
    want = torch.autograd.grad(expected.float().sum(), (x, linear.weight, linear.bias))
    for got, ref in zip(grads, want):
        assert got.dtype == ref.dtype and relative_error(got, ref) <= 1e-2


def test_an_overridden_sample_thoughts_is_used_and_nothing_replayed(monkeypatch):
    """A subclass may change the thoughts after running the layers; the recorded rows would then
    not be the tree's."""
    from quietstar import QuietStarModel

    class FixedThoughts(QuietStarModel):
        def sample_thoughts(self, input_ids, attention_mask=None, generator=None):
            drawn = super().sample_thoughts(input_ids, attention_mask, generator)
            return torch.full_like(drawn, 5)

    calls = count_replays(monkeypatch)
    qs = quietstar_model("llama", thought_tokens=2, talk_tokens=2, n_thoughts=1)
    qs.__class__ = FixedThoughts
    ids = torch.randint(0, 97, (1, 6), generator=torch.Generator().manual_seed(0))
    out = qs(ids, generator=torch.Generator().manual_seed(1))
    assert calls == [] and bool((out.thoughts == 5).all())
    torch.testing.assert_close(out.loss, qs(ids, thoughts=out.thoughts).loss)


def count_given_scores(monkeypatch) -> list[tuple[int, int]]:
    """The shapes of the scores the model hands ``weighted_linear_cross_entropy``."""
    import quietstar.model.quietstar_model as quietstar_model_module

    given = []
    weighted = quietstar_model_module.weighted_linear_cross_entropy

    def counted(*args, scores=None, **kwargs):
        if scores is not None:
            given.append(tuple(scores.shape))
        return weighted(*args, scores=scores, **kwargs)

    monkeypatch.setattr(quietstar_model_module, "weighted_linear_cross_entropy", counted)
    return given


@pytest.mark.parametrize(
    "sampling_temperature, policy_temperature", [(1.0, 3.0), (2.0, 3.0), (0.5, 0.5)],
    ids=["rescaled", "both-not-1", "same-temperature"],
)
def test_the_policy_loss_from_the_draws_logits_equals_scoring_the_thoughts_again(
    monkeypatch, sampling_temperature, policy_temperature
):
    """A sampling step keeps the logits its thoughts were drawn from and the REINFORCE term
    uses them (at its own temperature) instead of scoring those rows again: its losses and
    gradients are those of the step given the same thoughts."""
    given = count_given_scores(monkeypatch)
    qs = quietstar_model("llama", thought_tokens=3, talk_tokens=2, n_thoughts=2).double()
    qs.config.sampling_temperature, qs.config.policy_temperature = sampling_temperature, policy_temperature
    params = [p for p in qs.parameters() if p.requires_grad]
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(0))
    sampled = qs(ids, generator=torch.Generator().manual_seed(1))
    assert given == [(qs.lm_head[0].shape[0], 3 * 2 * 2 * 7)]  # [V, T * B * N * L]
    from_draws = torch.autograd.grad(sampled.loss, params)
    again = qs(ids, thoughts=sampled.thoughts)
    assert len(given) == 1  # given thoughts: the rows are scored
    for name in ("loss", "nll_loss", "policy_loss"):
        assert relative_error(getattr(sampled, name), getattr(again, name)) <= 1e-10, name
    for p, a, b in zip(params, from_draws, torch.autograd.grad(again.loss, params)):
        assert relative_error(a, b) <= 1e-10, p.shape


@pytest.mark.parametrize("sampling_temperature", [1.0, 3.0], ids=["as-the-product", "rounded-after-dividing"])
def test_a_bfloat16_step_keeps_the_draws_logits_in_bfloat16_where_the_cpu_multiplies_it(monkeypatch, sampling_temperature):
    """Under bfloat16 autocast on a CPU with bfloat16 products the draws' logits are kept in
    bfloat16 (half the bytes, read in place). At sampling temperature 1 they are the product's
    own values: the step's losses equal those of the same step keeping them in float32 bit for
    bit; divided by 3 they are rounded once more, and the losses agree at bfloat16 precision.
    The gradients agree at bfloat16 precision either way."""
    from quietstar.ops import backends

    import quietstar.model.quietstar_model as quietstar_model_module

    monkeypatch.setattr(backends, "bf16_matmul_on_cpu", lambda: True)
    kept = []
    weighted = quietstar_model_module.weighted_linear_cross_entropy

    def recorded(*args, scores=None, **kwargs):
        if scores is not None:
            kept.append(scores.dtype)
        return weighted(*args, scores=scores, **kwargs)

    monkeypatch.setattr(quietstar_model_module, "weighted_linear_cross_entropy", recorded)
    qs = quietstar_model("llama", thought_tokens=3, talk_tokens=2, n_thoughts=2)
    qs.config.sampling_temperature = sampling_temperature
    params = [p for p in qs.parameters() if p.requires_grad]
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(0))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = qs(ids, generator=torch.Generator().manual_seed(1))
        return out, torch.autograd.grad(out.loss, params)

    assert qs.thought_logits_dtype() == torch.float32  # autocast off
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert qs.thought_logits_dtype() == torch.bfloat16
    out, grads = step()
    monkeypatch.setattr(type(qs), "thought_logits_dtype", lambda self: torch.float32)
    float32_out, float32_grads = step()
    assert kept == [torch.bfloat16, torch.float32]
    assert torch.equal(out.thoughts, float32_out.thoughts)
    for name in ("loss", "nll_loss", "policy_loss"):
        exact = sampling_temperature == 1.0
        tolerance = dict(rtol=0, atol=0) if exact else dict(rtol=1e-2, atol=0)
        torch.testing.assert_close(getattr(out, name), getattr(float32_out, name), **tolerance)
    for p, a, b in zip(params, grads, float32_grads):
        assert relative_error(a, b) <= 1e-2, p.shape  # 2e-3 to 4e-3 measured: bfloat16 dW chunked otherwise


def test_the_draws_logits_are_not_kept_where_memory_is_short_or_without_gradients(monkeypatch):
    import quietstar.model.quietstar_model as quietstar_model_module

    given = count_given_scores(monkeypatch)
    qs = quietstar_model("llama", thought_tokens=2, talk_tokens=2, n_thoughts=1)
    ids = torch.randint(0, 97, (1, 6), generator=torch.Generator().manual_seed(0))
    logits = qs.thought_logits_bytes(1, 6, torch.float32)
    activations = qs.activation_bytes(6 * qs.config.tree_slots, torch.float32)
    share = quietstar_model_module.AUTO_CHECKPOINT_SHARE
    # Enough for the activations alone (no checkpointing), not for the logits too.
    monkeypatch.setattr(quietstar_model_module, "available_memory", lambda device: int((activations + logits / 2) / share))
    qs(ids, generator=torch.Generator().manual_seed(1)).loss.backward()
    assert given == []
    monkeypatch.setattr(quietstar_model_module, "available_memory", lambda device: int((activations + logits) / share) + 1)
    with torch.no_grad():
        qs(ids, generator=torch.Generator().manual_seed(1))
    assert given == []
    qs(ids, generator=torch.Generator().manual_seed(1)).loss.backward()
    assert given == [(qs.lm_head[0].shape[0], 2 * 6)]


def test_the_draws_logits_are_not_kept_where_the_policy_head_would_not_read_them(monkeypatch):
    """Where the policy head runs the Triton kernel (``weighted_form_reads_scores`` is False),
    which scores the rows faster than its torch form reads them, the sampling pass keeps no
    logits and the step is the step given its thoughts."""
    import quietstar.model.quietstar_model as quietstar_model_module

    asked = []

    def reads_scores(device, dtype, backend=None):
        asked.append((device.type, dtype))
        return False

    monkeypatch.setattr(quietstar_model_module, "weighted_form_reads_scores", reads_scores)
    given = count_given_scores(monkeypatch)
    qs = quietstar_model("llama", thought_tokens=2, talk_tokens=2, n_thoughts=1)
    ids = torch.randint(0, 97, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = qs(ids, generator=torch.Generator().manual_seed(1))
        again = qs(ids, thoughts=out.thoughts)
    assert given == [] and asked == [("cpu", torch.bfloat16)]  # the head's dtype under autocast
    torch.testing.assert_close(out.policy_loss, again.policy_loss)


def test_an_overridden_sample_keeps_no_logits_and_its_thoughts_are_scored(monkeypatch):
    from quietstar import QuietStarModel

    class GreedyThoughts(QuietStarModel):
        def sample(self, hidden, generator=None, greedy=False, **options):
            return super().sample(hidden, generator, greedy=True)

    given = count_given_scores(monkeypatch)
    qs = quietstar_model("llama", thought_tokens=2, talk_tokens=2, n_thoughts=1)
    qs.__class__ = GreedyThoughts
    ids = torch.randint(0, 97, (1, 6), generator=torch.Generator().manual_seed(0))
    out = qs(ids, generator=torch.Generator().manual_seed(1))
    assert given == []
    torch.testing.assert_close(out.policy_loss, qs(ids, thoughts=out.thoughts).policy_loss)


def count_packed_products(monkeypatch) -> list[tuple[int, torch.dtype]]:
    """(rows, dtype) of every product the replay takes from a packed weight from now on."""
    calls = []
    product = projection_replay.packed_linear

    def counted(x, packed, bias=None, *, out=None):
        calls.append((x.shape[-2], packed.dtype))
        return product(x, packed, bias, out=out)

    monkeypatch.setattr(projection_replay, "packed_linear", counted)
    return calls


@pytest.mark.skipif(not onednn_linear_available(), reason="this torch has no oneDNN linear op")
@pytest.mark.parametrize("intel", [False, True])
def test_the_projections_multiply_through_onednn_or_from_weights_packed_once_per_step(monkeypatch, intel):
    """In float32 the sampling pass's projections and the tree pass's remaining rows multiply
    through ``onednn_linear``, or on an Intel CPU from weights packed once per step for MKL; their
    input gradients go through ``onednn_linear_input_grad``; the losses and gradients are the step's given
    the same thoughts (a policy weight of 1 keeps float32 rounding unamplified). Under bfloat16
    autocast the products multiply from weights packed once per step in bfloat16 where the CPU
    multiplies it natively, and go through torch's linear elsewhere."""
    monkeypatch.setattr(onednn_module, "intel_cpu", lambda: intel)
    qs = quietstar_model("llama", thought_tokens=2, talk_tokens=2, n_thoughts=1, policy_weight=1.0)
    params = [p for p in qs.parameters() if p.requires_grad]
    weights = {m.weight.data_ptr() for m in decoder_layers(qs.model).modules() if isinstance(m, nn.Linear)}
    linears = len(weights)
    calls = count_onednn_products(monkeypatch, weights)  # not the sampling's lm_head product
    packed = count_packed_products(monkeypatch)
    packings = []
    pack = projection_replay.pack_weight
    monkeypatch.setattr(projection_replay, "pack_weight", lambda w, *a: packings.append(w.data_ptr()) or pack(w, *a))
    ids = torch.randint(0, 97, (1, 6), generator=torch.Generator().manual_seed(0))
    sampled = qs(ids, generator=torch.Generator().manual_seed(1))
    # the base pass with the first chain step (12 rows), the second step (6), then the tree's
    # 3 other slots
    rows = sorted([6] * linears + [12] * linears + [18] * linears)
    if intel and mkl_packing_available():
        assert calls == [] and sorted(shape for shape, _ in packed) == rows
        assert {dtype for _, dtype in packed} == {torch.float32}
        assert sorted(packings) == sorted(weights)  # each weight packed once for the step
    else:
        assert sorted(shape[-2] for shape in calls) == rows
        assert packed == packings == []
    calls.clear()
    packed.clear()
    packings.clear()
    replayed = torch.autograd.grad(sampled.loss, params)
    # dY W over the tree's 6 slots, through oneDNN except on an Intel CPU (MKL's product there)
    assert [shape[-2] for shape in calls] == ([] if intel else [36] * linears)
    given = qs(ids, thoughts=sampled.thoughts)
    assert relative_error(sampled.loss, given.loss) <= 1e-5
    for a, b in zip(replayed, torch.autograd.grad(given.loss, params)):
        assert relative_error(a, b) <= 1e-4
    calls.clear()
    packed.clear()
    packings.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        qs(ids, generator=torch.Generator().manual_seed(1)).loss.backward()
    assert calls == []
    if onednn_packing_available() and fast_half_matmul(torch.bfloat16, torch.device("cpu")):
        assert sorted(packed) == [(6, torch.bfloat16)] * linears + [(12, torch.bfloat16)] * linears + [
            (18, torch.bfloat16)
        ] * linears
        assert sorted(packings) == sorted(weights)  # each weight packed once for the step
    else:
        assert packed == packings == []
