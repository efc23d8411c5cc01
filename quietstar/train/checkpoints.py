"""Training checkpoints that lose nothing: ``OUT/checkpoint-STEP/`` holds the model as
``QuietStarModel.save_pretrained`` writes it, plus the optimizer and scheduler state, the step
(which is also the data position), every process's random generators (thought sampling
included) and the run's options.

A checkpoint is written into a hidden ``.checkpoint-STEP.partial`` folder and renamed when
complete, so a kill while saving leaves the previous checkpoints intact; only the newest
``keep`` are kept. The files are written in a background thread from a snapshot, while
training goes on. Sharded (FSDP2) and replicated (DDP) models are gathered into one full state
dict on the first process, so a checkpoint reloads with any number of processes.
"""

from __future__ import annotations

import copy
import logging
import random
import re
import shutil
import threading
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
from quietstar.ops.cpu_caching_allocator import cpu_caching_allocator_bypassed, empty_cpu_caching_allocator_cache
from quietstar.train.config import TrainConfig
from quietstar.train.distributed import ProcessGroup, gather_to_main

logger = logging.getLogger(__name__)

PREFIX = "checkpoint-"
TRAINER_STATE = "trainer_state.pt"
TRAIN_CONFIG = "train_config.yaml"
# Options that may change when a run resumes; any other must match the checkpoint's.
RESUMABLE_CHANGES = {"max_steps", "save_every", "keep", "eval_every", "eval_batches", "log_every", "resume",
                     "tokenizer_workers", "deterministic", "cpu_caching_allocator", "cache_dir", "out"}


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


def remove_partial(out: Path) -> None:
    """Delete checkpoints a killed run left half-written."""
    for partial in out.glob(f".{PREFIX}*.partial"):
        shutil.rmtree(partial, ignore_errors=True)


class CheckpointWriter:
    """Saves checkpoints; the writing runs in a background thread of the first process, so
    training goes on while the files are written.

    ``save`` takes a snapshot (copies of the weights, optimizer state, scheduler and every
    process's random generators) in the calling thread, where all processes take part, then
    hands the snapshot to the writer. At most one write is in flight: the next ``save`` and
    ``wait`` (the run's end) wait for it, and raise what it raised.
    """

    def __init__(self, out: Path, config: TrainConfig, group: ProcessGroup, data: str) -> None:
        self.out, self.config, self.group = out, config, group
        self.data = data  # the run's data_fingerprint, kept in trainer_state.pt
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, step: int, qs, module, optimizer, scheduler, generator: torch.Generator, wait: bool = False) -> Path:
        """Checkpoint ``OUT/checkpoint-STEP`` (every process must call this); ``wait`` returns
        only once it is on disk."""
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        # The CPU caching allocator's blocks (the last step's freed activations) go back first,
        # so the snapshot (the size of the weights and optimizer state) takes their place
        # instead of adding to them; and it skips the cache, which would hold it once freed.
        empty_cpu_caching_allocator_cache()
        with cpu_caching_allocator_bypassed():
            model_state = _copy(get_model_state_dict(module, options=full))
            optimizer_state = _copy(get_optimizer_state_dict(module, optimizer, options=full))
        rng_states = gather_to_main(_rng_state(generator, self.group), self.group)
        final = self.out / f"{PREFIX}{step}"
        if self.group.is_main:
            self.wait()
            trainer_state = {"step": step, "optimizer": optimizer_state, "scheduler": copy.deepcopy(scheduler.state_dict()),
                             "data": self.data}
            snapshot = (step, qs, model_state, trainer_state, rng_states)
            self._thread = threading.Thread(target=self._write, args=snapshot, name=f"checkpoint-{step}", daemon=False)
            self._thread.start()
            if wait:
                self.wait()
        return final

    def wait(self) -> None:
        """Block until the write in flight (if any) is done; raise its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"writing a checkpoint failed: {error}") from error

    def _write(self, step: int, qs, model_state: dict, trainer_state: dict, rng_states: list) -> None:
        try:
            partial = self.out / f".{PREFIX}{step}.partial"
            final = self.out / f"{PREFIX}{step}"
            shutil.rmtree(partial, ignore_errors=True)
            save_pretrained(qs, partial, state_dict=model_state)
            self.config.write_yaml(partial / TRAIN_CONFIG)
            for rank, state in enumerate(rng_states):
                torch.save(state, partial / rng_file(rank))
            # Written last: its presence marks the checkpoint complete.
            torch.save(trainer_state, partial / TRAINER_STATE)
            shutil.rmtree(final, ignore_errors=True)
            partial.rename(final)
            for _, old in list_checkpoints(self.out)[: -self.config.keep]:
                shutil.rmtree(old, ignore_errors=True)
            logger.info("saved %s", final)
        except BaseException as error:  # noqa: BLE001  (re-raised in the training thread by wait)
            self._error = error


def _copy(state: dict) -> dict:
    """A deep copy whose tensors no longer share memory with the live model or optimizer."""
    return copy.deepcopy(state)


def load_checkpoint(
    path: Path,
    qs,
    module,
    optimizer,
    scheduler,
    generator: torch.Generator,
    config: TrainConfig,
    group: ProcessGroup,
    data: str,
) -> int:
    """Restore a run from checkpoint ``path``; returns the step it was saved at. ``data`` is this
    run's ``data_fingerprint``.

    Raises:
        ValueError: the checkpoint was made with other options (beyond those a resumed run
            may change), with another number of processes, or on other data (its files now
            hold other text: the window order would not continue the run's).
    """
    saved = TrainConfig.from_dict(TrainConfig.from_yaml(path / TRAIN_CONFIG), source=str(path / TRAIN_CONFIG))
    changed = [name for name, value in config.to_dict().items() if name not in RESUMABLE_CHANGES and saved.to_dict()[name] != value]
    if changed:
        details = ", ".join(f"{name}: {saved.to_dict()[name]!r} -> {getattr(config, name)!r}" for name in changed)
        raise ValueError(f"cannot resume from {path}: options changed since it was saved ({details})")
    saved_processes = len(list(path.glob(rng_file("*"))))
    if saved_processes != group.world:
        raise ValueError(f"cannot resume from {path}: it was saved by {saved_processes} processes, this run has {group.world}")
    state = torch.load(path / TRAINER_STATE, weights_only=False)
    if "data" not in state:
        logger.info("%s predates data fingerprints: the data it was trained on is not checked", path)
    elif state["data"] != data:
        raise ValueError(f"cannot resume from {path}: the data files hold other text than when it was saved (a file "
                         "added to a data folder, or edited), so the window order would not continue the run's")
    full = StateDictOptions(full_state_dict=True)
    set_model_state_dict(module, read_state_dict(path, qs), options=full)
    set_optimizer_state_dict(module, optimizer, state["optimizer"], options=full)
    scheduler.load_state_dict(state["scheduler"])
    _follow_schedule(optimizer, scheduler)
    _restore_rng(torch.load(path / rng_file(group.rank), weights_only=False), generator)
    logger.info("resumed from %s at step %d", path, state["step"])
    return state["step"]


def _follow_schedule(optimizer, scheduler) -> None:
    """Set each parameter group's learning rate to this run's schedule at the restored step.
    The optimizer's state holds the rate the saved run's schedule gave for its next step; a
    resumed run may change ``max_steps``, and with it the schedule (the scheduler's lambdas are
    this run's), so its first step would otherwise take the old rate."""
    for group, base_lr, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base_lr * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]  # what get_last_lr() reports


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
