"""The trainer's overhead: optimizer steps of ``quietstar.train.Trainer`` (data, records,
progress bar, validation off, checkpoints) against the same number of bare
``loss.backward(); clip_grad_norm_(); optimizer.step()`` calls on the same batches, already in
memory (clipping is the algorithm's, so both do it).

SmolLM2-135M's shapes with random weights (vocabulary 49,152, width 576, 9/3 heads): 20 steps
of one layer, L=32 and a shorter thought at the default scale, so the case takes about a
minute; the full scale is 20 steps at the training-step case's size with all 30 layers. A
checkpoint is written every 10 steps. The text is synthetic and its
tokenizer is trained here (no download): the cost of a step does not depend on either.
"""

from __future__ import annotations

import atexit
import random
import shutil
import tempfile
from pathlib import Path

import torch

from cases.training_step import MODELS, matmul_shapes as step_matmul_shapes, useful_flops as step_flops

BASELINE = "bare"
COLD_START = True  # one run of the whole schedule is long enough to time


def baseline(device: torch.device) -> str:
    return BASELINE


def variants(device: torch.device) -> list[str]:
    return ["bare", "trainer"]


def sizes(device: torch.device, scale: str) -> list[dict]:
    step = dict(model="smollm2-135m", batch=1, n_thoughts=1)
    if scale == "quick":
        return [dict(step, layers=1, length=16, thought_tokens=2, talk_tokens=2, steps=4)]
    if scale == "full":
        return [dict(step, layers=30, length=128, thought_tokens=9, talk_tokens=4, steps=20)]
    return [dict(step, layers=1, length=32, thought_tokens=4, talk_tokens=2, steps=20)]


def label(size: dict) -> str:
    return f"{size['steps']} steps, {size['layers']} layers, L={size['length']}"


def tokens(size: dict) -> int:
    """Text tokens one run trains on."""
    return size["steps"] * size["batch"] * size["length"]


def matmul_shapes(size: dict, device: torch.device) -> tuple[torch.dtype, list[tuple[int, int, int, int, int]]]:
    return step_matmul_shapes(size, device)


def useful_flops(size: dict, variant: str, device: torch.device) -> float:
    return size["steps"] * step_flops(size, variant, device)


def _corpus(words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    vocabulary = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8))) for _ in range(3000)]
    return " ".join(rng.choice(vocabulary) for _ in range(words))


def _tokenizer(text: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=4000, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<eos>")


def build(variant: str, s: dict, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    from quietstar import QuietStarConfig, QuietStarModel
    from quietstar.train import TrainConfig, Trainer
    from quietstar.train.data import step_positions

    work = Path(tempfile.mkdtemp(prefix="quietstar-bench-train-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    text = _corpus(words=40 * s["length"] * s["steps"])
    (work / "corpus.txt").write_text(text)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**MODELS[s["model"]], "num_hidden_layers": s["layers"]}))
    qs_config = QuietStarConfig(thought_tokens=s["thought_tokens"], talk_tokens=s["talk_tokens"], n_thoughts=s["n_thoughts"])
    qs = QuietStarModel(model, _tokenizer(text), qs_config)
    config = TrainConfig(
        data=[str(work / "corpus.txt")], out=str(work / "run"), cache_dir=str(work / "cache"), seq_len=s["length"],
        batch_size=s["batch"], grad_accum=1, max_steps=s["steps"], thought_tokens=s["thought_tokens"],
        talk_tokens=s["talk_tokens"], n_thoughts=s["n_thoughts"], save_every=s["steps"] // 2, tokenizer_workers=0,
        device=device.type,
    )
    trainer = Trainer(config, qs)
    if variant == "trainer":
        def step():
            shutil.rmtree(work / "run", ignore_errors=True)
            trainer.train()

        return step, {"note": f"a checkpoint every {s['steps'] // 2} steps"}

    batches = [trainer.train_windows.batch(step_positions(i, 0, 1, 0, 1, s["batch"])).to(device) for i in range(s["steps"])]
    generator = torch.Generator(device).manual_seed(0)

    def step():
        for batch in batches:
            out = qs(batch.input_ids, batch.attention_mask, batch.labels, generator=generator)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(qs.parameters(), config.max_grad_norm)  # the algorithm's, not overhead
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)

    return step, {"note": "backward, clipping, optimizer step on batches in memory"}
