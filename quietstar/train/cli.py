"""The ``quietstar`` command line (also ``python -m quietstar``).

    quietstar train --model PATH --data FILE... --out DIR [--config cfg.yaml] [options]
    quietstar generate --model PATH --prompt TEXT [--max-new-tokens N] [--show-thoughts]
    quietstar eval {perplexity,gsm8k,csqa,heatmap} --model PATH --data FILE... [--out FILE]

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
EVAL_TASKS = ("perplexity", "gsm8k", "csqa", "heatmap")
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
    _add_eval_parser(commands)
    return parser


def _add_eval_parser(commands) -> None:
    from quietstar.train.evaluation import DEFAULT_THOUGHT_TEMPERATURE, EvalOptions

    defaults = EvalOptions()
    evaluate = commands.add_parser(
        "eval", help="does thinking help? perplexity by difficulty, zero-shot GSM8K / CommonsenseQA, reward heatmaps",
        description="Score a model with and without thinking (docs/evaluation.md).",
    )
    evaluate.add_argument("task", choices=EVAL_TASKS, help="perplexity: held-out text by decile of the base NLL; gsm8k, "
                          "csqa: the authors' zero-shot scores; heatmap: each token's thought reward as HTML and PNG")
    evaluate.add_argument("--model", required=True, metavar="PATH", help="a QuietStarModel checkpoint, a Hugging Face model folder or a .gguf file")
    evaluate.add_argument("--data", required=True, nargs="+", metavar="FILE", help="perplexity, heatmap: text or JSONL files as "
                          "the trainer reads them (heatmap: the first document); gsm8k: test.jsonl; csqa: dev_rand_split.jsonl")
    evaluate.add_argument("--out", metavar="FILE", help="where the JSON report goes (heatmap: FILE.html, with .png and .json beside it)")
    evaluate.add_argument("--thought-tokens", type=int, help="thought length (default: the checkpoint's)")
    evaluate.add_argument("--temperature", type=float, default=DEFAULT_THOUGHT_TEMPERATURE,
                          help=f"sampling temperature of the thought tokens (default: {DEFAULT_THOUGHT_TEMPERATURE}, near greedy)")
    evaluate.add_argument("--batch-size", type=int, default=defaults.batch_size,
                          help=f"sequences per forward (perplexity, gsm8k, csqa; default: {defaults.batch_size})")
    evaluate.add_argument("--limit", type=int, help="score a seeded subset of N items (windows for perplexity; not heatmap; default: all)")
    evaluate.add_argument("--seed", type=int, default=defaults.seed, help=f"seed of the subset and the thoughts (default: {defaults.seed})")
    evaluate.add_argument("--seq-len", type=int, default=defaults.seq_len, help=f"tokens per window (perplexity, heatmap; default: {defaults.seq_len})")
    evaluate.add_argument("--text-field", default="text", metavar="NAME", help="the JSONL field of the text (perplexity, heatmap; default: text)")
    evaluate.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="(default: auto)")


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


def _stop_ids(qs) -> list[int] | None:
    """The ids that end a row: the tokenizer's EOS and every end id the model's generation
    config lists (instruction-tuned models list several, such as an end of turn and the end of
    text); None where there is none."""
    listed = getattr(getattr(qs.model, "generation_config", None), "eos_token_id", None)
    ids = [] if listed is None else [listed] if isinstance(listed, int) else list(listed)
    if qs.tokenizer.eos_token_id is not None:
        ids.append(qs.tokenizer.eos_token_id)
    return sorted(set(ids)) or None


def run_generate(args: argparse.Namespace) -> int:
    import torch

    from quietstar.model.loaders import load_quietstar
    from quietstar.model.quietstar_model import END_THOUGHT, START_THOUGHT

    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    qs = load_quietstar(args.model, dtype=None)  # as stored: inference needs no float32 master weights
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
            temperature=args.temperature, sample_thoughts=not args.greedy, eos_token_id=_stop_ids(qs),
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


def run_eval(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    import torch

    from quietstar.model.loaders import load_quietstar
    from quietstar.train.data import find_files, load_token_documents
    from quietstar.train.eval_data import read_items
    from quietstar.train.evaluation import EvalOptions, answer_scores, perplexity

    options = EvalOptions(thought_tokens=args.thought_tokens, temperature=args.temperature, batch_size=args.batch_size,
                          limit=args.limit, seed=args.seed, seq_len=args.seq_len)
    find_files(args.data)  # a bad path fails before the model loads
    if args.task == "heatmap":
        if args.limit is not None:
            raise ValueError("--limit: heatmap shows one text (the first document of --data); leave it out")
        # The page, its JSON and its PNG share the name: an --out ending in .json or .png would
        # have the page overwritten by one of them.
        page = Path(args.out or "heatmap.html")
        if page.suffix in (".json", ".png"):
            raise ValueError(f"--out: heatmap writes FILE.html with FILE.png and FILE.json beside it; got {str(page)!r}")
    qs = load_quietstar(args.model, dtype=None)  # as stored: inference needs no float32 master weights
    if qs.tokenizer is None:
        raise ValueError(f"--model {args.model}: it has no tokenizer to read the data")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    qs = qs.to(device)
    if args.task in ("perplexity", "heatmap"):
        documents = load_token_documents(args.data, qs.tokenizer, args.text_field, cache_dir=None, workers=0)
    if args.task == "heatmap":
        from quietstar.train.heatmap import heatmap_html, reward_heatmap, write_heatmap_png

        heatmap = reward_heatmap(qs, documents[0].tolist(), options)
        page.parent.mkdir(parents=True, exist_ok=True)
        page.write_text(heatmap_html(heatmap), encoding="utf-8")
        page.with_suffix(".json").write_text(json.dumps(heatmap, indent=1), encoding="utf-8")
        write_heatmap_png(heatmap, page.with_suffix(".png"))
        print(f"heatmap of {len(heatmap['tokens'])} tokens: {page}, {page.with_suffix('.png')}, {page.with_suffix('.json')}")
        return 0
    if args.task == "perplexity":
        report = perplexity(qs, documents, options)
    else:
        report = answer_scores(qs, args.task, read_items(args.task, args.data), options)
    report["model"] = str(args.model)
    report["data"] = [str(p) for p in args.data]
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1), encoding="utf-8")
    print(format_summary(report))
    return 0


def format_summary(report: dict) -> str:
    """One screen: the task's scores with and without thinking (perplexity: and by decile)."""
    head = f"{report['task']}: {report['items']} items, thought {report['thought_tokens']} tokens at temperature {report['temperature']}"
    if report["task"] != "perplexity":
        return "\n".join([
            head,
            f"  score (mean renormalised gold probability): base {report['score_base']:.4f}, thinking {report['score_thinking']:.4f}",
            f"  exact (every gold token the most likely):  base {report['exact_base']:.4f}, thinking {report['exact_thinking']:.4f}",
        ])
    lines = [
        head + f", {report['tokens']} tokens",
        f"  NLL base {report['score_base']:.4f} (perplexity {report['perplexity_base']:.2f}), thinking "
        f"{report['score_thinking']:.4f} (perplexity {report['perplexity_thinking']:.2f}); thinking helped on "
        f"{100 * report['helped_fraction']:.1f}% of tokens",
        "  decile of base NLL | tokens | NLL base | NLL thinking |  gain  | helped",
    ]
    for row in report["by_decile"]:
        if row["tokens"]:
            lines.append(f"  {row['decile']:>2} ({row['base_nll_from']:6.2f}-{row['base_nll_to']:6.2f}) | {row['tokens']:>6} | "
                         f"{row['nll_base']:8.4f} | {row['nll_thinking']:12.4f} | {row['gain']:+.4f} | {100 * row['helped_fraction']:5.1f}%")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging()
    run = {"train": run_train, "generate": run_generate, "eval": run_eval}[args.command]
    try:
        return run(args)
    except ValueError as error:
        print(f"quietstar {args.command}: error: {error}", file=sys.stderr)
        return USAGE_ERROR
