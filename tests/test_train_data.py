"""Training data: reading files, errors that name the file and line, the token cache, windows,
and the order that processes share."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import CORPUS, tiny_tokenizer

from quietstar.train.data import (
    TokenWindows,
    find_files,
    load_token_documents,
    read_documents,
    split_documents,
    step_positions,
)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def write_jsonl(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows), encoding="utf-8")
    return path


def test_text_files_are_one_document_and_jsonl_lines_one_each(tmp_path):
    (tmp_path / "a.txt").write_text("first document", encoding="utf-8")
    write_jsonl(tmp_path / "b.jsonl", [{"text": "one"}, {"text": "two", "other": 1}])
    (tmp_path / "ignored.bin").write_bytes(b"\x00")
    files = find_files([tmp_path])
    assert [f.name for f in files] == ["a.txt", "b.jsonl"]
    documents = [d for f in files for d in read_documents(f, "text")]
    assert [d.text for d in documents] == ["first document", "one", "two"]
    assert documents[2].origin.endswith("b.jsonl:2")


@pytest.mark.parametrize(
    "line,message",
    [
        ("[1, 2]", "b.jsonl:2: a JSONL line must be an object"),
        ('{"body": "x"}', "b.jsonl:2: no field 'text'"),
        ('{"text": 3}', "b.jsonl:2: field 'text' must be a string"),
        ("{not json", "b.jsonl:2: not valid JSON"),
    ],
)
def test_a_bad_jsonl_line_is_an_error_naming_file_and_line(tmp_path, line, message):
    path = write_jsonl(tmp_path / "b.jsonl", [{"text": "fine"}, line])
    with pytest.raises(ValueError, match=message):
        read_documents(path, "text")


def test_text_that_is_not_utf8_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt: not UTF-8"):
        read_documents(path, "text")
    bad_line = tmp_path / "c.jsonl"
    bad_line.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match="c.jsonl:2: not UTF-8"):
        read_documents(bad_line, "text")


def test_missing_paths_and_empty_corpora_are_errors(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="does not exist"):
        find_files([tmp_path / "nowhere.txt"])
    with pytest.raises(ValueError, match="holds no"):
        find_files([tmp_path])
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="no text"):
        load_token_documents([tmp_path / "empty.txt"], tokenizer, "text", None, workers=0)


def test_token_ids_are_cached_by_content_and_tokenizer(tmp_path, tokenizer):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS, encoding="utf-8")
    cache = tmp_path / "cache"
    first = load_token_documents([corpus], tokenizer, "text", cache, workers=0)
    assert len(list((cache / "tokens").iterdir())) == 1
    assert torch.equal(first[0], torch.tensor(tokenizer(CORPUS, add_special_tokens=False)["input_ids"], dtype=torch.int32))
    again = load_token_documents([corpus], tokenizer, "text", cache, workers=0)
    assert torch.equal(again[0], first[0])
    corpus.write_text(CORPUS + " More.", encoding="utf-8")  # new content: a new entry
    load_token_documents([corpus], tokenizer, "text", cache, workers=0)
    assert len(list((cache / "tokens").iterdir())) == 2


def test_the_same_bytes_read_as_jsonl_and_as_text_are_cached_apart(tmp_path, tokenizer):
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"text": "The quick brown fox."}, {"text": "A lazy dog."}])
    as_text = tmp_path / "rows.txt"
    as_text.write_bytes(rows.read_bytes())
    cache = tmp_path / "cache"
    assert len(load_token_documents([rows], tokenizer, "text", cache, workers=0)) == 2
    assert len(load_token_documents([as_text], tokenizer, "text", cache, workers=0)) == 1  # one text document


def test_text_holding_a_thought_marker_is_an_error_naming_file_and_line(tmp_path):
    from quietstar import QuietStarModel
    from helpers import tiny_causal_lm

    tokenizer = tiny_tokenizer()
    QuietStarModel(tiny_causal_lm("llama", vocab_size=len(tokenizer) + 2), tokenizer)  # adds the markers
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"text": "plain words"}, {"text": "a <|startthought|> inside"}])
    with pytest.raises(ValueError, match=r"rows\.jsonl:2: the text holds <\|startthought\|>"):
        load_token_documents([rows], tokenizer, "text", None, workers=0)


def test_worker_processes_tokenize_like_this_process(tokenizer, monkeypatch):
    import quietstar.train.data as data

    texts = [CORPUS[i:] for i in range(0, 60, 7)]
    monkeypatch.setattr(data, "PARALLEL_MIN_CHARS", 0)
    assert data.tokenize_texts(texts, tokenizer, workers=2) == data.tokenize_texts(texts, tokenizer, workers=0)


def docs(*lengths):
    return [torch.arange(n, dtype=torch.int32) + 10 * i for i, n in enumerate(lengths)]


def test_packing_joins_documents_with_eos_and_cuts_full_windows():
    windows = TokenWindows(docs(5, 6), seq_len=4, packing="pack", eos_id=99, pad_id=0, seed=0, shuffle=False)
    assert len(windows) == 3  # 5 + 1 + 6 + 1 = 13 tokens
    batch = windows.batch([0, 1, 2])
    assert batch.input_ids.tolist() == [[0, 1, 2, 3], [4, 99, 10, 11], [12, 13, 14, 15]]
    assert batch.attention_mask.all() and torch.equal(batch.labels, batch.input_ids)


def test_cropping_takes_one_seeded_window_per_document_and_pads_short_ones():
    windows = TokenWindows(docs(10, 3), seq_len=4, packing="crop", eos_id=None, pad_id=0, seed=1, shuffle=False)
    long, short = windows.window(0), windows.window(1)
    start = int(long[0][0])
    assert long[0].tolist() == list(range(start, start + 4)) and long[1].all()
    assert short[0].tolist() == [10, 11, 12, 0] and short[1].tolist() == [1, 1, 1, 0]
    assert windows.batch([1]).labels.tolist() == [[10, 11, 12, -100]]
    assert torch.equal(windows.window(0)[0], long[0])  # the same offset when asked again
    offsets = {int(windows.window(2 * epoch)[0][0]) for epoch in range(8)}  # a new offset each epoch
    assert len(offsets) > 1


def test_order_is_a_seeded_permutation_per_epoch():
    windows = TokenWindows(docs(40), seq_len=4, packing="pack", eos_id=99, pad_id=0, seed=3)
    n = len(windows)
    first = [int(windows.window(p)[0][0]) for p in range(n)]
    second = [int(windows.window(p)[0][0]) for p in range(n, 2 * n)]
    assert sorted(first) == sorted(second) and first != second
    again = TokenWindows(docs(40), seq_len=4, packing="pack", eos_id=99, pad_id=0, seed=3)
    assert [int(again.window(p)[0][0]) for p in range(n)] == first


def test_processes_split_the_global_batch_as_one_process_would_see_it():
    one = step_positions(step=3, micro_step=1, grad_accum=2, rank=0, world=1, batch_size=4)
    two = [p for rank in range(2) for p in step_positions(step=3, micro_step=1, grad_accum=2, rank=rank, world=2, batch_size=2)]
    assert one == two == [28, 29, 30, 31]


def test_held_out_split_is_seeded_and_disjoint():
    documents = docs(*range(1, 21))
    train, held = split_documents(documents, 0.2, seed=0)
    assert len(held) == 4 and len(train) == 16
    assert {int(d[0]) for d in train}.isdisjoint(int(d[0]) for d in held)
    assert [int(d[0]) for d in split_documents(documents, 0.2, seed=0)[1]] == [int(d[0]) for d in held]
    with pytest.raises(ValueError, match="at least 2 documents"):
        split_documents(docs(3), 0.5, seed=0)
    train, held = split_documents(docs(3, 4), 0.75, seed=0)  # round(1.5) = 2 would hold out both
    assert len(train) == 1 and len(held) == 1


def test_cropping_without_a_pad_token_is_an_error_naming_it():
    with pytest.raises(ValueError, match=r"packing='crop' needs a pad token id \(pad_id\)"):
        TokenWindows(docs(3), seq_len=4, packing="crop", eos_id=None, pad_id=None, seed=0)


def test_a_corpus_shorter_than_one_window_is_an_error():
    with pytest.raises(ValueError, match="fewer than seq_len"):
        TokenWindows(docs(3), seq_len=8, packing="pack", eos_id=99, pad_id=0, seed=0)
