"""Where do thoughts help? The per-token reward of a thought over a text, as HTML and PNG.

Token ``x[i]`` is coloured by the reward of the thought inserted after it (which predicts
``x[i+1] .. x[i+K]``): the training reward of SPEC section 3 with one thought, so no baseline
and no clamping, i.e. how much the thought lowered the NLL of the next ``K`` tokens. Green
where it helped, yellow where it hurt, opacity by magnitude (the largest one opaque); the
thought shows on hover. The last ``K`` tokens, which fewer than ``K`` tokens follow, have no
thought judged on the same ``K`` tokens and stay uncoloured.
"""

from __future__ import annotations

import html
import logging
from pathlib import Path

import torch

from quietstar.model.quietstar_model import QuietStarModel
from quietstar.train.evaluation import EvalOptions, thinking

logger = logging.getLogger(__name__)

HELPED_RGB = (0, 160, 0)
HURT_RGB = (230, 180, 0)
PNG_LINE_CHARS = 90  # characters per line of the PNG's text
PNG_FONT_POINTS = 9
PNG_CHAR_INCHES = 0.6 * PNG_FONT_POINTS / 72  # a monospace glyph's advance


@torch.no_grad()
def reward_heatmap(qs: QuietStarModel, token_ids: list[int], options: EvalOptions) -> dict:
    """Rewards and thoughts over the first ``options.seq_len`` of ``token_ids``.

    Returns:
        ``tokens`` (their text), ``rewards`` (float per token, None for the last ``K``, which
        fewer than ``K`` tokens follow) and ``thoughts`` (the text of the thought after each
        token).
    """
    if qs.tokenizer is None:
        raise ValueError("model: it has no tokenizer to show the text")
    ids = token_ids[: options.seq_len]
    with thinking(qs, options):
        judged = len(ids) - qs.config.talk_tokens  # tokens followed by K tokens
        if judged < 1:
            raise ValueError(f"data: the text has {len(ids)} token(s); a heatmap needs more than talk_tokens="
                             f"{qs.config.talk_tokens}")
        device = qs.meta_embeddings.device
        generator = torch.Generator(device).manual_seed(options.seed)
        out = qs.evaluate(torch.tensor([ids], device=device), generator=generator)
        rewards = out.rewards[0, 0].tolist()
        decode = qs.tokenizer.decode
        return {
            "tokens": [decode([t]) for t in ids],
            "rewards": rewards[:judged] + [None] * (len(ids) - judged),
            "thoughts": [decode(t) for t in out.thoughts[0, 0].tolist()],
            "thought_tokens": qs.config.thought_tokens,
            "talk_tokens": qs.config.talk_tokens,
            "temperature": options.temperature,
            "seed": options.seed,
        }


def _colour(reward: float | None, scale: float) -> tuple[tuple[int, int, int], float]:
    if reward is None or scale == 0:
        return HELPED_RGB, 0.0
    return (HELPED_RGB if reward > 0 else HURT_RGB), min(1.0, abs(reward) / scale)


def _scale(rewards: list[float | None]) -> float:
    return max((abs(r) for r in rewards if r is not None), default=0.0)


def heatmap_html(heatmap: dict, title: str = "Quiet-STaR thought rewards") -> str:
    """A self-contained HTML page: one coloured ``<span>`` per token, the reward and the
    thought in its ``title`` (shown on hover)."""
    scale = _scale(heatmap["rewards"])
    spans = []
    for token, reward, thought in zip(heatmap["tokens"], heatmap["rewards"], heatmap["thoughts"]):
        (r, g, b), alpha = _colour(reward, scale)
        if reward is None:
            hover = f"fewer than {heatmap['talk_tokens']} tokens follow: no thought judged"
        else:
            hover = f"reward {reward:+.4f}; thought: {thought}"
        text = html.escape(token).replace("\n", "&#8629;<br>")
        spans.append(f'<span class="token" style="background: rgba({r}, {g}, {b}, {alpha:.3f})" '
                     f'title="{html.escape(hover, quote=True)}">{text}</span>')
    legend = (f"T={heatmap['thought_tokens']} thought tokens, K={heatmap['talk_tokens']} talk tokens; green: the "
              f"thought after the token lowered the NLL of the next K tokens, yellow: it raised it; opacity: "
              f"|reward| / {scale:.4f}. Hover a token for its reward and thought.")
    return (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title>"
        "<style>body{font-family:monospace;max-width:60em;margin:2em auto;line-height:1.6}"
        ".token{white-space:pre-wrap}</style></head>\n<body>"
        f"<h1>{html.escape(title)}</h1><p>{html.escape(legend)}</p>\n<p>" + "".join(spans) + "</p></body></html>\n"
    )


def write_heatmap_png(heatmap: dict, path: str | Path) -> None:
    """The same picture as a PNG (needs matplotlib: ``pip install quietstar[plots]``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("a PNG needs matplotlib: pip install 'quietstar[plots]'") from None
    scale = _scale(heatmap["rewards"])
    placed, line, column = [], 0, 0
    for token, reward in zip(heatmap["tokens"], heatmap["rewards"]):
        for part_index, part in enumerate(token.split("\n")):
            if part_index:
                line, column = line + 1, 0
            if column + len(part) > PNG_LINE_CHARS and column:
                line, column = line + 1, 0
            if part:
                placed.append((column, line, part, reward))
                column += len(part)
    lines = line + 1
    width, height = PNG_LINE_CHARS * PNG_CHAR_INCHES, lines * 2.2 * PNG_FONT_POINTS / 72
    figure = plt.figure(figsize=(width + 0.4, height + 0.4), dpi=120)
    axes = figure.add_axes((0.2 / (width + 0.4), 0.2 / (height + 0.4), width / (width + 0.4), height / (height + 0.4)))
    axes.set_xlim(0, PNG_LINE_CHARS)
    axes.set_ylim(lines, -1)
    axes.axis("off")
    for column, row, text, reward in placed:
        colour, alpha = _colour(reward, scale)
        axes.add_patch(plt.Rectangle((column, row - 0.45), len(text), 0.9, color=[c / 255 for c in colour], alpha=alpha, lw=0))
        axes.text(column, row, text.replace(" ", "\u00a0"), family="monospace", fontsize=PNG_FONT_POINTS, va="center", ha="left")
    figure.savefig(path)
    plt.close(figure)
