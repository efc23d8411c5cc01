"""`quietstar eval`: the one-pass evaluation equals the training forward, the zero-shot scoring
equals its definition computed by hand, the prompts match the authors', and bad input is named."""

from __future__ import annotations

import json
import math
from html.parser import HTMLParser

import pytest
import torch
from helpers import SHARED_DATA, relative_error, tiny_model_folder

from quietstar import QuietStarConfig
from quietstar.model.loaders import load_quietstar
from quietstar.train.cli import main
from quietstar.train.eval_data import AnswerItem, csqa_item, gsm8k_item, read_items
from quietstar.train.evaluation import (
    EvalOptions,
    answer_scores,
    decile_table,
    next_token_nll,
    perplexity,
    renormalised_log_probs,
    tokenize_item,
)
from quietstar.train.heatmap import heatmap_html, reward_heatmap


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory.mktemp("eval") / "model")


def thinking_model(folder, **config):
    qs = load_quietstar(folder, QuietStarConfig(thought_tokens=3, talk_tokens=3, **config)).eval()
    # A mixing head that mixes (its last layer starts near zero, where thinking equals base).
    torch.nn.init.normal_(qs.mixing_head.mlp[-1].weight, std=0.5, generator=torch.Generator().manual_seed(0))
    return qs


def batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 60, (2, 12), generator=gen)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, 9:] = False
    return ids, mask


@pytest.mark.parametrize("n_thoughts", [1, 2])
def test_one_pass_evaluation_equals_the_training_forward_for_its_thoughts(model_folder, n_thoughts):
    # In float64: rewards are differences of NLLs about a thousand times larger than
    # themselves, so in float32 the two passes' rounding (different GEMM shapes, which one
    # Xeon rounds differently) alone reaches 1e-4 of the rewards and of the policy loss.
    qs = thinking_model(model_folder, n_thoughts=n_thoughts).double()
    ids, mask = batch()
    labels = ids.masked_fill(~mask, -100)
    fast = qs.evaluate(ids, mask, labels, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tree = qs(ids, mask, labels, thoughts=fast.thoughts)
    sampled = qs.sample_thoughts(ids, mask, generator=torch.Generator().manual_seed(1))
    assert torch.equal(fast.thoughts, sampled)
    for field in ("nll_base", "nll_talk", "rewards", "mixing_weight", "nll_loss", "policy_loss"):
        assert relative_error(getattr(fast, field), getattr(tree, field)) < 1e-9, field


def test_evaluation_runs_the_base_with_the_first_step_and_the_steps_after_the_last_thought_token_as_one_pass(model_folder):
    from quietstar.model.attention import decoder_layers

    qs = thinking_model(model_folder, n_thoughts=2)
    ids, mask = batch()
    tokens_per_pass = []
    decoder_layers(qs.model)[0].register_forward_hook(lambda module, args, out: tokens_per_pass.append(args[0].shape[1]))
    qs.evaluate(ids, mask, generator=torch.Generator().manual_seed(1))
    t_len, chain = qs.config.thought_tokens, qs.config.chain_steps
    slot = 2 * 12  # N * L tokens per chain step
    # the base pass with the start token's step, the other sampling steps, then the rest at once
    assert tokens_per_pass == [12 + slot] + [slot] * (t_len - 1) + [slot * (chain - t_len)]


@pytest.mark.parametrize("mix", ["hidden", "logprobs"])
def test_next_token_nll_is_the_first_talk_nll_of_the_forward(model_folder, mix):
    qs = thinking_model(model_folder, n_thoughts=1, mix=mix)
    ids, mask = batch(1)
    base, thinking = next_token_nll(qs, ids, mask, torch.Generator().manual_seed(2))
    out = qs.evaluate(ids, mask, ids.masked_fill(~mask, -100), generator=torch.Generator().manual_seed(2))
    assert relative_error(base, out.nll_base[:, :-1]) < 1e-6
    assert relative_error(thinking, out.nll_talk[:, 0, :-1, 0]) < 1e-6
    assert (thinking - base).abs().max() > 1e-4  # the thought changes the prediction


def test_renormalised_probability_product_by_hand():
    logits = torch.tensor([[0.0, 1.0, 5.0, 2.0, -1.0], [3.0, 0.5, 0.0, 0.5, 9.0]])
    vocabulary = torch.tensor([1, 3, 4])  # id 2 (the most likely in row 0) is not an answer token
    logp = renormalised_log_probs(logits, vocabulary)
    p_row0_id3 = math.exp(2.0) / (math.exp(1.0) + math.exp(2.0) + math.exp(-1.0))
    p_row1_id1 = math.exp(0.5) / (math.exp(0.5) + math.exp(0.5) + math.exp(9.0))
    score = math.exp(logp[0, 1] + logp[1, 0])  # gold: id 3 then id 1
    assert score == pytest.approx(p_row0_id3 * p_row1_id1, rel=1e-6)


def test_answer_tokens_skip_a_lone_space_and_keep_a_joined_one():
    class Offsets:  # a tokenizer that joins the space to the answer: " 18" is one token
        def __call__(self, text, return_offsets_mapping):
            cut = text.index(" 18")
            return {"input_ids": [5, 6, 7], "offset_mapping": [(0, cut), (cut, cut + 3), (cut + 3, cut + 4)]}

    item = AnswerItem("x:1", "Q: q\nA:", " 18\n")
    assert tokenize_item(Offsets(), item).answer_positions == [1, 2]


def test_zero_shot_score_equals_the_base_models_own_probabilities(model_folder, tmp_path):
    qs = thinking_model(model_folder)
    items = [AnswerItem("f:1", "Q: the bank\nA:", " 12\n"), AnswerItem("f:2", "Q: a mall?\nA:", " 7\n")]
    report = answer_scores(qs, "gsm8k", items, EvalOptions(batch_size=2), progress=False)
    tokenized = [tokenize_item(qs.tokenizer, item) for item in items]
    vocabulary = sorted({t.ids[j] for t in tokenized for j in t.answer_positions})
    for record, t in zip(report["per_item"], tokenized):
        with torch.no_grad():
            logits = qs.model(torch.tensor([t.ids])).logits[0].double()
        probability = 1.0
        for j in t.answer_positions:
            row = torch.softmax(logits[j - 1, vocabulary], -1)
            probability *= float(row[vocabulary.index(t.ids[j])])
        assert record["score_base"] == pytest.approx(probability, rel=1e-4)
    assert report["score_thinking"] != report["score_base"]
    assert report["answer_vocabulary"] == len(vocabulary) and report["items"] == 2


def test_decile_table_groups_tokens_by_base_nll():
    base = torch.arange(100, dtype=torch.float32)
    thinking = base - (base >= 90).float()  # thinking helps only on the hardest tenth
    rows = decile_table(base, thinking)
    assert [r["tokens"] for r in rows] == [10] * 10
    assert [r["gain"] for r in rows] == [0.0] * 9 + [1.0]
    assert rows[-1]["helped_fraction"] == 1.0 and rows[0]["helped_fraction"] == 0.0


def test_decile_table_takes_more_tokens_than_torch_quantile_does():
    base = torch.rand(2**24 + 1, generator=torch.Generator().manual_seed(0))  # torch.quantile's limit is 2**24
    rows = decile_table(base, base)
    assert sum(r["tokens"] for r in rows) == base.numel()
    assert rows[0]["base_nll_from"] == float(base.min()) and rows[-1]["base_nll_to"] == float(base.max())
    small = torch.rand(1001, generator=torch.Generator().manual_seed(1)).double()
    expected = torch.quantile(small, torch.linspace(0, 1, 11, dtype=torch.float64)).tolist()
    assert [r["base_nll_from"] for r in decile_table(small, small)] == pytest.approx(expected[:-1], abs=1e-15)


def test_perplexity_report_has_overall_and_ten_decile_rows(model_folder):
    qs = thinking_model(model_folder)
    documents = [torch.randint(0, 60, (70,), generator=torch.Generator().manual_seed(3)), torch.arange(2, 35)]
    report = perplexity(qs, documents, EvalOptions(seq_len=16, batch_size=3), progress=False)
    # 70 tokens: 4 windows of 16 and one of 6; 33: two of 16 (a last single token predicts nothing)
    assert report["items"] == 5 + 2 and report["tokens"] == (4 * 15 + 5) + 2 * 15
    assert len(report["by_decile"]) == 10 and sum(r["tokens"] for r in report["by_decile"]) == report["tokens"]
    assert math.isclose(report["perplexity_base"], math.exp(report["score_base"]))
    limited = perplexity(qs, documents, EvalOptions(seq_len=16, limit=3), progress=False)
    assert limited["items"] == 3


def test_evaluation_leaves_the_model_as_it_was(model_folder):
    qs = thinking_model(model_folder, n_thoughts=2).train()
    qs.model.eval()  # as load_quietstar leaves a loaded base model: modes differ between modules
    config = qs.config
    documents = [torch.randint(0, 60, (40,), generator=torch.Generator().manual_seed(3))]
    items = [AnswerItem("f:1", "Q: one and one?\nA:", " 2\n"), AnswerItem("f:2", "Q: two and two?\nA:", " 4\n")]
    first = perplexity(qs, documents, EvalOptions(seq_len=16, thought_tokens=1), progress=False)
    assert first["thought_tokens"] == 1
    answer_scores(qs, "gsm8k", items, EvalOptions(thought_tokens=2), progress=False)
    reward_heatmap(qs, documents[0].tolist(), EvalOptions(seq_len=8, thought_tokens=1))
    assert qs.config is config and qs.training and not qs.model.training  # its own config (2 thoughts of 3 tokens) and modes
    # A later call without a thought length takes the model's own, not the last call's.
    assert perplexity(qs, documents, EvalOptions(seq_len=16), progress=False)["thought_tokens"] == 3


def test_a_report_records_the_batch_size_its_thoughts_were_drawn_in(model_folder):
    # The thoughts come from one random stream over the batches in turn, so the batch size is
    # part of what a report's thinking scores depend on.
    report = perplexity(thinking_model(model_folder), [torch.arange(2, 40)], EvalOptions(seq_len=16, batch_size=3), progress=False)
    assert report["batch_size"] == 3


requires_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"no shared data folder at {SHARED_DATA}")


@requires_shared
def test_gsm8k_prompt_of_the_first_test_row():
    item = read_items("gsm8k", [SHARED_DATA / "gsm8k" / "test.jsonl"])[0]
    assert item.prompt.startswith("Q: Janet\u2019s ducks lay 16 eggs per day.") and item.prompt.endswith("market?\nA:")
    assert item.answer == " 18\n"


@requires_shared
def test_csqa_prompt_of_the_first_validation_row():
    item = read_items("csqa", [SHARED_DATA / "commonsenseqa" / "dev_rand_split.jsonl"])[0]
    lines = item.prompt.split("\n")
    assert lines[0] == "Q: A revolving door is convenient for two direction travel, but it also serves as a security measure at a what?"
    assert lines[1:] == ["(A) bank", "(B) library", "(C) department store", "(D) mall", "(E) new york", "A:"]
    assert item.answer == " A\n"


@pytest.mark.parametrize(
    "task,line,message",
    [
        ("gsm8k", "not json", r"bad\.jsonl:2: not valid JSON"),
        ("gsm8k", '{"question": "q"}', r"bad\.jsonl:2: no field 'answer'"),
        ("gsm8k", '{"question": "q", "answer": "42"}', r"bad\.jsonl:2: field 'answer' has no final answer"),
        ("csqa", '{"question": "q", "choices": {"label": ["A"], "text": ["x"]}, "answerKey": "B"}', r"bad\.jsonl:2: field 'answerKey'"),
        ("csqa", '{"question": "q", "choices": {"label": ["A", "B"], "text": ["x"]}, "answerKey": "A"}', r"bad\.jsonl:2: field 'choices'"),
        ("csqa", '{"question": "q", "choices": {"label": ["A", "B"], "text": ["x", null]}, "answerKey": "A"}', r"bad\.jsonl:2: field 'choices' must hold strings"),
        ("csqa", '{"question": "q", "choices": {"label": ["A", "A"], "text": ["x", "y"]}, "answerKey": "A"}', r"bad\.jsonl:2: field 'choices' repeats a label"),
        ("gsm8k", '{"question": "q", "answer": "so #### 18\\nThe answer is 18."}', r"bad\.jsonl:2: field 'answer' must end with its final answer on one line"),
    ],
)
def test_bad_rows_are_named_by_file_line_and_field(tmp_path, task, line, message):
    good = {"gsm8k": '{"question": "q", "answer": "so #### 4"}',
            "csqa": '{"question": "q", "choices": {"label": ["A"], "text": ["x"]}, "answerKey": "A"}'}[task]
    path = tmp_path / "bad.jsonl"
    path.write_text(good + "\n" + line + "\n")
    with pytest.raises(ValueError, match=message):
        read_items(task, [path])


def test_a_folder_of_question_files_is_an_error_naming_it(tmp_path):
    with pytest.raises(ValueError, match=r"is a folder; give the JSONL file itself"):
        read_items("gsm8k", [tmp_path])


def test_an_empty_question_file_is_an_error(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match=r"empty\.jsonl: no records"):
        read_items("csqa", [tmp_path / "empty.jsonl"])


def test_prompt_builders_take_one_row():
    assert gsm8k_item("f:1", {"question": "2+2?", "answer": "4 #### 4"}).answer == " 4\n"
    assert csqa_item("f:1", {"question": "q", "choices": {"label": ["A", "B"], "text": ["x", "y"]}, "answerKey": "B"}).prompt == "Q: q\n(A) x\n(B) y\nA:"


class _Spans(HTMLParser):
    def __init__(self):
        super().__init__()
        self.spans = []

    def handle_starttag(self, tag, attrs):
        if tag == "span":
            self.spans.append(dict(attrs))


def test_heatmap_page_has_one_coloured_span_per_token(model_folder):
    qs = thinking_model(model_folder)
    ids = qs.tokenizer.encode("the bank and the mall are open\nyes")
    heatmap = reward_heatmap(qs, ids, EvalOptions())
    parser = _Spans()
    parser.feed(heatmap_html(heatmap))
    assert len(parser.spans) == len(ids) == len(heatmap["rewards"])
    assert all("rgba(" in span["style"] for span in parser.spans)
    # Each coloured token's reward covers K tokens: the last K, which fewer follow, are not judged.
    talk = heatmap["talk_tokens"]
    assert talk > 1 and heatmap["rewards"][-talk:] == [None] * talk
    assert all(isinstance(r, float) for r in heatmap["rewards"][:-talk])
    assert "thought:" in parser.spans[0]["title"]


def test_quietstar_eval_end_to_end(model_folder, tmp_path, capsys):
    text = tmp_path / "held_out.txt"
    text.write_text("the bank and the mall are open on monday and the library is not. " * 6)
    questions = tmp_path / "gsm8k.jsonl"
    questions.write_text("\n".join(json.dumps({"question": f"what is {a} and {a}?", "answer": f"so #### {2 * a}"}) for a in range(1, 6)))
    common = ["--model", str(model_folder), "--thought-tokens", "2", "--batch-size", "2", "--seed", "1"]
    assert main(["eval", "perplexity", "--data", str(text), "--seq-len", "24", "--out", str(tmp_path / "ppl.json"), *common]) == 0
    report = json.loads((tmp_path / "ppl.json").read_text())
    assert report["task"] == "perplexity" and len(report["by_decile"]) == 10 and report["thought_tokens"] == 2
    assert "decile of base NLL" in capsys.readouterr().out
    assert main(["eval", "gsm8k", "--data", str(questions), "--limit", "3", "--out", str(tmp_path / "g.json"), *common]) == 0
    report = json.loads((tmp_path / "g.json").read_text())
    assert report["items"] == 3 and 0 < report["score_base"] < 1 and 0 < report["score_thinking"] < 1
    assert main(["eval", "heatmap", "--data", str(text), "--seq-len", "20", "--out", str(tmp_path / "h.html"), *common]) == 0
    assert (tmp_path / "h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(json.loads((tmp_path / "h.json").read_text())["tokens"]) == 20


def test_quietstar_eval_names_a_bad_option_and_exits_2(model_folder, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("some text")
    assert main(["eval", "perplexity", "--model", str(model_folder), "--data", str(text), "--batch-size", "0"]) == 2
    assert "batch_size" in capsys.readouterr().err
    assert main(["eval", "gsm8k", "--model", str(model_folder), "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err


@pytest.mark.parametrize(
    "options,message",
    [(["--out", "page.json"], "--out: heatmap writes FILE.html"), (["--out", "page.png"], "--out: heatmap writes FILE.html"),
     (["--limit", "2", "--out", "page.html"], "--limit: heatmap shows one text")],
)
def test_heatmap_refuses_an_out_its_own_files_would_overwrite_and_a_limit(model_folder, tmp_path, capsys, options, message):
    text = tmp_path / "t.txt"
    text.write_text("some text to show")
    options = [str(tmp_path / o) if o.startswith("page.") else o for o in options]
    assert main(["eval", "heatmap", "--model", str(model_folder), "--data", str(text), *options]) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.glob("page.*"))


def test_heatmap_makes_the_folder_of_its_page(model_folder, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("some text to show")
    page = tmp_path / "new" / "folder" / "page.html"
    assert main(["eval", "heatmap", "--model", str(model_folder), "--data", str(text), "--seq-len", "6", "--out", str(page)]) == 0
    assert page.read_text().startswith("<") and page.with_suffix(".json").is_file()


@pytest.mark.parametrize(
    "document,message",
    [
        (torch.arange(10).view(1, 10), r"documents\[1\] must have 1 dimensions"),  # was dropped silently
        (torch.arange(10).float() + 0.7, r"documents\[1\] must have dtype"),  # was truncated silently
        ([1, 2, 3], r"documents\[1\] must be a torch.Tensor"),
    ],
)
def test_perplexity_refuses_documents_that_are_not_token_id_vectors(model_folder, document, message):
    qs = thinking_model(model_folder)
    with pytest.raises(ValueError, match=message):
        perplexity(qs, [torch.arange(12), document], EvalOptions(seq_len=8, thought_tokens=1), progress=False)
