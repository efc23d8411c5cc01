"""The plots of docs/results.md, from the run's metrics.jsonl and the perplexity reports.

    python docs/results/plot.py RUN/metrics.jsonl BEFORE_PPL.json AFTER_PPL.json OUT_FOLDER

Writes training.png (NLL loss, mean reward and mean mixing weight over the steps, with a
running mean) and deciles.png (thinking's NLL gain by decile of the base NLL, before and after).
Needs matplotlib (pip install 'quietstar[plots]').
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

WINDOW = 10  # steps in the running mean


def running_mean(values: list[float], window: int = WINDOW) -> list[float]:
    return [sum(values[max(0, i - window + 1) : i + 1]) / len(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]


def plot_training(metrics: Path, out: Path) -> None:
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    train = [r for r in records if r["split"] == "train"]
    steps = [r["step"] for r in train]
    panels = [("nll_loss", "language-model loss (nats)"), ("reward_mean", "mean reward (after baseline and clamping)"),
              ("mixing_weight_mean", "mean mixing weight w")]
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (key, title) in zip(axes, panels):
        values = [r[key] for r in train]
        ax.plot(steps, values, lw=0.8, alpha=0.45, label="per step")
        ax.plot(steps, running_mean(values), lw=1.8, label=f"mean of {WINDOW} steps")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(out / "training.png", dpi=110)
    plt.close(figure)


def plot_deciles(before: Path, after: Path, out: Path) -> None:
    figure, ax = plt.subplots(figsize=(7, 3.8))
    width = 0.4
    for offset, (name, path) in zip((-width / 2, width / 2), (("before training", before), ("after training", after))):
        rows = json.loads(path.read_text())["by_decile"]
        ax.bar([r["decile"] + offset for r in rows], [r["gain"] for r in rows], width=width, label=name)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(1, 11))
    ax.set_xlabel("decile of the base model's NLL (10: hardest tokens)")
    ax.set_ylabel("NLL base - NLL thinking (nats)")
    ax.set_title("Held-out NLL gain from thinking, by token difficulty")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(out / "deciles.png", dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    metrics, before, after, folder = map(Path, sys.argv[1:5])
    folder.mkdir(parents=True, exist_ok=True)
    plot_training(metrics, folder)
    plot_deciles(before, after, folder)
