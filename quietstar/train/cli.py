"""The ``quietstar`` command line (also ``python -m quietstar``).

    quietstar train --model PATH --data FILE... --out DIR [--config cfg.yaml] [options]
    quietstar generate --model PATH --prompt TEXT [--max-new-tokens N] [--show-thoughts]

``quietstar train --help`` lists every option with its default. A flag overrides the config
file, which overrides the defaults. A user's mistake (a bad path, a bad value, a malformed data
file) prints one line naming it and exits with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys

from quietstar.model.config import MIX_MODES
from quietstar.train.config import CHECKPOINTING, DTYPES, LR_SCHEDULES, PACKING, TrainConfig

logger = logging.getLogger(__name__)

USAGE_ERROR = 2
CHOICES = {"dtype": DTYPES, "packing": PACKING, "lr_schedule": LR_SCHEDULES, "mix": MIX_MODES, "device": ("auto", "cpu", "cuda"),
           "gradient_checkpointing": CHECKPOINTING}
METAVARS = {"model": "PATH", "data": "FILE", "eval_data": "FILE", "out": "DIR", "cache_dir": "DIR", "text_field": "NAME"}


def _add_train_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="YAML", help="a YAML file of options (keys: the option names); flags override it")
    for field in dataclasses.fields(TrainConfig):
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        flag = "--" + field.name.replace("_", "-")
        text = f"{field.metadata['help']} (default: {default!r})"
        options = {"dest": field.name, "default": argparse.SUPPRESS, "help": text}
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **options)
        elif isinstance(default, list):
            parser.add_argument(flag, nargs="+", metavar=METAVARS.get(field.name, "VALUE"), **options)
        else:
            kind = type(default)
            parser.add_argument(flag, type=kind, choices=CHOICES.get(field.name), metavar=METAVARS.get(field.name), **options)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quietstar", description="Train and run language models that think before each token (Quiet-STaR).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train = commands.add_parser("train", help="train a model to think on a corpus", description=__doc__.split("\n\n")[0])
    _add_train_options(train)
    generate = commands.add_parser("generate", help="generate text, thinking before each token")
    generate.add_argument("--model", required=True, metavar="PATH", help="a QuietStarModel checkpoint, a Hugging Face model folder or a .gguf file")
    generate.add_argument("--prompt", required=True, action="append", metavar="TEXT", help="a prompt (repeat for a batch)")
    generate.add_argument("--max-new-tokens", type=int, default=20, help="tokens to generate per prompt (default: 20)")
    generate.add_argument("--show-thoughts", action="store_true", help="print each token's thought between <|startthought|> and <|endthought|>")
    generate.add_argument("--greedy", action="store_true", help="take the most likely token and thought token instead of sampling")
    generate.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the text tokens (default: 1.0)")
    generate.add_argument("--thought-tokens", type=int, help="thought length (default: the checkpoint's)")
    generate.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    generate.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="(default: auto)")
    return parser


def _configure_logging() -> None:
    main_process = os.environ.get("RANK", "0") == "0"
    logging.basicConfig(level=logging.INFO if main_process else logging.WARNING, format="%(asctime)s %(name)s: %(message)s")


def run_train(args: argparse.Namespace) -> int:
    from quietstar.train.trainer import train

    values = TrainConfig.from_yaml(args.config) if args.config else {}
    values.update({k: v for k, v in vars(args).items() if k not in ("command", "config")})
    missing = [f"--{name}" for name in ("model", "data", "out") if not values.get(name)]
    if missing:
        raise ValueError(f"{', '.join(missing)} required (as flags or in --config)")
    config = TrainConfig.from_dict(values, source=args.config or "options")
    records = train(config)
    last = next((r for r in reversed(records) if r["split"] == "train"), None)
    if last is not None:
        logger.info("step %d: loss %.4g, nll_loss %.4g; run folder %s", last["step"], last["loss"], last["nll_loss"], config.out)
    return 0


def run_generate(args: argparse.Namespace) -> int:
    import torch

    from quietstar.model.loaders import load_quietstar
    from quietstar.model.quietstar_model import END_THOUGHT, START_THOUGHT

    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    qs = load_quietstar(args.model)
    if args.thought_tokens is not None:
        qs.config = dataclasses.replace(qs.config, thought_tokens=args.thought_tokens)
    if qs.tokenizer is None:
        raise ValueError(f"--model {args.model}: it has no tokenizer to read the prompt")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    qs = qs.to(device).eval()
    tokenizer = qs.tokenizer
    tokenizer.padding_side = "left"
    batch = tokenizer(args.prompt, return_tensors="pt", padding=True).to(device)
    generator = torch.Generator(device).manual_seed(args.seed)
    with torch.no_grad():
        out = qs.generate(
            batch.input_ids, batch.attention_mask, max_new_tokens=args.max_new_tokens, do_sample=not args.greedy,
            temperature=args.temperature, sample_thoughts=not args.greedy, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, return_thoughts=True, generator=generator,
        )
    prompt_len = batch.input_ids.shape[1]
    for row, prompt in enumerate(args.prompt):
        new = out.sequences[row, prompt_len:].tolist()
        if args.show_thoughts:
            pieces = [
                f"{START_THOUGHT}{tokenizer.decode(out.thoughts[row, i].tolist())}{END_THOUGHT}{tokenizer.decode([token])}"
                for i, token in enumerate(new)
            ]
            print(prompt + "".join(pieces))
        else:
            print(prompt + tokenizer.decode(new, skip_special_tokens=True))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging()
    try:
        return run_train(args) if args.command == "train" else run_generate(args)
    except ValueError as error:
        print(f"quietstar {args.command}: error: {error}", file=sys.stderr)
        return USAGE_ERROR
