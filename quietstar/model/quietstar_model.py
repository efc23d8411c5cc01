"""``QuietStarModel``: think, talk and learn (SPEC sections 1-3) over a Hugging Face causal LM.

The fast training step:

1. **Think** without gradients: ``T`` chain steps through a KV cache in the tree layout, the
   first together with the base pass (its input, the start token, is known up front), each
   sampling one thought token per position and branch.
2. **One tree pass with gradients** over the base slot and every chain slot (start, thought
   tokens, end, teacher-forced talk inputs): sampled tokens are detached, so this gives the
   gradients of the step-by-step algorithm (SPEC section 6). The base slot is computed once
   for all branches, attention is ``tree_attention`` (no dense mask). Without checkpointing,
   the decoder projections of the slots step 1 computed are replayed from it
   (``projection_replay``), so only the remaining slots are multiplied again.
3. **Talk and learn**: every head (base NLL, mixed talk NLL, REINFORCE log-probabilities) is
   one ``linear_cross_entropy`` call; the logits are never held.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch
from torch import nn

from quietstar._checks import INT_DTYPES, check_attention_mask, check_tensor, check_token_ids
from quietstar.model.attention import autocast_dtype, check_supported, decoder_layers, patch
from quietstar.model.backbone import run_backbone
from quietstar.model.cache import KVCache
from quietstar.model.checkpoint import load_pretrained, save_pretrained
from quietstar.model.config import QuietStarConfig
from quietstar.model.fused_layers import fuse_layers
from quietstar.model.generation import generate
from quietstar.model.mixing import MixingHead
from quietstar.model.projection_replay import (
    ProjectionRecord,
    recording_projections,
    replayable,
    replaying_projections,
)
from quietstar.model.sampling import sample_tokens
from quietstar.ops.backends import fast_half_matmul
from quietstar.ops.layout import TreeLayout, base_positions, tree_position_ids
from quietstar.ops.linear_cross_entropy import (
    IGNORE_INDEX,
    head_dtypes,
    linear_cross_entropy,
    weighted_form_reads_scores,
    weighted_linear_cross_entropy,
)
from quietstar.ops.linear_cross_entropy_common import compute_dtype
from quietstar.ops.linear_cross_entropy_torch import reusing_scratch

logger = logging.getLogger(__name__)

START_THOUGHT = "<|startthought|>"
END_THOUGHT = "<|endthought|>"
META_TOKEN_INIT_TEXT = "---"
# gradient_checkpointing="auto" keeps the tree pass's activations if they take at most this
# share of the memory available on the device.
AUTO_CHECKPOINT_SHARE = 0.5


def available_memory(device: torch.device) -> int:
    """Bytes free for new tensors: on CUDA the device's free memory, else the system's available
    memory (``MemAvailable``)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0  # unknown: checkpoint


@dataclass
class QuietStarOutput:
    """What one Quiet-STaR forward returns (``B`` rows, ``L`` positions, ``N`` thoughts,
    ``T`` thought tokens, ``K`` talk tokens). The per-token NLLs and rewards are 0 where ignored;
    the mixing weight is the head's output at every position.

    Attributes:
        loss: ``L_nll + policy_weight * L_policy``, scalar.
        nll_loss: ``L_nll``, scalar.
        policy_loss: ``L_policy``, scalar.
        nll_base: ``[B, L]``, ``-log p_base(x[i+1])`` (detached: gradients flow through the
            three losses).
        nll_talk: ``[B, N, L, K]``, ``-log p_mix(x[i+1+k])`` after thought ``t`` at ``i`` (detached).
        rewards: ``[B, N, L]``, detached, after the baseline and clamping.
        mixing_weight: ``[B, N, L, K]``, the mixing head's ``w``.
        thoughts: ``[B, N, L, T]``, the thought tokens (sampled or given).
    """

    loss: torch.Tensor
    nll_loss: torch.Tensor
    policy_loss: torch.Tensor
    nll_base: torch.Tensor
    nll_talk: torch.Tensor
    rewards: torch.Tensor
    mixing_weight: torch.Tensor
    thoughts: torch.Tensor

    def __getitem__(self, key: int | str) -> torch.Tensor:
        """A field by name or by position (``out[0]`` and ``out["loss"]`` are the loss), as
        transformers' ``Trainer`` reads a model's output."""
        if isinstance(key, str):
            if key not in self.__dataclass_fields__:
                raise KeyError(key)
            return getattr(self, key)
        return getattr(self, list(self.__dataclass_fields__)[key])


@dataclass
class Targets:
    """Shifted targets of one batch: base ``[B, L]`` (``x[i+1]``) and talk ``[B, L, K]``
    (``x[i+1+k]``); ignored entries hold ``IGNORE_INDEX``. ``acting [B, L]``: the positions
    whose thought gets a REINFORCE term (``policy_positions``, and the position itself real:
    ``from_labels`` with the mask)."""

    base: torch.Tensor
    talk: torch.Tensor
    acting: torch.Tensor

    @classmethod
    def from_labels(cls, labels: torch.Tensor, talk_tokens: int, attention_mask: torch.Tensor | None = None) -> Targets:
        """Targets from ``labels [B, L]``; with ``attention_mask [B, L]``, padding is never a
        target, and a padding position predicts nothing and does not act, even where the tokens
        after it are real (the last left pad before the text): a row scores the same however
        it is padded, whatever its labels hold at the padding."""
        real = None if attention_mask is None else attention_mask.bool()
        if real is not None:
            labels = labels.masked_fill(~real, IGNORE_INDEX)
        batch, length = labels.shape
        padded = torch.full((batch, length + talk_tokens + 1), IGNORE_INDEX, dtype=torch.long, device=labels.device)
        padded[:, :length] = labels
        talk = torch.stack([padded[:, 1 + k : 1 + k + length] for k in range(talk_tokens)], dim=-1)
        acting = policy_positions(labels, talk_tokens)
        if real is not None:
            talk = talk.masked_fill(~real[..., None], IGNORE_INDEX)
            acting = acting & real
        return cls(base=talk[..., 0], talk=talk, acting=acting)


def policy_positions(labels: torch.Tensor, talk_tokens: int) -> torch.Tensor:
    """``[B, L]`` bool: the positions whose thought is reinforced (SPEC section 3).

    Position ``i`` acts iff the targets ``x[i+1] .. x[i+1+K]`` (its ``K`` talk targets and the
    one after them) are all inside the sequence and not ignored. On a row without padding or
    ignored labels that is exactly the authors' ``i <= L - 2 - K``; with padding, a position
    acts only if its whole talk window and the next token are real tokens (and, through
    ``Targets.from_labels`` with the mask, the position itself).
    """
    batch, length = labels.shape
    window = talk_tokens + 1
    real = torch.zeros(batch, length + window, dtype=torch.bool, device=labels.device)
    real[:, :length] = labels != IGNORE_INDEX
    # real[:, i + 1 : i + 1 + window].all() for every i, as a sliding window.
    return real[:, 1:].unfold(1, window, 1)[:, :length].all(-1)


def shift_positions(values: torch.Tensor, talk_tokens: int) -> torch.Tensor:
    """``out[:, i, k] = values[:, i + k]`` (zeros past the end): ``[B, L, ...] -> [B, L, K, ...]``."""
    length = values.shape[1]
    padded = torch.cat([values, values.new_zeros(values.shape[0], talk_tokens, *values.shape[2:])], dim=1)
    return torch.stack([padded[:, k : k + length] for k in range(talk_tokens)], dim=2)


def thought_gains(nll_base: torch.Tensor, nll_talk: torch.Tensor, valid_talk: torch.Tensor) -> torch.Tensor:
    """How much each thought lowered the NLL of the ``K`` tokens after its position (the reward
    before the baseline over thoughts and the clamping, SPEC section 3): ``[B, N, L]`` from
    ``nll_base [B, L]``, ``nll_talk [B, N, L, K]`` and the scored talk targets ``valid_talk
    [B, L, K]``."""
    shifted = shift_positions(nll_base, nll_talk.shape[-1])[:, None]
    return ((shifted - nll_talk) * valid_talk[:, None]).sum(-1)


class QuietStarModel(nn.Module):
    """A causal LM that thinks before each token.

    Wraps a Llama-family Hugging Face causal LM (Llama, Mistral, Qwen2, Qwen3 and their
    fine-tunes; switched in place to ``QuietStarAttention``) and adds the start/end meta-token
    embeddings and the ``MixingHead``. The meta tokens are not in the model's vocabulary
    (their logits are -inf everywhere); if the tokenizer gives them ids inside the lm_head's
    rows (a padded vocabulary), those ids are masked.

    Args:
        model: the causal LM (its weights are used and trained as they are).
        tokenizer: its tokenizer; gets ``<|startthought|>`` and ``<|endthought|>`` added, and
            the meta embeddings start at the embedding of the first token of ``"---"`` (as
            the authors' code). Without one they start at the mean input embedding.
        config: ``QuietStarConfig`` (defaults from SPEC section 3).
        gradient_checkpointing: ``True`` recomputes each decoder layer of the tree pass in the
            backward instead of keeping its activations (the tree pass holds ``1 + C * N``
            times the tokens of the text, so this is most of the memory; it costs one more
            forward); ``False`` keeps them; ``"auto"`` (the default) keeps them when their
            estimate (``activation_bytes``) is under half the memory available on the device.
        fused_layers: swap the decoder's RMSNorms and SiLU-gated MLPs for quietstar's fused ones
            (``fuse_layers``: the same weights, keys and arithmetic in fewer passes over memory);
            ``False`` keeps the model's own modules.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer=None,
        config: QuietStarConfig | None = None,
        *,
        gradient_checkpointing: bool | str = "auto",
        fused_layers: bool = True,
    ) -> None:
        super().__init__()
        if gradient_checkpointing not in (True, False, "auto"):
            raise ValueError(f"gradient_checkpointing must be True, False or 'auto', got {gradient_checkpointing!r}")
        self.gradient_checkpointing = gradient_checkpointing
        check_supported(model)
        if config is not None and not isinstance(config, QuietStarConfig):
            raise ValueError(f"config must be a QuietStarConfig, got {type(config).__name__}")
        self.config = config or QuietStarConfig()
        self.model = patch(model)
        if fused_layers:
            fuse_layers(self.model)
        self.tokenizer = tokenizer
        embedding = model.get_input_embeddings().weight
        hidden_size = embedding.shape[1]
        self.mixing_head = MixingHead(
            hidden_size, sigmoid=self.config.mix == "logprobs", device=embedding.device, dtype=embedding.dtype
        )
        self.meta_token_ids = self._add_meta_tokens(tokenizer)
        with torch.no_grad():
            init = self._meta_token_init(tokenizer, embedding)
        # Stored divided by the scale and used times it: their gradient steps are s times larger.
        self.meta_embeddings = nn.Parameter(init.expand(2, hidden_size) / self.config.meta_token_scale)
        vocab = model.get_output_embeddings().weight.shape[0]
        in_vocab = [i for i in self.meta_token_ids if i is not None and i < vocab]
        self.register_buffer(
            "masked_vocab", torch.tensor(in_vocab, dtype=torch.long, device=embedding.device), persistent=False
        )

    # --- construction ---------------------------------------------------------------

    @staticmethod
    def _add_meta_tokens(tokenizer) -> tuple[int | None, int | None]:
        if tokenizer is None:
            return (None, None)
        new = [t for t in (START_THOUGHT, END_THOUGHT) if t not in tokenizer.get_vocab()]
        if new:
            tokenizer.add_tokens(new, special_tokens=True)
        return tuple(tokenizer.convert_tokens_to_ids(t) for t in (START_THOUGHT, END_THOUGHT))

    @staticmethod
    def _meta_token_init(tokenizer, embedding: torch.Tensor) -> torch.Tensor:
        if tokenizer is None:
            logger.info("no tokenizer: meta-token embeddings start at the mean input embedding")
            return embedding.mean(0)
        ids = tokenizer.encode(META_TOKEN_INIT_TEXT, add_special_tokens=False)
        if not ids:
            logger.warning("the tokenizer encodes %r as no token: meta-token embeddings start at the mean input embedding", META_TOKEN_INIT_TEXT)
            return embedding.mean(0)
        return embedding[ids[0]]

    # --- parts ----------------------------------------------------------------------

    @property
    def lm_head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        head = self.model.get_output_embeddings()
        return head.weight, getattr(head, "bias", None)

    def meta_embedding(self, which: int) -> torch.Tensor:
        """``[d]`` embedding of the start (0) or end (1) meta token, as the model reads it."""
        return self.meta_embeddings[which] * self.config.meta_token_scale

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings ``[..., d]`` of token ids ``[...]``."""
        return self.model.get_input_embeddings()(ids)

    def embed_chain(self, ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings of the chain's tokens (thought tokens, talk inputs), whose gradient
        reaches the embedding matrix as a sparse sum over the rows used: a training step looks
        tokens up once per thought step, and a dense gradient would fill the whole
        ``[V, d]`` matrix with zeros each time. The text's own lookup (``embed``) stays dense,
        so the matrix's accumulated gradient is dense for any optimizer."""
        embedding = self.model.get_input_embeddings()
        return torch.nn.functional.embedding(ids, embedding.weight, embedding.padding_idx, sparse=True)

    def head_nll(
        self,
        hidden: torch.Tensor,
        targets: torch.Tensor,
        mix: tuple[torch.Tensor, torch.Tensor] | None = None,
        temperature: float = 1.0,
        weights: torch.Tensor | None = None,
        scores: torch.Tensor | None = None,
        scores_temperature: float | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``linear_cross_entropy`` of ``hidden [..., d]`` (mixed with ``(base [..., d], w [...])``)
        against ``targets [...]`` with the model's lm_head and masked meta ids; returns the NLL
        ``[...]``. With ``weights [...]`` (constants), ``weighted_linear_cross_entropy``: returns
        ``(sum(weights * nll), nll detached)``, with the gradients formed in the forward, from
        the rows' ``scores [V, rows]`` when given (consumed; divided by ``scores_temperature``
        where it is not ``temperature``)."""
        weight, bias = self.lm_head
        width = hidden.shape[-1]
        # Under autocast the op takes half-precision hidden states next to the float32 master
        # weights: it multiplies in the half dtype and accumulates, and returns dW, in float32.
        dtype = autocast_dtype(hidden.device) or hidden.dtype
        hidden = hidden.to(dtype)
        if weight.dtype not in head_dtypes(dtype):
            weight, bias = weight.to(dtype), None if bias is None else bias.to(dtype)
        if mix is not None:
            mix = (mix[0].reshape(-1, width).to(dtype), mix[1].reshape(-1))
        options = dict(lm_bias=bias, mix=mix, temperature=temperature, masked_vocab=self.masked_vocab)
        if weights is None:
            nll = linear_cross_entropy(hidden.reshape(-1, width), weight, targets.reshape(-1), **options)
            return nll.view(targets.shape)
        loss, nll = weighted_linear_cross_entropy(
            hidden.reshape(-1, width),
            weight,
            targets.reshape(-1),
            weights.reshape(-1).detach(),
            **options,
            scores=scores,
            scores_temperature=None if scores is None else scores_temperature,
        )
        return loss, nll.view(targets.shape)

    def sample(
        self,
        hidden: torch.Tensor,
        generator: torch.Generator | None = None,
        greedy: bool = False,
        logits_out: torch.Tensor | None = None,
    ):
        """Thought/next tokens ``[...]`` drawn from the lm_head on ``hidden [..., d]`` (the
        logits they were drawn from also into ``logits_out [V, rows]``: ``sample_tokens``)."""
        weight, bias = self.lm_head
        return sample_tokens(
            hidden,
            weight,
            bias,
            temperature=self.config.sampling_temperature,
            masked_vocab=self.masked_vocab,
            greedy=greedy,
            generator=generator,
            logits_out=logits_out,
        )

    # --- think ----------------------------------------------------------------------

    def chain_embeddings(self, input_ids: torch.Tensor, thoughts: torch.Tensor) -> torch.Tensor:
        """Inputs of every chain step ``[B, C, N, L, d]``: start, the thought tokens, end, and
        the talk inputs ``x[i+1..i+K-1]`` (past the end: token 0; its targets are ignored)."""
        cfg = self.config
        batch, n_thoughts, length, _ = thoughts.shape
        d = self.meta_embeddings.shape[1]
        start = self.meta_embedding(0).expand(batch, 1, n_thoughts, length, d)
        end = self.meta_embedding(1).expand(batch, 1, n_thoughts, length, d)
        thought = self.embed_chain(thoughts).permute(0, 3, 1, 2, 4)  # [B, T, N, L, d]
        parts = [start, thought, end]
        if cfg.talk_tokens > 1:
            ahead = shift_positions(input_ids, cfg.talk_tokens)[:, :, 1:]  # [B, L, K-1]
            talk = self.embed_chain(ahead).permute(0, 2, 1, 3)[:, :, None].expand(-1, -1, n_thoughts, -1, -1)
            parts.append(talk)
        return torch.cat(parts, dim=1)

    @torch.no_grad()
    def sample_thoughts(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample ``[B, N, L, T]`` thought tokens: ``T`` chain steps through a KV cache in the
        tree layout, the first with the base pass (each step appends ``N * L`` tokens)."""
        return self._chain_through_cache(input_ids, attention_mask, generator, self.config.thought_tokens)[2]

    def _chain_through_cache(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        generator: torch.Generator | None,
        steps: int,
        thought_logits: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The base pass and the first ``steps`` chain steps through a KV cache in the tree
        layout (the base and the first step as one pass), sampling the thought tokens on the
        way; returns ``h_base [B, L, d]``, the chain steps' hidden states ``[B, steps, N, L,
        d]`` (those of the tree pass) and the thoughts ``[B, N, L, T]``. Chain step ``c``
        reads: the start token (``c = 0``), thought token ``c`` (``1 <= c <= T``), the end
        token (``T + 1``), then the talk input ``x[i + c - T - 1]``; the steps from ``T`` on,
        whose inputs are all known once the last thought token is drawn, run as one pass. With
        ``thought_logits [V, T, B * N * L]``, the logits each thought token was drawn from are
        written there (``sample``)."""
        cfg = self.config
        batch, length = input_ids.shape
        n, t_len = cfg.n_thoughts, cfg.thought_tokens
        layout = TreeLayout(length, n, None if attention_mask is None else attention_mask.bool())
        positions = base_positions(attention_mask, batch, length, input_ids.device)
        cache = KVCache(capacity=(1 + steps * n) * length)
        talk_inputs = shift_positions(input_ids, cfg.talk_tokens)  # [B, L, K]: x[i + k]
        chain_positions = positions.repeat(1, n)  # [B, N * L]: the text's, for every branch

        def step_input(c: int) -> torch.Tensor:  # [B, N * L, d]
            if c == 0:
                return self.meta_embedding(0).expand(batch, n * length, -1)
            if c <= t_len:
                return self.embed(thoughts[c - 1].flatten(1))
            if c == t_len + 1:
                return self.meta_embedding(1).expand(batch, n * length, -1)
            return self.embed(talk_inputs[..., c - t_len - 1].repeat(1, n))

        # The base slot and the start token's step (whose input is known up front) as one pass
        # over both slots: one read of every weight fewer, and products of twice the rows.
        first = run_backbone(
            self.model,
            torch.cat([self.embed(input_ids), step_input(0)], dim=1),
            torch.cat([positions, chain_positions + 1], dim=1),
            cache=cache,
            tree_layout=layout,
        )
        h_base, hidden = first[:, :length], first[:, length:]
        hidden_steps, thoughts = [], []
        sampling = min(steps, t_len)  # the steps that draw the next thought token
        for c in range(sampling):
            if c:
                hidden = run_backbone(self.model, step_input(c), chain_positions + c + 1, cache=cache, tree_layout=layout)
            hidden_steps.append(hidden)
            logits_out = None if thought_logits is None else thought_logits[:, c]
            thoughts.append(self.sample(hidden, generator, logits_out=logits_out).view(batch, n, length))
        if steps > sampling:
            # Every later step's input is known by now (the last thought token, the end token,
            # the talk inputs): one pass over all their slots, as the tree pass takes them.
            rest = range(sampling, steps)
            inputs = torch.cat([step_input(c) for c in rest], dim=1)
            rest_positions = torch.cat([chain_positions + c + 1 for c in rest], dim=1)
            hidden = run_backbone(self.model, inputs, rest_positions, cache=cache, tree_layout=layout)
            hidden_steps.extend(hidden.chunk(len(rest), dim=1))
        h_chain = torch.stack(hidden_steps, dim=1).unflatten(2, (n, length))
        return h_base, h_chain, torch.stack(thoughts, dim=-1)

    @torch.no_grad()
    def next_token_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """What predicts ``x[i+1]`` at every position, with and without a thought, as in
        generation: ``(h_base [B, L, d], h_talk [B, N, L, d], w [B, N, L], thoughts [B, N, L, T])``,
        ``h_talk`` the hidden state after the thought's end token and ``w`` the mixing head's
        weight. The thoughts are sampled through a KV cache that carries on to the end token
        (``T + 2`` chain steps; no talk inputs)."""
        input_ids, attention_mask, _, _ = self._check_inputs(input_ids, attention_mask, None, targets=False)
        t_len = self.config.thought_tokens
        h_base, h_chain, thoughts = self._chain_through_cache(input_ids, attention_mask, generator, t_len + 2)
        h_talk = h_chain[:, t_len + 1]  # [B, N, L, d]
        w = self.mixing_head(h_base[:, None].expand_as(h_talk), h_talk)
        return h_base, h_talk, w, thoughts

    @torch.no_grad()
    def evaluate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> QuietStarOutput:
        """The forward's outputs without gradients, in one pass over the tree's tokens: the
        KV cache that samples the thoughts carries on through the end token and the talk
        inputs, so no second (tree) pass runs. Arguments as ``forward``; losses, NLLs,
        rewards and mixing weights equal the forward's for the same thoughts."""
        input_ids, attention_mask, _, targets = self._check_inputs(input_ids, attention_mask, labels)
        h_base, h_chain, thoughts = self._chain_through_cache(input_ids, attention_mask, generator, self.config.chain_steps)
        return self.losses(h_base, h_chain, targets, thoughts)

    # --- forward --------------------------------------------------------------------

    def activation_bytes(self, tree_tokens: int, dtype: torch.dtype) -> int:
        """Estimated activations the tree pass keeps for the backward without checkpointing:
        per token and decoder layer about 12 hidden-size and 4 MLP-width values (norms, the
        attention's projections and output, the MLP's three products)."""
        cfg = self.model.config
        per_token = 12 * cfg.hidden_size + 4 * cfg.intermediate_size
        return tree_tokens * cfg.num_hidden_layers * per_token * dtype.itemsize

    def _needs_checkpointing(self, tree_tokens: int) -> bool:
        """Whether a step recomputes layers in the backward (``gradient_checkpointing``); with
        ``"auto"``, whether the activations it would keep (``activation_bytes``) exceed
        ``AUTO_CHECKPOINT_SHARE`` of the memory available on the device."""
        if self.gradient_checkpointing != "auto":
            return bool(self.gradient_checkpointing)
        embedding = self.model.get_input_embeddings().weight
        needed = self.activation_bytes(tree_tokens, embedding.dtype)
        return needed > AUTO_CHECKPOINT_SHARE * available_memory(embedding.device)

    # --- forward --------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        thoughts: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> QuietStarOutput:
        """One Quiet-STaR training forward.

        Args:
            input_ids: ``[B, L]`` token ids.
            attention_mask: ``[B, L]``, 1/True for real tokens (left or right padding).
            labels: ``[B, L]`` aligned with ``input_ids`` (shifted inside), ``-100`` ignored;
                default: ``input_ids`` with padding ignored.
            thoughts: ``[B, N, L, T]`` thought tokens to use instead of sampling.
            generator: random generator for the thought sampling.
        """
        input_ids, attention_mask, _, targets = self._check_inputs(input_ids, attention_mask, labels)
        cfg = self.config
        batch, length = input_ids.shape
        checkpoint = torch.is_grad_enabled() and self._needs_checkpointing(batch * length * cfg.tree_slots)
        record = thought_logits = None
        if thoughts is None:
            keep = not checkpoint
            keep_logits = keep and torch.is_grad_enabled() and self._keeps_thought_logits(batch, length)
            thoughts, record, thought_logits = self._sample_recording(
                input_ids, attention_mask, generator, keep, keep_logits
            )
        else:
            thoughts = self._check_thoughts(thoughts, batch, length)
        h_base, h_chain = self._tree_pass(input_ids, attention_mask, thoughts, checkpoint, record)
        return self.losses(h_base, h_chain, targets, thoughts, thought_logits)

    def thought_logits_bytes(self, batch: int, length: int, dtype: torch.dtype) -> int:
        """Bytes of the logits the thoughts of a step are drawn from, ``[V, T, B * N * L]``, kept
        in ``dtype`` (``thought_logits_dtype``)."""
        cfg = self.config
        return self.lm_head[0].shape[0] * cfg.thought_tokens * batch * cfg.n_thoughts * length * dtype.itemsize

    def thought_logits_dtype(self) -> torch.dtype:
        """The dtype the sampling pass keeps the thoughts' logits in for the policy head, as
        autocast stands now: the half dtype the head multiplies in, where the device multiplies
        it faster than float32 (``fast_half_matmul``: the scores as the head's own product would
        round them, read in place, at half the bytes); else float32 (float64 for a float64
        model)."""
        embedding = self.model.get_input_embeddings().weight
        head_dtype = autocast_dtype(embedding.device) or embedding.dtype  # what head_nll passes on
        return head_dtype if fast_half_matmul(head_dtype, embedding.device) else compute_dtype(head_dtype)

    def _keeps_thought_logits(self, batch: int, length: int) -> bool:
        """Whether the sampling pass may keep the logits it draws the thoughts from, for the
        policy loss to use instead of scoring those rows again: where the policy head reads
        them (``weighted_form_reads_scores``: its torch form, not the Triton kernel) and they
        and the tree pass's activations take at most ``AUTO_CHECKPOINT_SHARE`` of the memory
        available."""
        embedding = self.model.get_input_embeddings().weight
        head_dtype = autocast_dtype(embedding.device) or embedding.dtype  # what head_nll passes on
        if not weighted_form_reads_scores(embedding.device, head_dtype):
            return False
        tree_tokens = batch * length * self.config.tree_slots
        needed = self.activation_bytes(tree_tokens, embedding.dtype) + self.thought_logits_bytes(
            batch, length, self.thought_logits_dtype()
        )
        return needed <= AUTO_CHECKPOINT_SHARE * available_memory(embedding.device)

    @torch.no_grad()
    def _sample_recording(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        generator: torch.Generator | None,
        keep: bool,
        keep_logits: bool = False,
    ) -> tuple[torch.Tensor, ProjectionRecord | None, torch.Tensor | None]:
        """``sample_thoughts``, keeping (with ``keep``) the decoder's projections of the
        ``1 + T * N`` slots it computes for the tree pass to replay (``projection_replay``)
        and (with ``keep_logits`` too) the logits the thoughts were drawn from (``[V, T, B * N
        * L]``, for ``losses``; not when ``sample`` is overridden); returns ``(thoughts,
        record, logits)``, the last two None when not kept, not usable (``replayable``: the
        tree pass would not compute the same rows), or when ``sample_thoughts`` is overridden."""
        layers = decoder_layers(self.model)
        cfg = self.config
        # An overridden sample_thoughts may change the thoughts after the layers ran: then the
        # recorded rows would not be the tree's, so it runs as it is, and nothing is replayed.
        if not (keep and replayable(layers)) or type(self).sample_thoughts is not _SAMPLE_THOUGHTS:
            return self.sample_thoughts(input_ids, attention_mask, generator), None, None
        batch, length = input_ids.shape
        thought_logits = None
        # An overridden sample may draw from other logits than the lm_head's, or not write them.
        if keep_logits and type(self).sample is _SAMPLE:
            vocab, rows = self.lm_head[0].shape[0], batch * cfg.n_thoughts * length
            thought_logits = torch.empty(
                vocab, cfg.thought_tokens, rows, dtype=self.thought_logits_dtype(), device=input_ids.device
            )
        with recording_projections(layers, cfg.tree_slots * length) as record:
            thoughts = self._chain_through_cache(
                input_ids, attention_mask, generator, cfg.thought_tokens, thought_logits
            )[2]
        if record.rows() != (1 + cfg.thought_tokens * cfg.n_thoughts) * length:
            logger.debug("the sampling pass's projections do not line up with the tree's slots: not replayed")
            return thoughts, None, None
        return thoughts, record, thought_logits

    def _tree_pass(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        thoughts: torch.Tensor,
        checkpoint: bool,
        record: ProjectionRecord | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states of the base slot ``[B, L, d]`` and every chain step ``[B, C, N, L, d]``
        in one pass over the whole tree (SPEC section 6), layers recomputed in the backward
        with ``checkpoint``; the first slots' projections taken from ``record`` when given."""
        cfg = self.config
        batch, length = input_ids.shape
        n = cfg.n_thoughts
        chain = self.chain_embeddings(input_ids, thoughts)  # [B, C, N, L, d]
        embeds = torch.cat([self.embed(input_ids)[:, None], chain.flatten(1, 2)], dim=1).flatten(1, 2)
        positions = tree_position_ids(base_positions(attention_mask, batch, length, input_ids.device), cfg.tree_slots, n)
        layout = TreeLayout(length, n, None if attention_mask is None else attention_mask.bool())
        with replaying_projections(record) if record is not None else contextlib.nullcontext():
            hidden = run_backbone(self.model, embeds, positions, tree_layout=layout, checkpoint_layers=checkpoint)
        return hidden[:, :length], hidden[:, length:].unflatten(1, (cfg.chain_steps, n, length))

    @reusing_scratch()  # the head's calls below share their CPU scratch
    def losses(
        self,
        h_base: torch.Tensor,
        h_chain: torch.Tensor,
        targets: Targets,
        thoughts: torch.Tensor,
        thought_logits: torch.Tensor | None = None,
    ) -> QuietStarOutput:
        """Talk and learn from the final hidden states of the base slot ``[B, L, d]`` and the
        chain steps ``[B, C, N, L, d]`` (SPEC sections 2 and 3); the REINFORCE term from
        ``thought_logits [V, T, B * N * L]`` (the logits the thoughts were drawn from, at the
        sampling temperature; consumed) when given, instead of scoring those rows again."""
        cfg = self.config
        n, t_len, k_len = cfg.n_thoughts, cfg.thought_tokens, cfg.talk_tokens
        # L_nll's weight of every scored row: the base term's mean and, per talk offset k, its mean.
        valid_base = targets.base != IGNORE_INDEX
        valid_talk = targets.talk != IGNORE_INDEX  # [B, L, K]
        dtype = torch.float64 if h_base.dtype == torch.float64 else torch.float32
        per_k_counts = (valid_talk.sum(dim=(0, 1)) * n).to(dtype)  # [K]
        scored_k = (per_k_counts > 0).sum().clamp(min=1)
        base_weights = valid_base * (cfg.base_loss_weight / valid_base.sum().clamp(min=1).to(dtype))
        talk_weights = valid_talk[:, None] * ((1 - cfg.base_loss_weight) / (scored_k * per_k_counts.clamp(min=1)))

        # Talk: chain step T+2+k predicts x[i+1+k]; the base state is shifted to that target.
        h_talk = h_chain[:, t_len + 1 :].permute(0, 2, 3, 1, 4)  # [B, N, L, K, d]
        h_base_shifted = shift_positions(h_base, k_len)[:, None].expand_as(h_talk)
        talk_targets = targets.talk[:, None].expand(-1, n, -1, -1)
        w = self.mixing_head(h_base_shifted, h_talk)  # [B, N, L, K]
        if cfg.mix == "hidden":  # every term is a weighted sum of NLLs: gradients in the forward
            base_loss, nll_base = self.head_nll(h_base, targets.base, weights=base_weights)
            talk_loss, nll_talk = self.head_nll(
                h_talk, talk_targets, mix=(h_base_shifted, w), weights=talk_weights.expand_as(talk_targets)
            )
            nll_loss = base_loss + talk_loss
        else:  # the paper: interpolate log-probabilities with a sigmoid weight
            nll_base = self.head_nll(h_base, targets.base)  # [B, L]
            nll_base_shifted = shift_positions(nll_base, k_len)[:, None]
            nll_talk = (1 - w) * nll_base_shifted + w * self.head_nll(h_talk, talk_targets)
            nll_talk = nll_talk * (talk_targets != IGNORE_INDEX)
            nll_loss = (base_weights * nll_base).sum() + (talk_weights * nll_talk).sum()
            nll_base, nll_talk = nll_base.detach(), nll_talk.detach()

        # Learn: REINFORCE with the extended-teacher-forcing reward.
        with torch.no_grad():
            rewards = thought_gains(nll_base, nll_talk, valid_talk)  # [B, N, L]
            if n > 1:
                rewards = rewards - rewards.mean(dim=1, keepdim=True)
            if cfg.clamp_negative_rewards:
                rewards = rewards.clamp(min=0)
        acting = targets.acting  # [B, L]: the authors' positions (policy_positions), real ones only
        # Rows in the order of the thought logits' columns: [T, B, N, L] (step t produced thought token t).
        h_policy = h_chain[:, :t_len].transpose(0, 1)
        policy_targets = thoughts.permute(3, 0, 1, 2).masked_fill(~acting[None, :, None], IGNORE_INDEX)
        n_actions = acting.sum() * n * t_len
        policy_weights = (rewards / n_actions.clamp(min=1))[None].expand_as(policy_targets)
        # The draws' logits, at the sampling temperature (read rescaled to the policy's).
        scores = None if thought_logits is None else thought_logits.view(thought_logits.shape[0], -1)
        # -mean r * log p_tau(thought token) = sum (r / n_actions) * nll_tau
        policy_loss, _ = self.head_nll(
            h_policy,
            policy_targets,
            temperature=cfg.policy_temperature,
            weights=policy_weights,
            scores=scores,
            scores_temperature=cfg.sampling_temperature,
        )
        return QuietStarOutput(
            loss=nll_loss + cfg.policy_weight * policy_loss,
            nll_loss=nll_loss,
            policy_loss=policy_loss,
            nll_base=nll_base,
            nll_talk=nll_talk,
            rewards=rewards,
            mixing_weight=w,
            thoughts=thoughts,
        )

    # --- generate, save, load ----------------------------------------------------------

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **options):
        """Generate with a thought before every token; see ``quietstar.model.generation.generate``."""
        return generate(self, input_ids, attention_mask, **options)

    def save_pretrained(self, directory) -> None:
        """Save to ``directory``; see ``quietstar.model.checkpoint.save_pretrained``."""
        save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, directory, **model_kwargs) -> QuietStarModel:
        """Load what ``save_pretrained`` wrote; see ``quietstar.model.checkpoint.load_pretrained``."""
        return load_pretrained(directory, cls, **model_kwargs)

    # --- argument checks ------------------------------------------------------------

    def _check_inputs(
        self, input_ids, attention_mask, labels, *, targets: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, Targets | None]:
        """``(input_ids, attention_mask, labels, targets)`` checked: the mask None where every
        token is real, the labels ``input_ids`` where not given (padding ignored); with
        ``targets``, the ``Targets`` the losses score, whose ids are checked too: the head's ids,
        no thought marker (the losses would refuse them only after the whole forward, naming
        their own arguments); else None."""
        check_tensor("input_ids", input_ids, ndim=2, dtypes=INT_DTYPES)
        batch, length = input_ids.shape
        if batch == 0 or length == 0:
            raise ValueError(f"input_ids must be [B, L] with B, L >= 1, got {tuple(input_ids.shape)}")
        input_ids = check_token_ids("input_ids", input_ids, self.model.get_input_embeddings().weight.shape[0])
        if attention_mask is not None:
            check_tensor("attention_mask", attention_mask, ndim=2, device=input_ids.device)
            if attention_mask.shape != input_ids.shape:
                raise ValueError(
                    f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                    f"got {tuple(attention_mask.shape)}"
                )
            check_attention_mask(attention_mask)
            if bool(attention_mask.all()):
                attention_mask = None
        given_labels = labels is not None
        if labels is None:
            labels = input_ids if attention_mask is None else input_ids.masked_fill(~attention_mask.bool(), IGNORE_INDEX)
        else:
            check_tensor("labels", labels, ndim=2, dtypes=INT_DTYPES, device=input_ids.device)
            if labels.shape != input_ids.shape:
                raise ValueError(
                    f"labels must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(labels.shape)}"
                )
        labels = labels.long()
        if not targets:
            return input_ids, attention_mask, labels, None
        # As the losses score them: padding is never a target, nor a position's own label.
        scored = Targets.from_labels(labels, self.config.talk_tokens, attention_mask)
        self._check_targets(scored.talk[scored.talk != IGNORE_INDEX], "labels" if given_labels else "input_ids")
        return input_ids, attention_mask, labels, scored

    def _check_targets(self, scored: torch.Tensor, name: str) -> None:
        """Raise ``ValueError`` naming ``name`` unless the scored target ids are the head's and
        none is a thought marker (``masked_vocab``)."""
        vocab = self.lm_head[0].shape[0]
        if bool(((scored < 0) | (scored >= vocab)).any()):
            raise ValueError(f"{name} must be token ids in [0, {vocab}) or {IGNORE_INDEX} (not scored) as targets")
        if self.masked_vocab.numel() and bool(torch.isin(scored, self.masked_vocab).any()):
            raise ValueError(
                f"{name} hold a thought marker (<|startthought|> or <|endthought|>) as a token to predict; the text may "
                f"not contain them (labels of {IGNORE_INDEX} there keep them as context only)"
            )

    def _check_thoughts(self, thoughts: torch.Tensor, batch: int, length: int) -> torch.Tensor:
        """``thoughts`` checked, as int64 (the embedding takes int64 or int32 ids only)."""
        cfg = self.config
        check_tensor("thoughts", thoughts, ndim=4, dtypes=INT_DTYPES)
        expected = (batch, cfg.n_thoughts, length, cfg.thought_tokens)
        if tuple(thoughts.shape) != expected:
            raise ValueError(f"thoughts must be [B, n_thoughts, L, thought_tokens] = {expected}, got {tuple(thoughts.shape)}")
        thoughts = check_token_ids("thoughts", thoughts, self.lm_head[0].shape[0])
        if self.masked_vocab.numel() and bool(torch.isin(thoughts, self.masked_vocab).any()):
            raise ValueError("thoughts must not contain the meta tokens (<|startthought|>, <|endthought|>)")
        return thoughts


# The class's own sampling: the only one whose recorded projections are the tree's (above).
_SAMPLE_THOUGHTS = QuietStarModel.sample_thoughts
_SAMPLE = QuietStarModel.sample
