"""Matplotlib figures of run metrics (headless: the Agg backend, PNG files)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for row in rows:
        value = row.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            xs.append(row["step"])
            ys.append(float(value))
    return xs, ys


def plot_curves(runs: dict[str, list[dict]], keys: list[str], out: Path, title: str = "", cols: int = 3) -> Path:
    """One panel per metric key, one line per run. Keys no run has are left out."""
    keys = [k for k in keys if any(series(rows, k)[0] for rows in runs.values())]
    if not keys:
        raise ValueError("none of the requested metrics were logged")
    rows_n = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows_n, min(cols, len(keys)), figsize=(4.2 * min(cols, len(keys)), 3.0 * rows_n),
                             squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for name, rows in runs.items():
            xs, ys = series(rows, key)
            if xs:
                ax.plot(xs, ys, marker="o" if len(xs) < 12 else None, markersize=3, label=name)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    if len(runs) > 1:
        axes.flat[0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
