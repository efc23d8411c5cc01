"""``TrainConfig``: every option of a training run, with the authors' defaults (SPEC section 3).

A run's options come from three places, later ones winning: these defaults, a YAML file
(``--config``; keys are the field names, with ``_`` or ``-``), and command-line flags. The
resolved options are written to ``OUT/config.yaml`` and into every checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from quietstar._checks import check_int, check_seed
from quietstar.model.config import MIX_MODES, QuietStarConfig

DTYPES = ("float32", "bf16")
PACKING = ("pack", "crop")
LR_SCHEDULES = ("constant", "linear", "cosine")
CHECKPOINTING = ("auto", "on", "off")


def option(default, help: str):
    """A ``TrainConfig`` field with its ``--help`` text."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Options of ``quietstar train``, one field per flag (``seq_len`` is ``--seq-len``); each
    field's ``metadata["help"]`` is its description (``quietstar train --help`` prints them)."""

    model: str = option("", "a Hugging Face model folder, a QuietStarModel checkpoint or a .gguf file")
    data: list[str] = option([], "training text: plain-text files (a document each), JSONL files (a document a line, in --text-field) or folders of them")
    out: str = option("", "the run's folder: metrics.jsonl, config.yaml, checkpoint-STEP/")
    eval_data: list[str] = option([], "held-out files for validation (instead of --eval-fraction)")
    eval_fraction: float = option(0.0, "share of the training documents held out for validation")
    text_field: str = option("text", "the JSONL field that holds a document's text")
    packing: str = option("pack", "pack: documents joined with EOS and cut into windows; crop: one random window per document (the authors' scheme; short ones padded)")
    seq_len: int = option(256, "tokens per training window (L)")
    batch_size: int = option(1, "windows per process per micro-step")
    grad_accum: int = option(8, "micro-steps per optimizer step (global batch = batch-size x grad-accum x processes)")
    max_steps: int = option(1000, "optimizer steps of the run")
    lr: float = option(1e-6, "AdamW learning rate (the authors')")
    weight_decay: float = option(0.001, "AdamW weight decay on matrices (none on biases, norms and the meta-token embeddings)")
    warmup_steps: int = option(20, "steps of linear warm-up")
    max_grad_norm: float = option(1.0, "gradient clipping")
    adam_beta1: float = option(0.9, "AdamW beta1")
    adam_beta2: float = option(0.999, "AdamW beta2")
    adam_eps: float = option(1e-8, "AdamW epsilon")
    lr_schedule: str = option("constant", "after warm-up: constant (the authors' 100,000-step linear decay barely moves), or linear / cosine decay to 0 at --max-steps")
    thought_tokens: int = option(9, "sampled thought tokens per position (T)")
    talk_tokens: int = option(4, "true tokens each thought is judged on (K)")
    n_thoughts: int = option(2, "thoughts per position (their mean reward is the baseline)")
    policy_weight: float = option(1e6, "weight of the REINFORCE loss (beta)")
    sampling_temperature: float = option(1.0, "temperature of thought sampling")
    policy_temperature: float = option(3.0, "temperature of the REINFORCE log-probabilities (tau)")
    base_loss_weight: float = option(0.5, "weight of the no-thought NLL in the language-model loss")
    mix: str = option("hidden", "hidden: the mixing weight mixes hidden states (the authors' code); logprobs: a sigmoid weight mixes log-probabilities (the paper)")
    gradient_checkpointing: str = option("auto", "on: recompute the tree pass's decoder layers in the backward (less memory, one more forward); off: keep their activations; auto: keep them when they fit in half the free memory")
    dtype: str = option("float32", "float32, or bf16: bfloat16 autocast with float32 master weights")
    seed: int = option(0, "seed of data order, thought sampling and initialisation")
    deterministic: bool = option(False, "only deterministic kernels (torch.use_deterministic_algorithms), so that on CUDA a run and its resume repeat bit for bit; slower. CPU runs repeat without it")
    cpu_caching_allocator: bool = option(True, "on CPU, keep freed tensors of 64 KiB and more for reuse instead of handing them back to the system, so a step does not fault its activations' pages in again (needs the native extension; without it PyTorch's allocator stays)")
    save_every: int = option(100, "checkpoint every N steps (0: only at the end and on SIGINT/SIGTERM)")
    keep: int = option(3, "checkpoints to keep (the newest)")
    eval_every: int = option(0, "validate every N steps (0: never)")
    eval_batches: int = option(8, "batches of held-out windows per validation")
    log_every: int = option(1, "refresh the progress bar every N steps (metrics.jsonl gets every step)")
    resume: bool = option(False, "continue from the newest checkpoint in --out")
    fsdp: bool = option(False, "shard parameters, gradients and optimizer state over the processes (FSDP2, one unit per decoder layer) instead of replicating them (DDP)")
    tokenizer_workers: int = option(2, "processes that tokenize a large corpus (0: this process)")
    cache_dir: str = option(str(Path.home() / ".cache" / "quietstar"), "where token ids are cached, keyed by file content and tokenizer")
    device: str = option("auto", "auto (CUDA when available), cpu or cuda")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first option that is out of range."""
        if isinstance(self.gradient_checkpointing, bool):  # YAML 1.1 reads on / off / true / false as bools
            self.gradient_checkpointing = "on" if self.gradient_checkpointing else "off"
        self._check_types()
        positive = ("batch_size", "grad_accum", "max_steps", "keep", "eval_batches", "log_every")
        for name in positive:
            check_int(name, getattr(self, name), minimum=1)
        check_int("seq_len", self.seq_len, minimum=2)  # one token predicting the next, at least
        for name in ("warmup_steps", "save_every", "eval_every", "tokenizer_workers"):
            check_int(name, getattr(self, name), minimum=0)
        check_seed("seed", self.seed)
        for name in ("lr", "max_grad_norm", "adam_eps"):
            _check_float(name, getattr(self, name), minimum=0.0, strict=True)
        _check_float("weight_decay", self.weight_decay, minimum=0.0)
        for name in ("adam_beta1", "adam_beta2", "eval_fraction"):
            value = getattr(self, name)
            _check_float(name, value, minimum=0.0)
            if value >= 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value!r}")
        checks = (("dtype", DTYPES), ("packing", PACKING), ("lr_schedule", LR_SCHEDULES), ("mix", MIX_MODES),
                  ("gradient_checkpointing", CHECKPOINTING))
        for name, allowed in checks:
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.eval_data and self.eval_fraction:
            raise ValueError("give eval_data or eval_fraction, not both")
        self.quietstar_config()  # its own checks (thought_tokens, talk_tokens, ...)

    def _check_types(self) -> None:
        """Paths, switches and file lists of the right kind (a YAML ``resume: "no"`` would be
        true, ``data: 5`` would fail deep in the run); paths (``os.PathLike``) become strings."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type == "bool" and not isinstance(value, bool):
                raise ValueError(f"{f.name} must be true or false, got {value!r}")
            if f.type == "str" and not isinstance(value, str):
                if not isinstance(value, os.PathLike):
                    raise ValueError(f"{f.name} must be a string, got {value!r}")
                setattr(self, f.name, os.fspath(value))
            if f.type == "list[str]":
                if not isinstance(value, list) or not all(isinstance(v, (str, os.PathLike)) for v in value):
                    raise ValueError(f"{f.name} must be a list of paths, got {value!r}")
                setattr(self, f.name, [os.fspath(v) for v in value])

    def model_checkpointing(self) -> bool | str:
        """``gradient_checkpointing`` as ``QuietStarModel`` takes it."""
        return {"auto": "auto", "on": True, "off": False}[self.gradient_checkpointing]

    def quietstar_config(self, base: QuietStarConfig | None = None) -> QuietStarConfig:
        """The ``QuietStarConfig`` these options describe: ``base`` (a checkpoint's own; default:
        the defaults) with the thinking options this config has (``thought_tokens``, ``mix``, ...);
        the ones it has none for (``clamp_negative_rewards``, ``meta_token_scale``) stay the
        base's."""
        names = {f.name for f in dataclasses.fields(QuietStarConfig)}
        return dataclasses.replace(base or QuietStarConfig(), **{k: v for k, v in dataclasses.asdict(self).items() if k in names})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> TrainConfig:
        """Build from a mapping with field names (``-`` or ``_``); unknown keys are an error
        naming ``source``."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        clean = {}
        for key, value in values.items():
            name = str(key).replace("-", "_")
            if name not in fields:
                raise ValueError(f"{source}: unknown option {key!r}; known: {', '.join(sorted(fields))}")
            clean[name] = value
        for name in ("data", "eval_data"):
            if isinstance(clean.get(name), str):
                clean[name] = [clean[name]]
        for name, value in clean.items():
            # YAML 1.1 reads 1e-5 (no dot) as a string: a number written so is still one.
            if fields[name].type == "float" and isinstance(value, str):
                try:
                    clean[name] = float(value)
                except ValueError:
                    pass  # validate names the option
        return cls(**clean)

    @classmethod
    def from_yaml(cls, path: str | Path) -> dict:
        """The options in a YAML file (a mapping), unvalidated: merge flags over it, then build."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {str(path)!r} does not exist")
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as error:
            raise ValueError(f"config file {str(path)!r} is not valid YAML: {error}") from None
        if values is None:
            return {}
        if not isinstance(values, dict):
            raise ValueError(f"config file {str(path)!r} must hold a mapping of options, got {type(values).__name__}")
        return values

    def write_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False), encoding="utf-8")


def _check_float(name: str, value: object, minimum: float, strict: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < minimum or (strict and value == minimum):
        relation = ">" if strict else ">="
        raise ValueError(f"{name} must be a finite number {relation} {minimum}, got {value!r}")
