"""Plots of result tables."""

from __future__ import annotations

from pathlib import Path


def plot_ppl_vs_size(rows, path, *, title: str = "") -> Path:
    """Perplexity against model size (MB), one labelled point per recipe; writes a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
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
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
