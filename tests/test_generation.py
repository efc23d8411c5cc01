"""QuietStarModel.generate against a slow per-token, per-row, cache-free reference."""

from __future__ import annotations

import re

import pytest
import torch
from helpers import ARCHITECTURES, quietstar_model, tiny_causal_lm, tiny_tokenizer

from quietstar import QuietStarConfig, QuietStarModel
from quietstar.model.sampling import head_logits


def make_model(mix="hidden", tokenizer=None):
    return quietstar_model(tokenizer=tokenizer, thought_tokens=3, talk_tokens=2, n_thoughts=1, mix=mix)


def left_padded_prompts(length=6):
    ids = torch.randint(0, 97, (3, length), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    mask[2, : length - 1] = 0
    return ids, mask


@torch.no_grad()
def generate_slowly(qs, prompt: torch.Tensor, max_new_tokens: int):
    """One row, no padding, no cache: recompute the whole sequence for every token."""
    weight, bias = qs.lm_head

    def last_hidden(embeds):
        positions = torch.arange(embeds.shape[0])[None]
        return qs.model.model(inputs_embeds=embeds[None], position_ids=positions).last_hidden_state[0, -1]

    def greedy(hidden):
        return head_logits(hidden[None], weight, bias, qs.masked_vocab).argmax(-1)[0]

    text = prompt.clone()
    thoughts = []
    for _ in range(max_new_tokens):
        h_base = last_hidden(qs.embed(text))
        chain = [qs.meta_embedding(0)]
        thought = []
        for _ in range(qs.config.thought_tokens):
            token = greedy(last_hidden(torch.cat([qs.embed(text), torch.stack(chain)])))
            thought.append(token)
            chain.append(qs.embed(token))
        chain.append(qs.meta_embedding(1))
        h_talk = last_hidden(torch.cat([qs.embed(text), torch.stack(chain)]))
        w = qs.mixing_head(h_base, h_talk)
        if qs.config.mix == "hidden":
            token = greedy((1 - w) * h_base + w * h_talk)
        else:
            logp = (1 - w) * torch.log_softmax(head_logits(h_base[None], weight, bias, qs.masked_vocab), -1)
            logp = logp + w * torch.log_softmax(head_logits(h_talk[None], weight, bias, qs.masked_vocab), -1)
            token = logp.argmax(-1)[0]
        text = torch.cat([text, token[None]])
        thoughts.append(torch.stack(thought))
    return text[len(prompt) :], torch.stack(thoughts)


@pytest.mark.parametrize("mix", ["hidden", "logprobs"])
def test_batched_generation_equals_slow_per_token_reference(mix):
    qs = make_model(mix)
    ids, mask = left_padded_prompts()
    out = qs.generate(ids, mask, max_new_tokens=4, do_sample=False, sample_thoughts=False, return_thoughts=True)
    assert out.sequences.shape == (3, 10) and out.thoughts.shape == (3, 4, 3)
    assert torch.equal(out.sequences[:, :6], ids)
    for row in range(3):
        tokens, thoughts = generate_slowly(qs, ids[row][mask[row].bool()], 4)
        assert torch.equal(out.sequences[row, 6:], tokens), row
        assert torch.equal(out.thoughts[row], thoughts), row


def test_tokens_known_together_share_a_pass_t_plus_one_passes_per_new_token():
    """The last thought token goes with the end token and each drawn token with the next start
    token: after the prompt and the first start token, T + 1 passes of the decoder per token."""
    from quietstar.model.attention import decoder_layers

    qs = make_model()
    ids, mask = left_padded_prompts()
    tokens_per_pass = []
    decoder_layers(qs.model)[0].register_forward_hook(lambda module, args, out: tokens_per_pass.append(args[0].shape[1]))
    qs.generate(ids, mask, max_new_tokens=4, generator=torch.Generator().manual_seed(0))
    t_len = qs.config.thought_tokens
    assert tokens_per_pass[:2] == [6, 1]  # the prompt, the first start token
    assert len(tokens_per_pass) == 2 + (t_len + 1) * 4 - 1
    assert sum(tokens_per_pass) == 6 + (t_len + 3) * 4 - 1
    tokens_per_pass.clear()
    out = qs.generate(ids, mask, max_new_tokens=0)
    assert tokens_per_pass == [6] and torch.equal(out.sequences, ids)  # no thought for no token


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_first_generated_token_thinks_as_the_tree_pass_does_with_each_layers_window(architecture):
    """Greedy thoughts and the first token of ``generate`` equal what the tree rule gives at the
    prompt's last position (``next_token_states``), on models whose layers have sliding windows
    (Mistral), mix windowed and full layers (Qwen2) or have none; the window is shorter than
    the prompt."""
    qs = quietstar_model(architecture, thought_tokens=3, talk_tokens=2, n_thoughts=1)
    sample = qs.sample
    qs.sample = lambda hidden, generator=None, greedy=False, logits_out=None: sample(hidden, generator, True, logits_out)
    ids, mask = left_padded_prompts(length=12)
    out = qs.generate(ids, mask, max_new_tokens=1, do_sample=False, sample_thoughts=False, return_thoughts=True)
    h_base, h_talk, w, thoughts = qs.next_token_states(ids, mask)
    assert torch.equal(out.thoughts[:, 0], thoughts[:, 0, -1])
    mixed = (1 - w[:, 0, -1, None]) * h_base[:, -1] + w[:, 0, -1, None] * h_talk[:, 0, -1]
    expected = head_logits(mixed, *qs.lm_head, qs.masked_vocab).argmax(-1)
    assert torch.equal(out.sequences[:, -1], expected)


def test_sampled_generation_is_reproducible():
    qs = make_model()
    ids, mask = left_padded_prompts()
    runs = [qs.generate(ids, mask, max_new_tokens=3, generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    assert runs[0].thoughts is None


class TokenizerWithPaddedVocabulary:
    """A stand-in tokenizer whose new special tokens land inside the model's (padded) vocabulary,
    as with Qwen's tokenizers, so the meta tokens are real lm_head rows that must be masked."""

    def __init__(self, first_free_id: int):
        self.vocab = {"---": 5}
        self.next_id = first_free_id

    def get_vocab(self):
        return dict(self.vocab)

    def add_tokens(self, tokens, special_tokens=False):
        for token in tokens:
            self.vocab[token] = self.next_id
            self.next_id += 1

    def convert_tokens_to_ids(self, token):
        return self.vocab[token]

    def encode(self, text, add_special_tokens=False):
        return [self.vocab[text]]


def test_meta_tokens_inside_the_vocabulary_are_never_emitted_or_thought():
    qs = make_model(tokenizer=TokenizerWithPaddedVocabulary(first_free_id=95))
    assert qs.meta_token_ids == (95, 96) and qs.masked_vocab.tolist() == [95, 96]
    with torch.no_grad():  # make the meta tokens the most likely tokens at most positions
        qs.lm_head[0][95:] = 10 * qs.model.model.norm.weight.sign()
    ids, mask = left_padded_prompts()
    out = qs.generate(ids, mask, max_new_tokens=3, return_thoughts=True, generator=torch.Generator().manual_seed(0))
    assert not torch.isin(out.sequences[:, 6:], qs.masked_vocab).any()
    assert not torch.isin(out.thoughts, qs.masked_vocab).any()
    train = qs(ids, mask)
    assert not torch.isin(train.thoughts, qs.masked_vocab).any()
    torch.testing.assert_close(qs.meta_embedding(0), qs.model.get_input_embeddings().weight[5])


def test_generate_rejects_right_padding():
    qs = make_model()
    ids, mask = left_padded_prompts()
    with pytest.raises(ValueError, match="left padding"):
        qs.generate(ids, mask.flip(-1), max_new_tokens=1)


def test_eos_ends_a_row():
    qs = make_model()
    ids, mask = left_padded_prompts()
    first = qs.generate(ids, mask, max_new_tokens=1, do_sample=False, sample_thoughts=False).sequences[:, -1]
    pad = (int(first[0]) + 1) % 97
    options = dict(do_sample=False, sample_thoughts=False, eos_token_id=int(first[0]), pad_token_id=pad)
    out = qs.generate(ids, mask, max_new_tokens=3, **options)
    assert out.sequences[0, 6] == first[0] and (out.sequences[0, 7:] == pad).all()
    with pytest.raises(ValueError, match="pad_token_id"):
        qs.generate(ids, mask, max_new_tokens=1, pad_token_id=-1)


def test_any_of_several_eos_ids_ends_a_row_as_hugging_faces_lists_do():
    qs = make_model()
    ids, mask = left_padded_prompts()
    greedy = dict(do_sample=False, sample_thoughts=False)
    first = qs.generate(ids, mask, max_new_tokens=1, **greedy).sequences[:, -1]
    other = (int(first[0]) + 1) % 97
    pad = (int(first[0]) + 2) % 97
    out = qs.generate(ids, mask, max_new_tokens=3, eos_token_id=[other, int(first[0])], pad_token_id=pad, **greedy)
    assert out.sequences[0, 6] == first[0] and (out.sequences[0, 7:] == pad).all()
    for bad in ([], [1, -1], "2", 1.0, True):
        with pytest.raises(ValueError, match=r"eos_token_id must be a token id in \[0, 97\), a non-empty sequence"):
            qs.generate(ids, mask, max_new_tokens=1, eos_token_id=bad)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32])
def test_prompts_of_any_integer_dtype_generate_as_int64_ones(dtype):
    qs = make_model()
    ids, mask = left_padded_prompts()
    greedy = dict(max_new_tokens=2, do_sample=False, sample_thoughts=False)
    out = qs.generate(ids.to(dtype), mask, **greedy).sequences
    assert out.dtype == torch.long and torch.equal(out, qs.generate(ids, mask, **greedy).sequences)


def test_generate_rejects_prompts_it_cannot_embed():
    qs = make_model()
    ids, mask = left_padded_prompts()
    with pytest.raises(ValueError, match=r"input_ids must be token ids in \[0, 97\)"):
        qs.generate(ids + 97, mask, max_new_tokens=1)
    with pytest.raises(ValueError, match=r"input_ids must be \[B, P\] prompts with B, P >= 1, got \(3, 0\)"):
        qs.generate(ids[:, :0], mask[:, :0], max_new_tokens=1)


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(do_sample="no"), "do_sample must be True or False, got 'no'"),
        (dict(return_thoughts=1), "return_thoughts must be True or False, got 1"),
        (dict(generator=0), "generator must be a torch.Generator or None, got int"),
    ],
)
def test_generate_names_an_option_of_the_wrong_kind(options, message):
    qs = make_model()
    ids, mask = left_padded_prompts()
    with pytest.raises(ValueError, match=re.escape(message)):
        qs.generate(ids, mask, max_new_tokens=1, **options)


def test_an_attention_mask_of_other_values_than_0_and_1_is_refused():
    qs = make_model()
    ids, mask = left_padded_prompts()
    for call in (lambda m: qs.generate(ids, m, max_new_tokens=1), lambda m: qs(ids, m)):
        with pytest.raises(ValueError, match=r"attention_mask must hold only 0 \(padding\) and 1"):
            call(mask.float() * 0.5 + 0.5)


@pytest.mark.parametrize("do_sample", [False, True])
def test_a_saturated_mixing_weight_never_emits_a_thought_marker(do_sample):
    """mix="logprobs" with the markers inside the lm_head's rows (a padded vocabulary): at a
    mixing weight of exactly 1 one term is 0 * -inf at their ids; they must stay -inf, not NaN
    (which greedy argmax picked and sampling refused)."""
    tokenizer = tiny_tokenizer()
    model = tiny_causal_lm("llama", vocab_size=len(tokenizer) + 8)
    qs = QuietStarModel(model, tokenizer, QuietStarConfig(mix="logprobs", n_thoughts=1, thought_tokens=2)).eval()
    assert set(qs.meta_token_ids) <= set(qs.masked_vocab.tolist())
    with torch.no_grad():
        qs.mixing_head.mlp[-1].weight.fill_(1e4)  # a confident head: its sigmoid is exactly 1.0
    ids = torch.tensor([tokenizer("The quick brown fox")["input_ids"]])
    assert qs.next_token_states(ids)[2][0, 0, -1].item() == 1.0
    out = qs.generate(ids, max_new_tokens=6, do_sample=do_sample, generator=torch.Generator().manual_seed(0))
    new = out.sequences[0, ids.shape[1] :].tolist()
    assert not set(new) & set(qs.meta_token_ids)
