"""Plots of result tables and training curves (PNG files, matplotlib's Agg backend)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> Path:
    """Writes ``fig`` to ``path`` (parents made) and closes it."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def plot_ppl_vs_size(rows, path, *, title: str = "") -> Path:
    """Perplexity against model size (MB), one labelled point per recipe; writes a PNG."""
    fig, ax = _pyplot().subplots(figsize=(7, 4.5))
    seen: dict[float, int] = {}
    for r in rows:
        mb = r["model_bytes"] / 1e6
        k = seen.get(round(mb), 0)  # recipes of equal size: stagger their labels
        seen[round(mb)] = k + 1
        ax.scatter(mb, r["perplexity"], s=30)
        ax.annotate(f"{r['recipe']} ({r['perplexity']:.1f})", (mb, r["perplexity"]),
                    textcoords="offset points", xytext=(6, -4 + 11 * (k % 2) - 3 * k),
                    fontsize=7)
    ax.set_xlabel("model size (MB, codes + scales + float embeddings)")
    ax.set_yscale("log")
    ax.set_ylabel("perplexity, log scale (lower is better)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_training_curve(losses, path, *, title: str = "") -> Path:
    """The loss per step (and its running mean) with the perplexity scale on the right; a PNG."""
    losses = np.asarray(losses, np.float64)
    steps = np.arange(1, losses.size + 1)
    k = max(1, losses.size // 20)
    smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
    fig, ax = _pyplot().subplots(figsize=(7, 4.5))
    ax.plot(steps, losses, lw=0.8, alpha=0.4, label="train loss (per step)")
    if k > 1:
        ax.plot(steps[k - 1:], smooth, lw=1.6, label=f"running mean over {k} steps")
    ax.set_xlabel("step")
    ax.set_ylabel("next-token loss (nats)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    right = ax.twinx()
    lo, hi = ax.get_ylim()
    right.set_ylim(lo, hi)
    ticks = ax.get_yticks()
    ticks = ticks[(ticks >= lo) & (ticks <= hi)]
    right.set_yticks(ticks)
    right.set_yticklabels([f"{math.exp(t):.3g}" for t in ticks])
    right.set_ylabel("train perplexity")
    ax.set_title(title)
    return _save(fig, path)
