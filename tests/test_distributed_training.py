"""Training on several processes (torchrun, gloo on CPU): two processes of batch 1 take the
same steps as one process of batch 2, with DDP and with FSDP2, given the same thoughts; and a
step sampling its own thoughts, which replays its projections, has the gradients of the step
given those thoughts under both."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import CORPUS, tiny_model_folder
from safetensors.torch import load_file

from quietstar import QuietStarConfig
from quietstar.model.loaders import load_quietstar
from quietstar.train.distributed import setup

pytestmark = pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on the PATH")

# Thoughts that depend on the sample alone (not on which process or batch row holds it), so
# the runs can be compared step for step; the trainer's own sampling draws per process.
DRIVER = '''
import sys
import torch
from quietstar.model.quietstar_model import QuietStarModel


def thoughts_of_the_sample(self, input_ids, attention_mask=None, generator=None):
    cfg = self.config
    vocab = self.lm_head[0].shape[0]
    branch = torch.arange(cfg.n_thoughts, device=input_ids.device)[None, :, None, None]
    step = torch.arange(cfg.thought_tokens, device=input_ids.device)
    return (input_ids[:, None, :, None] * 7 + branch * 13 + step * 5 + 3) % vocab


QuietStarModel.sample_thoughts = thoughts_of_the_sample
from quietstar.train.cli import main

sys.exit(main(sys.argv[1:]))
'''


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    # A checkpoint whose mixing head already mixes: at the zero start the rewards are float32
    # noise (talk equals base), and a noise-driven policy gradient differs between any two runs.
    qs = load_quietstar(tiny_model_folder(root / "hf"), QuietStarConfig(thought_tokens=2, talk_tokens=2))
    torch.nn.init.normal_(qs.mixing_head.mlp[-1].weight, std=0.3, generator=torch.Generator().manual_seed(3))
    qs.save_pretrained(root / "model")
    (root / "corpus.txt").write_text(CORPUS * 20, encoding="utf-8")
    (root / "driver.py").write_text(DRIVER)
    return root


def run(workspace, out, processes: int, batch_size: int, *extra: str):
    options = ["train", "--model", str(workspace / "model"), "--data", str(workspace / "corpus.txt"), "--out", str(out),
               "--cache-dir", str(workspace / "cache"), "--max-steps", "3", "--seq-len", "16", "--grad-accum", "1",
               "--batch-size", str(batch_size), "--thought-tokens", "2", "--talk-tokens", "2", "--lr", "0.05",
               "--warmup-steps", "1", "--policy-weight", "100", "--tokenizer-workers", "0", "--save-every", "0",
               # Adam's eps far above the gradients makes its step proportional to the gradient:
               # with the default, coordinates whose gradient is float32 noise would move by
               # a whole learning rate in either direction, and the weights could not be compared.
               "--adam-eps", "1", "--device", "cpu", *extra]  # gloo: two processes need no two GPUs
    launcher = ["torchrun", "--standalone", f"--nproc-per-node={processes}"] if processes > 1 else [sys.executable]
    done = subprocess.run(launcher + [str(workspace / "driver.py")] + options, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    final = out / "checkpoint-3"
    return records, {**load_file(str(final / "model.safetensors")), **load_file(str(final / "quietstar.safetensors"))}


@pytest.fixture(scope="module")
def single(workspace):
    return run(workspace, workspace / "single", processes=1, batch_size=2)


@pytest.mark.parametrize("sharding", [[], ["--fsdp"]], ids=["ddp", "fsdp2"])
def test_two_processes_of_batch_one_equal_one_process_of_batch_two(workspace, single, sharding):
    records, final = run(workspace, workspace / f"two{'-'.join(sharding)}", 2, 1, *sharding)
    expected_records, expected_final = single
    for got, want in zip(records, expected_records):
        assert got["tokens"] == want["tokens"]
        for name in ("loss", "nll_loss", "grad_norm"):
            assert got[name] == pytest.approx(want[name], rel=1e-5), (got["step"], name)
        # Rewards are differences of NLLs a million times larger here: compare the policy
        # loss on the scale of the NLLs (float32 rounding of the averaged gradients moves it).
        assert got["policy_loss"] == pytest.approx(want["policy_loss"], abs=1e-5 * want["nll_loss"]), got["step"]
    assert final.keys() == expected_final.keys()
    for name, value in expected_final.items():
        error = ((final[name].double() - value.double()).norm() / value.double().norm().clamp(min=1e-30)).item()
        # The meta embeddings sum gradients over every position of every chain step: DDP's
        # average and one batch's mean round those sums differently (float32), about 1.4e-5.
        assert error <= (3e-5 if name == "meta_embeddings" else 1e-5), (name, error)


def test_more_processes_than_gpus_is_an_error_naming_local_rank(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ValueError, match=r"LOCAL_RANK=1 but this node has 1 CUDA device"):
        setup("cuda")


def test_setup_takes_rank_and_world_from_a_group_the_caller_started(monkeypatch):
    # torch.multiprocessing.spawn and init_process_group(rank=, world_size=) set no RANK or
    # WORLD_SIZE: every process used to run as rank 0 of 1 (no gradient sync, the same data).
    from quietstar.train import distributed

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 2)
    group = setup("cpu")
    assert (group.rank, group.world) == (1, 2) and not group.is_main
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"RANK=0 and WORLD_SIZE=2 of the environment disagree"):
        setup("cpu")


# Each process: a group started by the caller, a training run in it, then the caller's own
# collective and destroy (the group is the caller's: the run must leave it as it found it).
SPAWN_DRIVER = """
import os
import sys
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pathlib import Path


def worker(rank, root):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/store", rank=rank, world_size=2)
    from quietstar.train import TrainConfig, train
    from quietstar.train.trainer import Trainer
    run = TrainConfig(model=f"{root}/model", data=[f"{root}/corpus.txt"], out=f"{root}/run", cache_dir=f"{root}/cache",
                      max_steps=1, save_every=0, seq_len=16, grad_accum=1, thought_tokens=2, talk_tokens=2,
                      n_thoughts=2, warmup_steps=1, tokenizer_workers=0)
    train(run)
    trainer = Trainer(run.__class__(**{**run.to_dict(), "out": f"{root}/again"}))
    seen = (trainer.group.rank, trainer.group.world)
    trainer.close()
    dist.barrier()
    dist.destroy_process_group()
    Path(f"{root}/rank{rank}.txt").write_text(f"{seen[0]} {seen[1]}")


if __name__ == "__main__":
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(name, None)
    mp.spawn(worker, args=(sys.argv[1],), nprocs=2)
"""


def test_a_run_in_a_group_the_caller_started_takes_its_ranks_and_leaves_it_to_the_caller(workspace, tmp_path):
    for name in ("model", "corpus.txt"):
        (tmp_path / name).symlink_to(workspace / name)
    driver = tmp_path / "spawn_driver.py"
    driver.write_text(SPAWN_DRIVER)
    done = subprocess.run([sys.executable, str(driver), str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [(tmp_path / f"rank{rank}.txt").read_text() for rank in range(2)] == ["0 2", "1 2"]


# Each process: a step sampling its own thoughts (the projection replay) and the step given
# those thoughts, through DDP or FSDP2; writes the replays counted and the gradients' error.
REPLAY_DRIVER = """
import sys
import torch
import torch.distributed as dist
sys.path.insert(0, sys.argv[2])
from helpers import quietstar_model, relative_error
from quietstar.model import projection_replay
from quietstar.train.distributed import ProcessGroup, teardown, wrap

calls = []
forward = projection_replay.ReplayedLinear.forward
projection_replay.ReplayedLinear.forward = staticmethod(lambda ctx, *a: calls.append(1) or forward(ctx, *a))
dist.init_process_group("gloo")
rank = dist.get_rank()
qs = quietstar_model("llama", thought_tokens=2, talk_tokens=2, n_thoughts=2).double().train()  # float64: test_projection_replay.py
group = ProcessGroup(rank, dist.get_world_size(), torch.device("cpu"))
module = wrap(qs, group, fsdp=sys.argv[1] == "fsdp")
ids = torch.randint(0, 97, (1, 8), generator=torch.Generator().manual_seed(rank))

def grads(**options):
    qs.zero_grad(set_to_none=True)
    out = module(ids, **options)
    out.loss.backward()
    full = {n: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad for n, p in qs.named_parameters() if p.grad is not None}
    return out, {n: g.clone() for n, g in full.items()}

sampled, replayed = grads(generator=torch.Generator().manual_seed(1))
replays = len(calls)
_, given = grads(thoughts=sampled.thoughts)
assert replayed.keys() == given.keys()
error = max(relative_error(replayed[n], given[n]) for n in given)
open(f"{sys.argv[3]}/rank{rank}.txt", "w").write(f"{replays} {error}")
del module, qs
teardown(group)
"""


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_a_sampling_step_replays_its_projections_under_ddp_and_fsdp2(tmp_path, sharding):
    driver = tmp_path / "replay_driver.py"
    driver.write_text(REPLAY_DRIVER)
    tests = str(Path(__file__).resolve().parent)
    done = subprocess.run(
        ["torchrun", "--standalone", "--nproc-per-node=2", str(driver), sharding, tests, str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = [(tmp_path / f"rank{rank}.txt").read_text().split() for rank in range(2)]
    for replays, error in results:
        assert int(replays) == 2 * 7  # every projection of both layers
        assert float(error) <= 1e-10


@pytest.fixture
def gloo_group_of_one(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield dist
    if dist.is_initialized():
        dist.destroy_process_group()


def test_teardown_frees_a_gloo_group_nothing_else_holds_without_waiting(gloo_group_of_one, monkeypatch):
    import weakref

    from quietstar.train import distributed

    dist = gloo_group_of_one
    dist.all_reduce(torch.ones(3))  # the worker threads have run a collective
    world = weakref.ref(dist.group.WORLD)
    slept = []
    monkeypatch.setattr(distributed.time, "sleep", slept.append)
    distributed.teardown(distributed.ProcessGroup(0, 2, torch.device("cpu")))
    assert not dist.is_initialized()
    assert world() is None  # destroyed, so its worker threads were joined
    assert slept == []


def test_teardown_gives_gloo_workers_time_when_the_group_outlives_it(gloo_group_of_one, monkeypatch):
    from quietstar.train import distributed

    dist = gloo_group_of_one
    holder = [dist.group.WORLD]  # as FSDP2's state on a model holds it
    slept = []
    monkeypatch.setattr(distributed.time, "sleep", slept.append)
    distributed.teardown(distributed.ProcessGroup(0, 2, torch.device("cpu")))
    assert not dist.is_initialized()
    assert slept == [distributed.GLOO_WORKERS_SETTLE_S]
    del holder
