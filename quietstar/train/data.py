"""Training data: documents from text and JSONL files, tokenized once (cached on disk), cut into
windows of ``L`` tokens, served in a seeded order that a checkpoint can resume exactly.

* A plain-text file is one document; a JSONL file holds one document a line, in a text field;
  a folder stands for the ``.txt``, ``.md`` and ``.jsonl`` files under it.
* Token ids are cached per file under ``cache_dir``, keyed by the file's content, the text
  field and the tokenizer, so a second run starts at once.
* ``pack`` joins the documents, each followed by EOS, and cuts the stream into windows;
  ``crop`` takes one window per document at a seeded random offset (the authors' scheme;
  shorter documents are right-padded).
* Window ``p`` of the global order (``p`` counts every window any process has consumed) is
  window ``permutation(seed, p // n)[p % n]``: every process computes its own share of a step
  from the step number alone, so the data position of a checkpoint is its step.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from quietstar._checks import GENERATOR_SEED_MODULUS
from quietstar.model.quietstar_model import END_THOUGHT, START_THOUGHT
from quietstar.ops.linear_cross_entropy import IGNORE_INDEX

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl",)
# Below this many characters a corpus is tokenized in-process (starting workers costs more).
PARALLEL_MIN_CHARS = 1_000_000
CACHE_FORMAT = 2  # bump when the cached layout or what is cached changes


@dataclass(frozen=True)
class Document:
    """One document's text and where it came from (``file`` or ``file:line``)."""

    origin: str
    text: str


def find_files(paths: list[str | Path]) -> list[Path]:
    """The data files named by ``paths``: files as given, folders expanded (sorted).

    Raises:
        ValueError: a path that does not exist, or a folder with no data file in it.
    """
    if not paths:
        raise ValueError("data: no file or folder given")
    files = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES + JSONL_SUFFIXES)
            if not found:
                raise ValueError(f"data folder {str(path)!r} holds no {', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES)} file")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise ValueError(f"data file {str(path)!r} does not exist")
    return files


def reads_as_jsonl(path: Path) -> bool:
    """Whether a file is read as JSONL (a document a line) rather than as one text."""
    return path.suffix in JSONL_SUFFIXES


def read_documents(path: Path, text_field: str) -> list[Document]:
    """The documents of one file.

    Raises:
        ValueError: text that is not UTF-8, or a JSONL line that is not an object with a
            string ``text_field``, naming the file and line.
    """
    raw = path.read_bytes()
    if not reads_as_jsonl(path):
        try:
            return [Document(str(path), raw.decode("utf-8"))]
        except UnicodeDecodeError as error:
            raise ValueError(f"{path}: not UTF-8 text (byte {error.start})") from None
    documents = []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        origin = f"{path}:{number}"
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as error:
            raise ValueError(f"{origin}: not UTF-8 text (byte {error.start} of the line)") from None
        except json.JSONDecodeError as error:
            raise ValueError(f"{origin}: not valid JSON ({error.msg})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{origin}: a JSONL line must be an object, got {type(record).__name__}")
        if text_field not in record:
            raise ValueError(f"{origin}: no field {text_field!r} (fields: {', '.join(sorted(record))}); set --text-field")
        if not isinstance(record[text_field], str):
            raise ValueError(f"{origin}: field {text_field!r} must be a string, got {type(record[text_field]).__name__}")
        documents.append(Document(origin, record[text_field]))
    return documents


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything that decides how the tokenizer splits text."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    description = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{type(tokenizer).__name__}\n{description}".encode()).hexdigest()


def _thought_marker_ids(tokenizer) -> torch.Tensor:
    """The ids of the thought markers the tokenizer knows (a ``QuietStarModel`` adds them), int32."""
    added = tokenizer.get_added_vocab()
    return torch.tensor([added[t] for t in (START_THOUGHT, END_THOUGHT) if t in added], dtype=torch.int32)


def _tokenize(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


_WORKER_TOKENIZER = None


def _init_worker(tokenizer) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tokenizer


def _tokenize_in_worker(texts: list[str]) -> list[list[int]]:
    return _tokenize(_WORKER_TOKENIZER, texts)


def tokenize_texts(texts: list[str], tokenizer, workers: int) -> list[list[int]]:
    """Token ids of each text (no special tokens), in ``workers`` processes for large inputs."""
    if workers <= 0 or len(texts) < 2 or sum(map(len, texts)) < PARALLEL_MIN_CHARS:
        return _tokenize(tokenizer, texts)
    chunks = [texts[i::workers] for i in range(workers)]
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(tokenizer,)) as pool:
        parts = list(pool.map(_tokenize_in_worker, chunks))
    ids = [None] * len(texts)
    for offset, part in enumerate(parts):
        ids[offset::workers] = part
    return ids


def load_token_documents(
    paths: list[str | Path], tokenizer, text_field: str, cache_dir: str | Path | None, workers: int
) -> list[torch.Tensor]:
    """Token ids (int32 ``[n_i]``) of every document of ``paths``, from the cache when it
    holds them.

    Raises:
        ValueError: bad files (see ``find_files``, ``read_documents``), or no text at all.
    """
    fingerprint = tokenizer_fingerprint(tokenizer)
    cache = None if cache_dir is None else Path(cache_dir) / "tokens"
    markers = _thought_marker_ids(tokenizer)
    documents = []
    for path in find_files(paths):
        # How the file is read is part of the key: the same bytes as JSONL and as text are
        # different documents.
        how = f"jsonl\n{text_field}" if reads_as_jsonl(path) else "text"
        key = hashlib.sha256(f"{CACHE_FORMAT}\n{fingerprint}\n{how}\n".encode() + path.read_bytes()).hexdigest()
        cached = None if cache is None else cache / f"{key}.pt"
        if cached is not None and cached.is_file():
            stored = torch.load(cached, weights_only=True)
            documents.extend(stored["ids"].split(stored["lengths"].tolist()))
            logger.info("%s: token ids from the cache", path)
            continue
        read = read_documents(path, text_field)
        ids = [torch.tensor(t, dtype=torch.int32) for t in tokenize_texts([d.text for d in read], tokenizer, workers)]
        for document, tokens in zip(read, ids):
            if markers.numel() and torch.isin(tokens, markers).any():
                raise ValueError(
                    f"{document.origin}: the text holds {START_THOUGHT} or {END_THOUGHT}, which the tokenizer reads as "
                    "the model's thought markers; they may not appear in training or evaluation text"
                )
        if cached is not None:
            cache.mkdir(parents=True, exist_ok=True)
            lengths = torch.tensor([len(t) for t in ids], dtype=torch.int64)
            flat = torch.cat(ids) if ids else torch.zeros(0, dtype=torch.int32)
            partial = cached.with_suffix(f".{os.getpid()}.tmp")
            torch.save({"ids": flat, "lengths": lengths}, partial)
            partial.replace(cached)
        documents.extend(ids)
        logger.info("%s: %d documents, %d tokens", path, len(ids), sum(len(t) for t in ids))
    documents = [d for d in documents if len(d)]
    if not documents:
        raise ValueError(f"data {', '.join(map(str, paths))}: no text (every document is empty)")
    return documents


def generator_seed(value: int) -> int:
    """A seed derived from a run's ``--seed`` (per epoch, window, process) as a torch generator
    takes it: mod ``GENERATOR_SEED_MODULUS`` (64 bits), which ``seed * 1_000_003 * 1_000_033``
    passes from ``--seed`` 2e7 on; the seeds of smaller ``--seed`` values stay as they are."""
    return value % GENERATOR_SEED_MODULUS


def stream_seed(seed: int, stream: str, index: int = 0) -> int:
    """The seed of one random stream of a run other than the data's (``stream`` names it, such as
    ``"thoughts"``; ``index`` tells its copies apart, such as a process's rank): 64 bits of a hash
    of the three, so that it meets none of the seeds the data order derives arithmetically from
    ``--seed`` (the thoughts of rank ``r`` used to be drawn from the seed of epoch ``r``'s order)."""
    digest = hashlib.sha256(f"quietstar/{stream}/{seed}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def data_fingerprint(train: list[torch.Tensor], held_out: list[torch.Tensor]) -> str:
    """A hash of a run's training and held-out documents (their token ids, in order): what its
    window order and validation depend on besides the options, so that a resumed run can tell
    that its files still hold the text they held (a file added to a data folder, or edited,
    changes every permutation)."""
    digest = hashlib.sha256()
    for part in (train, held_out):
        digest.update(f"{len(part)} documents\n".encode())
        for document in part:
            digest.update(f"{len(document)}\n".encode())
            digest.update(document.to(torch.int32).contiguous().numpy())  # read in place
    return digest.hexdigest()


def split_documents(documents: list[torch.Tensor], fraction: float, seed: int) -> tuple[list, list]:
    """``(train, held_out)``: a seeded ``fraction`` of the documents held out, at least one and
    at most all but one (training keeps a document)."""
    if fraction <= 0:
        return documents, []
    if len(documents) < 2:
        raise ValueError(f"eval_fraction={fraction} needs at least 2 documents, the data has {len(documents)}")
    order = torch.randperm(len(documents), generator=torch.Generator().manual_seed(seed)).tolist()
    held = min(len(documents) - 1, max(1, round(fraction * len(documents))))
    held_out = set(order[:held])
    return [d for i, d in enumerate(documents) if i not in held_out], [d for i, d in enumerate(documents) if i in held_out]


@dataclass
class Batch:
    """``input_ids``, ``attention_mask`` (1 = real token) and ``labels`` (-100 = ignored),
    each ``[B, L]``."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def to(self, device: torch.device) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())


class TokenWindows:
    """Windows of ``seq_len`` tokens over tokenized documents, in a seeded order.

    Args:
        documents: int32 token ids of each document.
        seq_len: ``L``.
        packing: ``"pack"`` or ``"crop"`` (module docstring).
        eos_id: separator of packed documents.
        pad_id: filler of short cropped documents (masked out and ignored).
        seed: of the window order and the crop offsets.
        shuffle: visit windows in a seeded random order (off for evaluation).
    """

    def __init__(
        self, documents: list[torch.Tensor], seq_len: int, packing: str, eos_id: int | None, pad_id: int | None, seed: int,
        shuffle: bool = True,
    ) -> None:
        self.seq_len, self.packing, self.pad_id, self.seed, self.shuffle = seq_len, packing, pad_id, seed, shuffle
        if packing == "crop" and pad_id is None:
            raise ValueError("packing='crop' needs a pad token id (pad_id) to fill short windows; the tokenizer has none: "
                             "set tokenizer.pad_token, or use packing='pack'")
        if packing == "pack":
            if eos_id is None:
                raise ValueError("packing='pack' needs the tokenizer's EOS token to separate documents; use packing='crop'")
            separator = torch.tensor([eos_id], dtype=torch.int32)
            stream = torch.cat([piece for doc in documents for piece in (doc, separator)])
            if len(stream) < seq_len:
                raise ValueError(f"the data has {len(stream)} tokens, fewer than seq_len={seq_len}")
            count = len(stream) // seq_len
            self.windows = stream[: count * seq_len].view(count, seq_len)
        else:
            self.documents = documents
        self._orders: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return len(self.windows) if self.packing == "pack" else len(self.documents)

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            if self.shuffle:
                gen = torch.Generator().manual_seed(generator_seed(self.seed * 1_000_003 + epoch))
                self._orders = {epoch: torch.randperm(len(self), generator=gen).tolist()}
            else:
                self._orders = {epoch: list(range(len(self)))}
        return self._orders[epoch]

    def window(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids [L] int64, mask [L] int64)`` of window ``position`` of the global order."""
        epoch, offset = divmod(position, len(self))
        index = self._order(epoch)[offset]
        if self.packing == "pack":
            ids = self.windows[index].long()
            return ids, torch.ones_like(ids)
        doc = self.documents[index]
        if len(doc) > self.seq_len:
            gen = torch.Generator().manual_seed(generator_seed((self.seed * 1_000_003 + epoch) * 1_000_033 + index))
            start = int(torch.randint(0, len(doc) - self.seq_len + 1, (1,), generator=gen))
            doc = doc[start : start + self.seq_len]
        ids = torch.full((self.seq_len,), self.pad_id, dtype=torch.int64)
        mask = torch.zeros(self.seq_len, dtype=torch.int64)
        ids[: len(doc)] = doc.long()
        mask[: len(doc)] = 1
        return ids, mask

    def batch(self, positions: list[int]) -> Batch:
        """The windows at ``positions`` as one batch; padding is masked and ignored."""
        ids, mask = map(torch.stack, zip(*(self.window(p) for p in positions)))
        return Batch(ids, mask, ids.masked_fill(mask == 0, IGNORE_INDEX))


def step_positions(step: int, micro_step: int, grad_accum: int, rank: int, world: int, batch_size: int) -> list[int]:
    """Global window positions of one process's micro-batch: optimizer step ``step``, micro-step
    ``micro_step``; process ``rank`` of ``world`` takes the ``rank``-th ``batch_size`` of it, so
    ``world`` processes of batch ``b`` see what one process of batch ``world * b`` sees."""
    start = ((step * grad_accum + micro_step) * world + rank) * batch_size
    return list(range(start, start + batch_size))
