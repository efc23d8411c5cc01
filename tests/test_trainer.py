"""The trainer: it learns, its records, checkpoints that resume exactly, a clean stop on
SIGTERM, and QuietStarModel under transformers' Trainer."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from helpers import CORPUS, DEVICE, requires_native, training_workspace
from safetensors.torch import load_file

from quietstar.model.loaders import load_quietstar
from quietstar.ops.cpu_caching_allocator import (
    cpu_caching_allocator_stats,
    disable_cpu_caching_allocator,
    enable_cpu_caching_allocator,
)
from quietstar.train import TrainConfig, train
from quietstar.train import checkpoints
from quietstar.train.checkpoints import list_checkpoints
from quietstar.train.data import generator_seed, stream_seed
from quietstar.train.trainer import Trainer

SMALL = dict(seq_len=16, batch_size=1, grad_accum=2, thought_tokens=2, talk_tokens=2, n_thoughts=2, warmup_steps=1,
             policy_weight=100.0, tokenizer_workers=0)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return training_workspace(tmp_path_factory.mktemp("train"))


def config(workspace, out, **options):
    values = dict(model=str(workspace / "model"), data=[str(workspace / "corpus.txt")], out=str(out),
                  cache_dir=str(workspace / "cache"), **SMALL)
    return TrainConfig(**{**values, **options})


def weights(folder):
    return {**load_file(str(folder / "model.safetensors")), **load_file(str(folder / "quietstar.safetensors"))}


def test_a_short_run_lowers_the_loss_and_writes_every_record(workspace, tmp_path):
    records = train(config(workspace, tmp_path / "run", max_steps=8, lr=3e-3, eval_fraction=0.0, save_every=0))
    losses = [r["nll_loss"] for r in records]
    assert losses[-1] < losses[0]
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 9))
    required = {"step", "loss", "nll_loss", "policy_loss", "reward_mean", "reward_positive_fraction",
                "mixing_weight_mean", "lr", "grad_norm", "tokens_per_s", "seconds"}
    assert required <= set(lines[0]) and all(r["split"] == "train" for r in lines)
    assert all(r["tokens"] == 2 * 16 for r in lines)  # grad_accum x batch x L real tokens
    assert lines[0]["lr"] == pytest.approx(3e-3)  # warm-up of one step
    assert (tmp_path / "run" / "config.yaml").is_file()
    assert [step for step, _ in list_checkpoints(tmp_path / "run")] == [8]  # the last step is always saved


def test_validation_records_base_and_thinking_nll(workspace, tmp_path):
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": CORPUS[i:] * 2}) + "\n" for i in range(0, 100, 10)))
    run = config(workspace, tmp_path / "run", data=[str(tmp_path / "docs.jsonl")], max_steps=2, eval_fraction=0.3,
                 eval_every=1, eval_batches=2, save_every=0)
    evals = [r for r in train(run) if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [1, 2]
    assert all(r["tokens"] > 0 and 0 < r["nll_base"] < 20 and 0 < r["nll_thinking"] < 20 for r in evals)


def test_a_validation_batch_is_scored_alike_whichever_process_and_however_many_score_it(workspace, tmp_path, monkeypatch):
    """Each held-out batch draws its thoughts from its own seed (its place in the held-out order):
    batch 1 is the second batch of one process and the first of rank 1 of two."""
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": CORPUS[i:] * 2}) + "\n" for i in range(0, 100, 10)))
    run = config(workspace, tmp_path / "run", data=[str(tmp_path / "docs.jsonl")], eval_fraction=0.5, eval_every=1,
                 eval_batches=2, save_every=0)
    trainer = Trainer(run)
    scored = []  # (seed of the thoughts, NLL of the mixed prediction) per batch
    module = trainer.module

    def spy(*args, generator, **kwargs):
        out = module(*args, generator=generator, **kwargs)
        scored.append((generator.initial_seed(), out.nll_talk.detach().clone()))
        return out

    try:
        trainer.module = spy
        trainer.evaluate(0)
        alone = list(scored)
        scored.clear()
        monkeypatch.setattr("quietstar.train.trainer.sum_over_processes", lambda sums, group: sums)
        trainer.group = dataclasses.replace(trainer.group, rank=1, world=2)
        trainer.evaluate(0)
    finally:
        trainer.group = dataclasses.replace(trainer.group, rank=0, world=1)
        trainer.close()
    assert [seed for seed, _ in alone] == [stream_seed(run.seed, "validation", chunk) for chunk in (0, 1)]
    assert [seed for seed, _ in scored] == [stream_seed(run.seed, "validation", chunk) for chunk in (1, 3)]
    assert torch.equal(scored[0][1], alone[1][1])


def test_two_steps_then_resume_equal_four_steps_bitwise(workspace, tmp_path):
    # On CUDA, atomic additions (index backward, embedding backward) sum in any order: only
    # deterministic kernels repeat bit for bit there (an H200 run without them differed).
    exact = dict(lr=1e-3, deterministic=DEVICE.type == "cuda")
    straight = train(config(workspace, tmp_path / "a", max_steps=4, save_every=0, **exact))
    train(config(workspace, tmp_path / "b", max_steps=2, save_every=2, **exact))
    resumed = train(config(workspace, tmp_path / "b", max_steps=4, save_every=2, resume=True, **exact))
    assert [r["step"] for r in resumed] == [3, 4]
    assert [r["loss"] for r in straight[2:]] == [r["loss"] for r in resumed]
    final_a, final_b = weights(tmp_path / "a" / "checkpoint-4"), weights(tmp_path / "b" / "checkpoint-4")
    assert final_a.keys() == final_b.keys() and all(torch.equal(final_a[k], final_b[k]) for k in final_a)
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_deterministic_mode_holds_for_the_run_only(workspace, tmp_path):
    assert not torch.are_deterministic_algorithms_enabled()
    records = train(config(workspace, tmp_path / "run", max_steps=1, save_every=0, deterministic=True))
    assert len(records) == 1 and math.isfinite(records[0]["loss"])
    assert not torch.are_deterministic_algorithms_enabled()


@requires_native
@pytest.mark.parametrize("enabled", [True, False])
def test_a_cpu_run_uses_the_caching_allocator_for_the_run_only(workspace, tmp_path, enabled):
    trainer = Trainer(config(workspace, tmp_path / "run", max_steps=2, save_every=0, cpu_caching_allocator=enabled))
    seen = []
    trainer.qs.register_forward_pre_hook(lambda *_: seen.append(cpu_caching_allocator_stats().enabled))
    try:
        trainer.train()
    finally:
        trainer.close()
    assert seen == [enabled] * 4  # 2 steps x 2 micro-steps
    assert not cpu_caching_allocator_stats().enabled


@requires_native
def test_a_checkpoint_snapshot_neither_sits_beside_nor_stays_in_the_allocators_cache(workspace, tmp_path, monkeypatch):
    """The snapshot (the weights and optimizer state) is taken after the cache is emptied, and
    not from it: a cache holding the last step's activations beside it would raise the run's
    peak by the step's working set, and its freed blocks would stay cached until the next one."""
    seen = []

    def copy_counted(state):
        before = cpu_caching_allocator_stats()
        copied = copy.deepcopy(state)
        after = cpu_caching_allocator_stats()
        seen.append((before.cached_bytes, after.live_bytes - before.live_bytes, after.hits - before.hits))
        return copied

    monkeypatch.setattr(checkpoints, "_copy", copy_counted)
    trainer = Trainer(config(workspace, tmp_path / "run", max_steps=2, save_every=1))
    # Every size through the cache (the tiny model's tensors are below the default 64 KiB);
    # the run keeps an allocator its caller enabled, with the caller's limits.
    assert enable_cpu_caching_allocator(min_block_bytes=1)
    try:
        trainer.train()
    finally:
        disable_cpu_caching_allocator()
        trainer.close()
    assert len(seen) == 4 and all(entry == (0, 0, 0) for entry in seen)


def test_only_the_newest_checkpoints_are_kept(workspace, tmp_path):
    train(config(workspace, tmp_path / "run", max_steps=5, save_every=1, keep=2))
    assert [step for step, _ in list_checkpoints(tmp_path / "run")] == [4, 5]
    assert not list((tmp_path / "run").glob(".checkpoint-*"))


def test_a_resumed_run_with_more_steps_takes_its_own_schedule_from_its_first_step(workspace, tmp_path):
    from quietstar.train.trainer import learning_rate_factor

    options = dict(lr=1e-3, lr_schedule="linear", warmup_steps=0, save_every=2)
    train(config(workspace, tmp_path / "run", max_steps=2, **options))  # ends its schedule at 0
    longer = config(workspace, tmp_path / "run", max_steps=6, resume=True, **options)
    resumed = train(longer)
    expected = [1e-3 * learning_rate_factor(step, longer) for step in range(2, 6)]
    assert [r["lr"] for r in resumed] == pytest.approx(expected) and expected[0] > 0


def test_a_fresh_run_refuses_a_folder_that_holds_another_runs_checkpoints(workspace, tmp_path):
    train(config(workspace, tmp_path / "run", max_steps=2, save_every=1))
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match=r"out='.*run' already holds checkpoints of a run: pass resume=True"):
        train(config(workspace, tmp_path / "run", max_steps=1))
    assert [step for step, _ in list_checkpoints(tmp_path / "run")] == [1, 2]
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before  # nothing of the old run was touched


def test_tensorboard_keeps_the_resumed_checkpoints_own_step(tmp_path, monkeypatch):
    import types

    from quietstar.train.metrics import MetricsLog

    made = []
    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = lambda log_dir, purge_step=None: made.append(purge_step)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    MetricsLog(tmp_path, resumed_step=2, enabled=True)  # steps 1 and 2 are kept, 3 on dropped
    MetricsLog(tmp_path, resumed_step=None, enabled=True)  # a fresh run purges nothing
    assert made == [3, None]


def test_resume_refuses_options_that_would_change_the_run(workspace, tmp_path):
    train(config(workspace, tmp_path / "run", max_steps=1))
    with pytest.raises(ValueError, match=r"options changed since it was saved \(lr"):
        train(config(workspace, tmp_path / "run", max_steps=2, lr=1e-3, resume=True))


def test_sigterm_finishes_the_step_saves_and_exits_cleanly(workspace, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "quietstar", "train", "--model", str(workspace / "model"),
               "--data", str(workspace / "corpus.txt"), "--out", str(out), "--cache-dir", str(workspace / "cache"),
               "--max-steps", "100000", "--save-every", "0", "--seq-len", "16", "--grad-accum", "1",
               "--thought-tokens", "2", "--talk-tokens", "2"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not metrics.is_file() or len(metrics.read_text().splitlines()) < 2):
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    saved = list_checkpoints(out)
    assert len(saved) == 1
    assert saved[0][0] == len(metrics.read_text().splitlines())  # the checkpoint is at the last step run
    assert "continue with --resume" in stderr


def test_quietstar_model_trains_under_the_transformers_trainer(workspace, tmp_path):
    from transformers import Trainer, TrainingArguments

    from quietstar import QuietStarConfig
    from quietstar.model.loaders import load_quietstar

    qs = load_quietstar(workspace / "model", QuietStarConfig(thought_tokens=2, talk_tokens=2, n_thoughts=2))
    encoded = qs.tokenizer([CORPUS[:60], CORPUS[40:90]], padding=True, return_tensors="pt")
    rows = [{"input_ids": encoded.input_ids[i], "attention_mask": encoded.attention_mask[i]} for i in range(2)]
    arguments = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, report_to=[],
                                  save_strategy="no", use_cpu=True, learning_rate=1e-3)
    before = qs.mixing_head.mlp[-1].weight.detach().clone()
    result = Trainer(model=qs, args=arguments, train_dataset=rows).train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
    assert not torch.equal(qs.mixing_head.mlp[-1].weight, before)  # the mixing head learned
    out = qs(encoded.input_ids, encoded.attention_mask)
    assert out[0] is out["loss"] is out.loss


def test_bf16_autocast_step_matches_float32_at_bf16_precision(workspace, tmp_path):
    full = train(config(workspace, tmp_path / "f32", max_steps=1, save_every=0))
    half = train(config(workspace, tmp_path / "bf16", max_steps=1, save_every=0, dtype="bf16"))
    assert half[0]["nll_loss"] == pytest.approx(full[0]["nll_loss"], rel=2e-2)


def test_training_a_checkpoint_keeps_the_thinking_options_the_run_does_not_set(workspace, tmp_path):
    from quietstar import QuietStarConfig
    from quietstar.model.loaders import load_quietstar

    saved = QuietStarConfig(thought_tokens=2, talk_tokens=2, clamp_negative_rewards=False, meta_token_scale=10.0)
    load_quietstar(workspace / "model", saved).save_pretrained(tmp_path / "ckpt")
    run = Trainer._thinking_options(config(workspace, tmp_path / "run", model=str(tmp_path / "ckpt"), thought_tokens=3))
    assert (run.clamp_negative_rewards, run.meta_token_scale, run.thought_tokens) == (False, 10.0, 3)


def test_a_seed_past_64_bits_is_an_error_naming_it(workspace, tmp_path):
    with pytest.raises(ValueError, match=r"seed must be an int >= 0 and below 2\*\*64"):
        config(workspace, tmp_path / "run", seed=2**64)


def test_large_seeds_derive_generator_seeds_in_range(workspace, tmp_path):
    # (seed * 1_000_003 + epoch) * 1_000_033 + window passed 64 bits from --seed 2e7 on.
    records = train(config(workspace, tmp_path / "run", max_steps=1, save_every=0, packing="crop", seed=20240101 * 10**6))
    assert len(records) == 1 and math.isfinite(records[0]["loss"])


@pytest.mark.parametrize("seed", [0, 7])
def test_the_thought_sampling_never_draws_from_a_seed_of_the_data_order(workspace, tmp_path, seed):
    """Rank r's thoughts once came from the seed of epoch r's window permutation (seed * 1_000_003
    + r): the same random numbers that ordered that epoch's data."""
    trainer = Trainer(config(workspace, tmp_path / "run", seed=seed))
    try:
        thoughts = trainer.generator.initial_seed()
    finally:
        trainer.close()
    assert thoughts == stream_seed(seed, "thoughts", 0)
    order_seeds = {generator_seed(seed * 1_000_003 + epoch) for epoch in range(1000)}
    assert not {stream_seed(seed, "thoughts", rank) for rank in range(64)} & order_seeds


@pytest.mark.parametrize(
    "options,message",
    [(dict(eval_data="corpus"), "eval_every=0: the held-out data (eval_data or eval_fraction) is never scored; set eval_every"),
     (dict(eval_every=2), "eval_every=2 but no held-out data")],
)
def test_validation_options_that_would_never_validate_are_logged(workspace, tmp_path, caplog, options, message):
    if "eval_data" in options:
        (tmp_path / "held_out.txt").write_text(CORPUS)
        options = {**options, "eval_data": [str(tmp_path / "held_out.txt")]}
    with caplog.at_level(logging.WARNING, logger="quietstar.train.trainer"):
        Trainer(config(workspace, tmp_path / "run", **options)).close()
    assert message in caplog.text


def test_a_warm_up_longer_than_the_run_is_logged(workspace, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="quietstar.train.trainer"):
        train(config(workspace, tmp_path / "run", max_steps=1, warmup_steps=4, save_every=0))
    assert "warmup_steps=4 is longer than max_steps=1" in caplog.text


def test_resuming_past_max_steps_is_an_error_naming_it(workspace, tmp_path):
    train(config(workspace, tmp_path / "run", max_steps=2, save_every=2))
    with pytest.raises(ValueError, match=r"max_steps=1: the checkpoint .* is at step 2"):
        train(config(workspace, tmp_path / "run", max_steps=1, resume=True))


def test_a_cut_off_last_metrics_line_is_dropped_on_resume_and_a_bad_one_named(tmp_path, caplog):
    from quietstar.train.metrics import METRICS_FILE, MetricsLog

    path = tmp_path / METRICS_FILE
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    MetricsLog(tmp_path, resumed_step=2, enabled=True).close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
    assert "cut off" in caplog.text
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2: not a JSON record"):
        MetricsLog(tmp_path, resumed_step=2, enabled=True)


def test_a_given_model_must_hold_the_runs_thinking_options(workspace, tmp_path):
    """The run's records state its thinking options: a model built with others is refused, not
    trained with its own while config.yaml says otherwise."""
    run = config(workspace, tmp_path / "run", max_steps=1, save_every=0)
    qs = load_quietstar(run.model, run.quietstar_config())
    Trainer(run, qs).close()
    with pytest.raises(ValueError, match=r"qs: .*thought_tokens: the run's 3, the model's 2.*policy_weight: the run's 5"):
        Trainer(dataclasses.replace(run, thought_tokens=3, policy_weight=5.0), qs)


@pytest.mark.parametrize("named", ["the file", "its folder"])
def test_held_out_files_that_are_also_training_data_are_refused(workspace, tmp_path, named):
    held_out = str(workspace / "corpus.txt") if named == "the file" else str(workspace)
    with pytest.raises(ValueError, match=r"eval_data: 1 file\(s\) are also training data .*corpus.txt"):
        Trainer(config(workspace, tmp_path / "run", eval_data=[held_out], eval_every=1))


def test_thought_gains_are_recorded_before_the_baseline_that_centres_the_rewards():
    """With two thoughts the centred rewards are +r and -r whatever thinking does; the raw gain
    (the NLL of the next K tokens without the thought minus with it) says whether it helps."""
    talk_tokens = 1
    labels = torch.tensor([[5, 6, 7, 8]])  # positions 0 and 1 act (i <= L - 2 - K)
    nll_base = torch.tensor([[1.0, 2.0, 3.0, 0.0]])  # -log p_base(x[i + 1])
    nll_talk = torch.tensor([[[0.5, 1.0, 2.0, 0.0], [0.9, 1.6, 2.5, 0.0]]])[..., None]  # [B, N, L, K], both help
    gains = nll_base[:, None] - nll_talk[..., 0]  # [1, 2, 4]
    out = SimpleNamespace(
        rewards=gains - gains.mean(dim=1, keepdim=True),
        nll_base=nll_base,
        nll_talk=nll_talk,
        mixing_weight=torch.full((1, 2, 4, talk_tokens), 0.5),
    )
    trainer = SimpleNamespace(qs=SimpleNamespace(config=SimpleNamespace(talk_tokens=talk_tokens)))
    sums = Trainer._signal_sums(trainer, out, labels, None)
    # The acting gains: thought 0 at positions 0, 1: 0.5, 1.0; thought 1: 0.1, 0.4.
    assert sums["gain_sum"] == pytest.approx(2.0) and sums["gain_positive"] == 4 and sums["reward_count"] == 4
    assert sums["reward_sum"] == pytest.approx(0.0) and sums["reward_positive"] == 2


def test_resuming_on_data_that_changed_since_the_checkpoint_is_refused(workspace, tmp_path, caplog):
    """A file added to the data folder changes every permutation of the windows: the resumed run
    would not continue the saved one's order, so it is refused; a checkpoint from before the
    fingerprint resumes with a note that the data is not checked."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text(CORPUS * 3)
    run = dict(data=[str(data)], max_steps=1, save_every=1)
    train(config(workspace, tmp_path / "run", **run))
    (data / "b.txt").write_text(CORPUS[::-1] * 3)
    with pytest.raises(ValueError, match="cannot resume from .*checkpoint-1: the data files hold other text"):
        train(config(workspace, tmp_path / "run", **{**run, "max_steps": 2, "resume": True}))
    state_file = tmp_path / "run" / "checkpoint-1" / checkpoints.TRAINER_STATE
    state = torch.load(state_file, weights_only=False)
    del state["data"]
    torch.save(state, state_file)
    with caplog.at_level(logging.INFO, logger="quietstar.train.checkpoints"):
        records = train(config(workspace, tmp_path / "run", **{**run, "max_steps": 2, "resume": True}))
    assert [r["step"] for r in records if r["split"] == "train"] == [2]
    assert "predates data fingerprints" in caplog.text
