"""The loss plot of a run, drawn from its metrics.jsonl."""

from __future__ import annotations

import json
import os
from pathlib import Path


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text("utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # blank, or the last line of a run killed while writing it
    return rows


def plot_losses(metrics: Path, out: Path) -> bool:
    """Training (and eval) loss against step, as a PNG. Returns False when there is nothing to draw."""
    rows = read_metrics(metrics)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if not train and not evals:
        return False
    import matplotlib

    matplotlib.use("Agg")  # no display needed; chosen before pyplot is imported
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", color="tab:orange")
    ax.set_xlabel("optimizer step")
    accuracy = [(r["step"], r["rewards/accuracies"]) for r in rows if "rewards/accuracies" in r]
    held_out = [(r["step"], r["eval_rewards/accuracies"]) for r in rows if "eval_rewards/accuracies" in r]
    ax.set_ylabel("preference loss" if accuracy or held_out else "loss (mean over trained tokens)")
    ax.set_title(metrics.parent.name)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    if accuracy or held_out:  # stage: dpo: preference accuracy on a second axis, 0 to 1
        acc = ax.twinx()
        if accuracy:
            acc.plot(*zip(*accuracy), label="train accuracy", color="tab:green", alpha=0.6)
        if held_out:
            acc.plot(*zip(*held_out), "s-", label="eval accuracy", color="tab:red")
        acc.set_ylim(0, 1.05)
        acc.set_ylabel("preference accuracy")
        acc.legend(loc="upper right")
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out)
    return True
