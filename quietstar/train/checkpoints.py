"""Training checkpoints that lose nothing: ``OUT/checkpoint-STEP/`` holds the model as
``QuietStarModel.save_pretrained`` writes it, plus the optimizer and scheduler state, the step
(which is also the data position), every process's random generators (thought sampling
included) and the run's options.

A checkpoint is written into a hidden ``.checkpoint-STEP.partial`` folder and renamed when
complete, so a kill while saving leaves the previous checkpoints intact; only the newest
``keep`` are kept. Sharded (FSDP2) and replicated (DDP) models are gathered into one full state
dict on the first process, so a checkpoint reloads with any number of processes.
"""

from __future__ import annotations

import logging
import random
import re
import shutil
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from quietstar.model.checkpoint import read_state_dict, save_pretrained
from quietstar.train.config import TrainConfig
from quietstar.train.distributed import ProcessGroup, barrier

logger = logging.getLogger(__name__)

PREFIX = "checkpoint-"
TRAINER_STATE = "trainer_state.pt"
TRAIN_CONFIG = "train_config.yaml"
# Options that may change when a run resumes; any other must match the checkpoint's.
RESUMABLE_CHANGES = {"max_steps", "save_every", "keep", "eval_every", "eval_batches", "log_every", "resume",
                     "tokenizer_workers", "cache_dir", "out"}


def rng_file(rank: int | str) -> str:
    return f"rng-rank{rank}.pt"


def list_checkpoints(out: str | Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of the complete checkpoints in ``out``, oldest first."""
    found = []
    for path in Path(out).glob(f"{PREFIX}*"):
        match = re.fullmatch(rf"{PREFIX}(\d+)", path.name)
        if match and (path / TRAINER_STATE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def save_checkpoint(
    out: Path, step: int, qs, module, optimizer, scheduler, generator: torch.Generator, config: TrainConfig,
    group: ProcessGroup,
) -> Path:
    """Write ``OUT/checkpoint-STEP`` (every process must call this); returns its path."""
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(module, options=full)
    optimizer_state = get_optimizer_state_dict(module, optimizer, options=full)
    partial = out / f".{PREFIX}{step}.partial"
    final = out / f"{PREFIX}{step}"
    if group.is_main:
        shutil.rmtree(partial, ignore_errors=True)
        save_pretrained(qs, partial, state_dict=model_state)
        config.write_yaml(partial / TRAIN_CONFIG)
    barrier(group)
    torch.save(_rng_state(generator, group), partial / rng_file(group.rank))
    barrier(group)
    if group.is_main:
        # Written last: its presence marks the checkpoint complete.
        torch.save({"step": step, "optimizer": optimizer_state, "scheduler": scheduler.state_dict()}, partial / TRAINER_STATE)
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        for _, old in list_checkpoints(out)[: -config.keep]:
            shutil.rmtree(old, ignore_errors=True)
        logger.info("saved %s", final)
    barrier(group)
    return final


def load_checkpoint(
    path: Path, qs, module, optimizer, scheduler, generator: torch.Generator, config: TrainConfig, group: ProcessGroup
) -> int:
    """Restore a run from checkpoint ``path``; returns the step it was saved at.

    Raises:
        ValueError: the checkpoint was made with other options (beyond those a resumed run
            may change), or with another number of processes.
    """
    saved = TrainConfig.from_dict(TrainConfig.from_yaml(path / TRAIN_CONFIG), source=str(path / TRAIN_CONFIG))
    changed = [name for name, value in config.to_dict().items() if name not in RESUMABLE_CHANGES and saved.to_dict()[name] != value]
    if changed:
        details = ", ".join(f"{name}: {saved.to_dict()[name]!r} -> {getattr(config, name)!r}" for name in changed)
        raise ValueError(f"cannot resume from {path}: options changed since it was saved ({details})")
    saved_processes = len(list(path.glob(rng_file("*"))))
    if saved_processes != group.world:
        raise ValueError(f"cannot resume from {path}: it was saved by {saved_processes} processes, this run has {group.world}")
    full = StateDictOptions(full_state_dict=True)
    set_model_state_dict(module, read_state_dict(path, qs), options=full)
    state = torch.load(path / TRAINER_STATE, weights_only=False)
    set_optimizer_state_dict(module, optimizer, state["optimizer"], options=full)
    scheduler.load_state_dict(state["scheduler"])
    _restore_rng(torch.load(path / rng_file(group.rank), weights_only=False), generator)
    logger.info("resumed from %s at step %d", path, state["step"])
    return state["step"]


def _rng_state(generator: torch.Generator, group: ProcessGroup) -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state(), "thoughts": generator.get_state()}
    if group.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(group.device)
    return state


def _restore_rng(state: dict, generator: torch.Generator) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    generator.set_state(state["thoughts"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], generator.device)
