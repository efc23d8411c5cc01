"""The zero-shot question sets of the paper, as the authors' code prompts them.

Each item is a prompt that ends in ``"A:"`` and the gold answer that follows it: a space, the
answer, a newline. GSM8K: ``"Q: {question}\\nA:"`` and the number after ``####`` in the worked
solution. CommonsenseQA: the question, then one line ``"({label}) {text}"`` per choice, then
``"A:"`` and the answer key. ``quietstar.train.evaluation`` scores the answer's tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

GSM8K_ANSWER_MARK = "####"
TASKS = ("gsm8k", "csqa")


@dataclass(frozen=True)
class AnswerItem:
    """One question: where it came from (``file:line``), the prompt up to ``"A:"`` and the gold
    answer text that follows it (``" 18\\n"``)."""

    origin: str
    prompt: str
    answer: str


def read_records(path: str | Path) -> list[tuple[str, dict]]:
    """``(file:line, record)`` for every non-empty line of a JSONL file.

    Raises:
        ValueError: a missing file, a line that is not a JSON object, or no record at all,
            naming the file (and line).
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"data: {str(path)!r} is a folder; give the JSONL file itself")
    if not path.is_file():
        raise ValueError(f"data file {str(path)!r} does not exist")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        if not line.strip():
            continue
        origin = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{origin}: not valid JSON ({error.msg})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{origin}: a line must be a JSON object, got {type(record).__name__}")
        records.append((origin, record))
    if not records:
        raise ValueError(f"{path}: no records (the file is empty)")
    return records


def _field(origin: str, record: dict, name: str, kind: type = str):
    if name not in record:
        raise ValueError(f"{origin}: no field {name!r} (fields: {', '.join(sorted(record))})")
    if not isinstance(record[name], kind):
        raise ValueError(f"{origin}: field {name!r} must be a {kind.__name__}, got {type(record[name]).__name__}")
    return record[name]


def gsm8k_item(origin: str, record: dict) -> AnswerItem:
    """A GSM8K row (``question``, ``answer`` ending in ``#### <number>``) as an item."""
    question = _field(origin, record, "question")
    solution = _field(origin, record, "answer")
    if GSM8K_ANSWER_MARK not in solution:
        raise ValueError(f"{origin}: field 'answer' has no final answer after {GSM8K_ANSWER_MARK!r}")
    final = solution.split(GSM8K_ANSWER_MARK)[-1].strip()
    if not final:
        raise ValueError(f"{origin}: field 'answer' is empty after {GSM8K_ANSWER_MARK!r}")
    if "\n" in final:  # text after the final answer would be scored as part of it
        raise ValueError(f"{origin}: field 'answer' must end with its final answer on one line after {GSM8K_ANSWER_MARK!r}")
    return AnswerItem(origin, f"Q: {question}\nA:", f" {final}\n")


def csqa_item(origin: str, record: dict) -> AnswerItem:
    """A CommonsenseQA row (``question``, ``choices.label``/``choices.text``, ``answerKey``)
    as an item."""
    question = _field(origin, record, "question")
    choices = _field(origin, record, "choices", dict)
    labels, texts = _field(origin, choices, "label", list), _field(origin, choices, "text", list)
    if not labels or len(labels) != len(texts):
        raise ValueError(f"{origin}: field 'choices' needs as many labels as texts (got {len(labels)} and {len(texts)})")
    if not all(isinstance(x, str) for x in labels + texts):
        raise ValueError(f"{origin}: field 'choices' must hold strings as labels and texts")
    if len(set(labels)) != len(labels):
        raise ValueError(f"{origin}: field 'choices' repeats a label ({labels})")
    key = _field(origin, record, "answerKey")
    if key not in labels:
        raise ValueError(f"{origin}: field 'answerKey' {key!r} is not one of the choice labels {labels}")
    lines = [f"Q: {question}"] + [f"({label}) {text}" for label, text in zip(labels, texts)]
    return AnswerItem(origin, "\n".join(lines) + "\nA:", f" {key}\n")


def read_items(task: str, paths: list[str | Path]) -> list[AnswerItem]:
    """Every item of ``paths`` for ``task`` (``gsm8k`` or ``csqa``), in file order."""
    build = {"gsm8k": gsm8k_item, "csqa": csqa_item}.get(task)
    if build is None:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if not paths:
        raise ValueError("data: no file given")
    return [build(origin, record) for path in paths for origin, record in read_records(path)]
