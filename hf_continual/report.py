"""Human-readable views of an accuracy matrix: a markdown table, a text table and a heatmap PNG."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence


def matrix_markdown(
    tasks: Sequence[str], R: Sequence[Sequence[float]], b: Sequence[float] | None = None, scale: float = 100.0
) -> str:
    """Markdown table: one row per training stage ("start" = b, then "after <task>"), one column per task."""
    header = "| after \\ on | " + " | ".join(tasks) + " |"
    lines = [header, "|" + "---|" * (len(tasks) + 1)]
    if b is not None:
        lines.append("| (start) | " + " | ".join(f"{scale * v:.1f}" for v in b) + " |")
    for name, row in zip(tasks, R):
        lines.append(f"| {name} | " + " | ".join(f"{scale * v:.1f}" for v in row) + " |")
    return "\n".join(lines) + "\n"


def metrics_markdown(metrics: dict[str, float | None], scale: float = 100.0) -> str:
    """One-row markdown table of ACC/BWT/FWT/forgetting (in points when ``scale=100``)."""
    keys = [k for k in ("acc", "bwt", "fwt", "forgetting") if k in metrics]
    cells = ["n/a" if metrics[k] is None else f"{scale * metrics[k]:.2f}" for k in keys]
    return (
        "| "
        + " | ".join(k.upper() for k in keys)
        + " |\n|"
        + "---|" * len(keys)
        + "\n| "
        + " | ".join(cells)
        + " |\n"
    )


def matrix_text(
    tasks: Sequence[str], R: Sequence[Sequence[float]], b: Sequence[float] | None = None, scale: float = 100.0
) -> str:
    """Fixed-width table for terminals."""
    width = max(10, *(len(t) for t in tasks)) + 2
    out = ["after \\ on".ljust(width) + "".join(t.rjust(width) for t in tasks)]
    if b is not None:
        out.append("(start)".ljust(width) + "".join(f"{scale * v:.1f}".rjust(width) for v in b))
    for name, row in zip(tasks, R):
        out.append(name.ljust(width) + "".join(f"{scale * v:.1f}".rjust(width) for v in row))
    return "\n".join(out)


def plot_heatmap(
    tasks: Sequence[str],
    R: Sequence[Sequence[float]],
    path: str | os.PathLike,
    title: str = "",
    metric_name: str = "score",
    scale: float = 100.0,
) -> None:
    """Write a heatmap PNG of R (rows: after training task i; columns: evaluated on task j), atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    data = np.asarray(R, dtype=float) * scale
    T = len(tasks)
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * T, 1.2 + 1.1 * T))
    im = ax.imshow(data, cmap="viridis", vmin=min(0.0, float(data.min())), vmax=max(scale, float(data.max())))
    ax.set_xticks(range(T), labels=list(tasks), rotation=30, ha="right")
    ax.set_yticks(range(T), labels=[f"after {t}" for t in tasks])
    ax.set_xlabel(f"evaluated on ({metric_name})")
    for i in range(T):
        for j in range(T):
            ax.text(
                j,
                i,
                f"{data[i, j]:.1f}",
                ha="center",
                va="center",
                color="w" if data[i, j] < 0.6 * scale else "k",
            )
    if title:
        ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
