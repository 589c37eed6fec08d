"""Plots for people: needle heatmaps (red to green; rows depth, columns length) and loss-by-position curves."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import LinearSegmentedColormap  # noqa: E402

from .passkey import Grid  # noqa: E402

_RED_GREEN = LinearSegmentedColormap.from_list("niah", ["#F0496E", "#EBB839", "#0CD79F"])


def heatmap(grids: dict[str, Grid], path: Path, title: str, window: int | None = None) -> Path:
    """One panel per model: accuracy per (depth, length), with the base window marked."""
    fig, axes = plt.subplots(1, len(grids), figsize=(4.8 * len(grids) + 0.8, 3.6), squeeze=False)
    for ax, (name, g) in zip(axes[0], grids.items(), strict=True):
        im = ax.imshow(g.acc, cmap=_RED_GREEN, vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(g.lengths)), [f"{n:,}" for n in g.lengths], rotation=45)
        ax.set_yticks(range(len(g.depths)), [f"{d:.0%}" for d in g.depths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title(f"{name}: mean {g.acc.mean():.0%}")
        for i in range(g.acc.shape[0]):
            for j in range(g.acc.shape[1]):
                ax.text(j, i, f"{g.acc[i, j]:.0%}", ha="center", va="center", fontsize=7)
        if window is not None:
            inside = [j for j, n in enumerate(g.lengths) if n <= window]
            if inside:
                ax.axvline(max(inside) + 0.5, color="k", lw=1, ls="--")
    fig.colorbar(im, ax=axes[0].tolist(), fraction=0.03)
    fig.suptitle(title)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def loss_curves(curves: dict[str, np.ndarray], path: Path, window: int | None = None, smooth: int = 64) -> Path:
    """Mean loss by position (moving average over `smooth` tokens), one line per model."""
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for name, losses in curves.items():
        mean = losses.mean(0)
        k = max(1, min(smooth, len(mean) // 8))
        sm = np.convolve(mean, np.ones(k) / k, mode="valid")
        ax.plot(np.arange(len(sm)) + k, sm, label=name)
    if window is not None:
        ax.axvline(window, color="k", lw=1, ls="--", label=f"base window ({window:,})")
    ax.set_xscale("log")
    ax.set_xlabel("position (tokens)")
    ax.set_ylabel("loss (nats)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
