"""The training loop behind ``quietstar train``: AdamW with the authors' defaults, gradient
accumulation, bfloat16 autocast, validation, checkpoints with exact resume, and DDP / FSDP2 on
several processes.

Every optimizer step runs ``grad_accum`` micro-steps of ``batch_size`` windows per process; each
micro-step is one ``QuietStarModel`` forward (thought sampling, the tree pass, the losses) and
backward of ``loss / grad_accum``. Gradients are clipped to ``max_grad_norm``, then AdamW steps
and the schedule advances. A record of the step goes to ``OUT/metrics.jsonl``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import signal
import threading
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from quietstar.model.checkpoint import read_quietstar_config
from quietstar.model.config import QuietStarConfig
from quietstar.model.loaders import is_quietstar_checkpoint, load_quietstar
from quietstar.model.quietstar_model import QuietStarModel, Targets, thought_gains
from quietstar.ops.backends import bf16_matmul_on_cpu
from quietstar.ops.cpu_caching_allocator import cpu_caching_allocator
from quietstar.ops.linear_cross_entropy import IGNORE_INDEX
from quietstar.train import checkpoints
from quietstar.train.config import TrainConfig
from quietstar.train.data import (
    Batch,
    TokenWindows,
    data_fingerprint,
    find_files,
    load_token_documents,
    split_documents,
    step_positions,
    stream_seed,
)
from quietstar.train.distributed import ProcessGroup, barrier, broadcast_flag, setup, sum_over_processes, teardown, wrap
from quietstar.train.metrics import MetricsLog

logger = logging.getLogger(__name__)

CUBLAS_DETERMINISTIC_WORKSPACE = ":4096:8"  # the setting PyTorch's reproducibility notes give


def build_optimizer(qs: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over two groups: weight decay on matrices, none on biases, norms and the meta-token
    embeddings."""
    decay, no_decay = [], []
    for name, param in qs.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or name == "meta_embeddings" else decay).append(param)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps)


def learning_rate_factor(step: int, config: TrainConfig) -> float:
    """Multiplier of ``lr`` at optimizer step ``step`` (0-based): linear warm-up to 1 over
    ``warmup_steps`` (the first step already moves), then ``lr_schedule``."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return 1.0
    progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
    if config.lr_schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class Trainer:
    """One training run.

    Args:
        config: the run's options.
        qs: the model to train (default: loaded from ``config.model``); its tokenizer reads
            the data. Its ``QuietStarConfig`` must hold the run's thinking options
            (``config.quietstar_config``), which the run's records and checkpoints state.
    """

    def __init__(self, config: TrainConfig, qs: QuietStarModel | None = None) -> None:
        if not config.out:
            raise ValueError("out: the run needs an output folder")
        if qs is not None:
            self._check_thinking_options(config, qs)
        self.config = config
        self.out = Path(config.out)
        found = checkpoints.list_checkpoints(self.out)
        if config.resume and found and found[-1][0] > config.max_steps:
            raise ValueError(f"max_steps={config.max_steps}: the checkpoint in {str(self.out)!r} is at step {found[-1][0]} "
                             "already; give a larger max_steps to continue it")
        if not config.resume and found:
            # Before the model loads and anything is written there: a fresh run's checkpoints would
            # sit among the old run's, be pruned by step first, and a later --resume would continue
            # the old run.
            raise ValueError(
                f"out={str(self.out)!r} already holds checkpoints of a run: pass resume=True (--resume) "
                "to continue it, or choose another out folder"
            )
        if config.deterministic:
            # cuBLAS picks its reduction order per workspace; a fixed workspace fixes it.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC_WORKSPACE)
        self.group = setup(config.device)
        # Warnings, not errors: a resumed run may turn validation off (eval_every is free to
        # change) while its held-out data, which must match the checkpoint's, stays given.
        held_out = bool(config.eval_data or config.eval_fraction)
        if held_out and not config.eval_every:
            logger.warning("eval_every=0: the held-out data (eval_data or eval_fraction) is never scored%s; set "
                           "eval_every to validate", ", and eval_fraction only takes documents from training" if config.eval_fraction else "")
        if config.eval_every and not held_out:
            logger.warning("eval_every=%d but no held-out data (eval_data or eval_fraction): nothing is validated", config.eval_every)
        if config.warmup_steps > config.max_steps:
            logger.warning("warmup_steps=%d is longer than max_steps=%d: the rate climbs to %.3g of lr and the %s "
                           "schedule never starts", config.warmup_steps, config.max_steps,
                           config.max_steps / config.warmup_steps, config.lr_schedule)
        if config.dtype == "bf16" and self.group.device.type == "cpu" and bf16_matmul_on_cpu() is False:
            logger.warning("dtype=bf16: this CPU has no bfloat16 matrix instructions (a bfloat16 GEMM runs ~100x "
                           "slower than float32 here); use --dtype float32")
        self._check_held_out_files(config)  # a bad path fails now, before the model loads
        torch.manual_seed(config.seed)  # the same initial weights in every process
        if qs is None:
            if not config.model:
                raise ValueError("model: give a model folder, checkpoint or .gguf file")
            qs = load_quietstar(config.model, self._thinking_options(config))
        if qs.tokenizer is None:
            raise ValueError("model: it has no tokenizer, which the trainer needs to read the data")
        qs.gradient_checkpointing = config.model_checkpointing()
        self.qs = qs.to(self.group.device).train()
        self.train_windows, self.eval_windows, self.data_fingerprint = self._load_data()
        self.module = wrap(self.qs, self.group, config.fsdp)
        self.optimizer = build_optimizer(self.qs, config)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: learning_rate_factor(step, config))
        self.generator = torch.Generator(self.group.device).manual_seed(stream_seed(config.seed, "thoughts", self.group.rank))
        self.writer = checkpoints.CheckpointWriter(self.out, config, self.group, self.data_fingerprint)
        self._stop_requested = False

    @staticmethod
    def _check_held_out_files(config: TrainConfig) -> None:
        """Every data path exists, and no held-out file (``eval_data``) is also a training file
        (``data``): its held-out NLL would be measured on text the model trained on."""
        train_files = {path.resolve() for path in find_files(config.data)}
        if config.eval_data:
            shared = sorted(str(path) for path in train_files & {path.resolve() for path in find_files(config.eval_data)})
            if shared:
                raise ValueError(f"eval_data: {len(shared)} file(s) are also training data (data), e.g. {shared[0]!r}; "
                                 "held-out files must not be trained on")

    @staticmethod
    def _check_thinking_options(config: TrainConfig, qs: QuietStarModel) -> None:
        """Refuse a given model whose thinking options are not the run's: it would train with its
        own while ``config.yaml`` and the checkpoints' ``train_config.yaml`` record the run's."""
        wanted = config.quietstar_config(qs.config)
        differ = [f"{f.name}: the run's {getattr(wanted, f.name)!r}, the model's {getattr(qs.config, f.name)!r}"
                  for f in dataclasses.fields(wanted) if getattr(wanted, f.name) != getattr(qs.config, f.name)]
        if differ:
            raise ValueError(f"qs: the model's thinking options differ from config's ({'; '.join(differ)}); build it "
                             "with config.quietstar_config() or give config the model's options")

    @staticmethod
    def _thinking_options(config: TrainConfig) -> QuietStarConfig:
        """The run's ``QuietStarConfig``: a checkpoint's own with the run's options over it (those
        the options do not cover stay the checkpoint's), else the options over the defaults."""
        if not is_quietstar_checkpoint(config.model):
            return config.quietstar_config()
        saved = read_quietstar_config(config.model)
        run = config.quietstar_config(saved)
        changed = [f"{f.name} {getattr(saved, f.name)!r} -> {getattr(run, f.name)!r}"
                   for f in dataclasses.fields(run) if getattr(saved, f.name) != getattr(run, f.name)]
        if changed:
            logger.info("%s: this run's thinking options differ from the checkpoint's: %s", config.model, ", ".join(changed))
        return run

    # --- data --------------------------------------------------------------------------

    def _load_data(self) -> tuple[TokenWindows, TokenWindows | None, str]:
        """The training and held-out windows, and the documents' ``data_fingerprint``."""
        cfg, tokenizer = self.config, self.qs.tokenizer

        def load(paths):
            return load_token_documents(paths, tokenizer, cfg.text_field, cfg.cache_dir, cfg.tokenizer_workers)

        # The first process tokenizes (and fills the cache); the others then read the cache.
        if not self.group.is_main:
            barrier(self.group)
        documents = load(cfg.data)
        held_out = load(cfg.eval_data) if cfg.eval_data else []
        if self.group.is_main:
            barrier(self.group)
        documents, split = split_documents(documents, cfg.eval_fraction, cfg.seed)
        held_out = held_out or split
        options = dict(seq_len=cfg.seq_len, packing=cfg.packing, eos_id=tokenizer.eos_token_id,
                       pad_id=tokenizer.pad_token_id, seed=cfg.seed)
        train = TokenWindows(documents, **options)
        evaluation = TokenWindows(held_out, shuffle=False, **options) if held_out else None
        if evaluation is not None and len(evaluation) < self.group.world * cfg.batch_size:
            raise ValueError(f"the held-out data makes {len(evaluation)} windows, fewer than one batch of every process")
        logger.info("training windows: %d%s", len(train), f", held-out windows: {len(evaluation)}" if evaluation else "")
        return train, evaluation, data_fingerprint(documents, held_out)

    def _batch(self, step: int, micro_step: int) -> Batch:
        cfg, group = self.config, self.group
        positions = step_positions(step, micro_step, cfg.grad_accum, group.rank, group.world, cfg.batch_size)
        return self.train_windows.batch(positions).to(group.device)

    # --- steps ---------------------------------------------------------------------------

    def _autocast(self):
        return torch.autocast(self.group.device.type, dtype=torch.bfloat16, enabled=self.config.dtype == "bf16")

    def _micro_step(self, batch: Batch, last: bool) -> dict[str, float]:
        """Forward and backward of one micro-batch; its sums for the step's record."""
        sync = contextlib.nullcontext() if last or not hasattr(self.module, "no_sync") else self.module.no_sync()
        with sync:
            with self._autocast():
                out = self.module(batch.input_ids, batch.attention_mask, batch.labels, generator=self.generator)
            (out.loss / self.config.grad_accum).backward()
        return {**self._loss_sums(out), **self._signal_sums(out, batch.labels, batch.attention_mask), "tokens": float(batch.tokens)}

    @staticmethod
    def _loss_sums(out) -> dict[str, float]:
        return {name: getattr(out, name).detach().item() for name in ("loss", "nll_loss", "policy_loss")}

    def _signal_sums(self, out, labels: torch.Tensor, attention_mask: torch.Tensor | None) -> dict[str, float]:
        """Sums and counts of the rewards and the thoughts' raw gains (at reinforced positions)
        and of the mixing weights (at scored talk targets). A raw gain is the reward before the
        baseline and clamping: how much a thought lowered the NLL of the next ``K`` tokens. With
        ``N`` thoughts the rewards are centred over them, so they say how the thoughts differ
        (with two, one is the other's negative), not whether thinking helps; the gains do."""
        targets = Targets.from_labels(labels, self.qs.config.talk_tokens, attention_mask)
        acting = targets.acting[:, None].expand_as(out.rewards)
        rewards = out.rewards[acting]
        scored = targets.talk != IGNORE_INDEX
        gains = thought_gains(out.nll_base, out.nll_talk, scored)[acting]
        weights = out.mixing_weight.detach()[scored[:, None].expand_as(out.mixing_weight)]
        return {
            "reward_sum": float(rewards.sum()), "reward_positive": float((rewards > 0).sum()), "reward_count": float(rewards.numel()),
            "gain_sum": float(gains.sum()), "gain_positive": float((gains > 0).sum()),
            "mixing_weight_sum": float(weights.float().sum()), "mixing_weight_count": float(weights.numel()),
        }

    def _optimizer_step(self) -> float:
        params = [p for p in self.qs.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def train_step(self, step: int) -> dict:
        """One optimizer step (0-based ``step``); returns its record (``step`` counts from 1)."""
        started = time.perf_counter()
        lr = self.scheduler.get_last_lr()[0]
        sums: dict[str, float] = {}
        for micro_step in range(self.config.grad_accum):
            part = self._micro_step(self._batch(step, micro_step), last=micro_step == self.config.grad_accum - 1)
            sums = {k: sums.get(k, 0.0) + v for k, v in part.items()}
        grad_norm = self._optimizer_step()
        sums = sum_over_processes(sums, self.group)
        seconds = time.perf_counter() - started
        micro_batches = self.config.grad_accum * self.group.world
        return {
            "step": step + 1,
            "split": "train",
            **{name: sums[name] / micro_batches for name in ("loss", "nll_loss", "policy_loss")},
            "reward_mean": sums["reward_sum"] / max(sums["reward_count"], 1.0),
            "reward_positive_fraction": sums["reward_positive"] / max(sums["reward_count"], 1.0),
            "thought_gain_mean": sums["gain_sum"] / max(sums["reward_count"], 1.0),
            "thought_gain_positive_fraction": sums["gain_positive"] / max(sums["reward_count"], 1.0),
            "mixing_weight_mean": sums["mixing_weight_sum"] / max(sums["mixing_weight_count"], 1.0),
            "grad_norm": grad_norm,
            "lr": lr,
            "tokens": int(sums["tokens"]),
            "tokens_per_s": sums["tokens"] / seconds,
            "seconds": seconds,
        }

    @torch.no_grad()
    def evaluate(self, step: int) -> dict:
        """Mean NLL of the next token on the held-out windows, without thinking (the base
        prediction) and with it (the mixed prediction after a thought), same thoughts every time:
        each batch of windows draws them from its own seed (``stream_seed(seed, "validation",
        chunk)``, ``chunk`` the batch's place in the held-out order), so a batch is scored alike
        whichever process, and however many, score it."""
        cfg, group = self.config, self.group
        batches = min(cfg.eval_batches, len(self.eval_windows) // (group.world * cfg.batch_size))
        sums = {"base": 0.0, "thinking": 0.0, "base_count": 0.0, "thinking_count": 0.0}
        for index in range(batches):
            chunk = index * group.world + group.rank
            start = chunk * cfg.batch_size
            generator = torch.Generator(group.device).manual_seed(stream_seed(cfg.seed, "validation", chunk))
            batch = self.eval_windows.batch(list(range(start, start + cfg.batch_size))).to(group.device)
            with self._autocast():
                out = self.module(batch.input_ids, batch.attention_mask, batch.labels, generator=generator)
            scored = Targets.from_labels(batch.labels, self.qs.config.talk_tokens, batch.attention_mask).base != IGNORE_INDEX
            sums["base"] += float(out.nll_base[scored].sum())
            sums["base_count"] += float(scored.sum())
            thinking = out.nll_talk[..., 0][scored[:, None].expand_as(out.nll_talk[..., 0])]
            sums["thinking"] += float(thinking.sum())
            sums["thinking_count"] += float(thinking.numel())
        sums = sum_over_processes(sums, group)
        return {
            "step": step,
            "split": "eval",
            "nll_base": sums["base"] / max(sums["base_count"], 1.0),
            "nll_thinking": sums["thinking"] / max(sums["thinking_count"], 1.0),
            "tokens": int(sums["base_count"]),
        }

    # --- the run -------------------------------------------------------------------------

    def _request_stop(self, signum, frame) -> None:
        if self._stop_requested:
            raise KeyboardInterrupt
        self._stop_requested = True
        logger.warning("%s: finishing this step, saving a checkpoint, then stopping", signal.Signals(signum).name)

    def _resume(self) -> int:
        found = checkpoints.list_checkpoints(self.out) if self.config.resume else []
        if self.config.resume and not found:
            logger.info("resume: no checkpoint in %s yet; starting at step 0", self.out)
        if not found:
            return 0
        return checkpoints.load_checkpoint(
            found[-1][1], self.qs, self.module, self.optimizer, self.scheduler, self.generator, self.config, self.group,
            self.data_fingerprint,
        )

    def _save(self, step: int, wait: bool) -> None:
        self.writer.save(step, self.qs, self.module, self.optimizer, self.scheduler, self.generator, wait=wait)

    def train(self) -> list[dict]:
        """Run to ``max_steps`` (or until SIGINT/SIGTERM: the step finishes, a checkpoint is
        saved, and the run returns). Returns the records written (train and eval)."""
        cfg, group = self.config, self.group
        if group.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            cfg.write_yaml(self.out / "config.yaml")
            checkpoints.remove_partial(self.out)
        barrier(group)
        start = self._resume()
        if start == cfg.max_steps:
            logger.info("the checkpoint in %s is at max_steps=%d: nothing to train", self.out, start)
        log = MetricsLog(self.out, start if cfg.resume else None, enabled=group.is_main)
        # Signals reach only the main thread; a run started elsewhere is stopped by its caller.
        in_main = threading.current_thread() is threading.main_thread()
        handlers = {s: signal.signal(s, self._request_stop) for s in (signal.SIGINT, signal.SIGTERM)} if in_main else {}
        records = []
        was_deterministic = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(was_deterministic or cfg.deterministic)
        progress = tqdm(total=cfg.max_steps, initial=start, disable=not group.is_main, desc="train", unit="step")
        allocator = contextlib.ExitStack()
        try:
            if cfg.cpu_caching_allocator and group.device.type == "cpu" and allocator.enter_context(cpu_caching_allocator()):
                logger.info("CPU caching allocator on for the run (--no-cpu-caching-allocator turns it off)")
            for step in range(start, cfg.max_steps):
                record = self.train_step(step)
                records.append(record)
                log.write(record)
                done = step + 1
                if done % cfg.log_every == 0 or done == cfg.max_steps:
                    progress.set_postfix(loss=f"{record['loss']:.4g}", nll=f"{record['nll_loss']:.4g}",
                                         lr=f"{record['lr']:.2g}", tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
                progress.update(1)
                if self.eval_windows is not None and cfg.eval_every and done % cfg.eval_every == 0:
                    records.append(self.evaluate(done))
                    log.write(records[-1])
                stop = broadcast_flag(self._stop_requested, group)
                last = stop or done == cfg.max_steps
                if last or (cfg.save_every and done % cfg.save_every == 0):
                    self._save(done, wait=last)
                if stop:
                    logger.warning("stopped at step %d; continue with --resume", done)
                    break
        finally:
            torch.use_deterministic_algorithms(was_deterministic)
            self.writer.wait()
            allocator.close()  # after the checkpoint writer's last allocation
            progress.close()
            log.close()
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        return records

    def close(self) -> None:
        """Leave the run's process group (ended where the trainer started it; a group the caller
        started stays theirs); the trainer cannot step after this (``self.qs`` stays)."""
        self.module = None  # a DDP wrapper holds the group: dropped, teardown can free it
        if self.group.started_here:
            teardown(self.group)


def train(config: TrainConfig, qs: QuietStarModel | None = None) -> list[dict]:
    """Run ``quietstar train`` from Python; returns the records of ``metrics.jsonl`` this run wrote."""
    trainer = Trainer(config, qs)
    try:
        return trainer.train()
    finally:
        trainer.close()
