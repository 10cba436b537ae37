"""Human-readable views of an accuracy matrix: a markdown table, a text table and a heatmap PNG."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import matplotlib.figure


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


def forgetting_deltas(R: Sequence[Sequence[float]], b: Sequence[float] | None = None) -> list[list[float]]:
    """``R[i][j] - R[j][j]``: each score relative to the task's own score right after training it (rows as in
    :func:`matrix_markdown`: ``b[j] - R[j][j]`` first when ``b`` is given). Entries with ``i >= j`` show
    what training later tasks did to task ``j`` (negative: forgetting)."""
    rows = ([list(b)] if b is not None else []) + [list(r) for r in R]
    return [[v - R[j][j] for j, v in enumerate(row)] for row in rows]


def stream_reading(results: dict[str, dict[str, Any]], scale: float = 100.0) -> str:
    """Plain-words reading of streams run by several methods on the same tasks (``results``: method ->
    results dict with ``tasks``, ``initial``, ``accuracy_matrix``): what each task gained from its own training
    (``R[j][j]`` minus its score just before, ``R[j-1][j]``, or ``b[j]`` for the first task) and what each
    earlier task lost by the end (``R[T-1][j] - R[j][j]``), per method."""
    lines = []
    for method, r in results.items():
        tasks, b, R = r["tasks"], r["initial"], r["accuracy_matrix"]
        before = [b[0]] + [R[j - 1][j] for j in range(1, len(tasks))]
        gains = ", ".join(
            f"{t} {scale * before[j]:.1f} -> {scale * R[j][j]:.1f} ({scale * (R[j][j] - before[j]):+.1f})"
            for j, t in enumerate(tasks)
        )
        lines.append(f"{method}: own training: {gains}")
        losses = [
            f"{t} {scale * R[j][j]:.1f} -> {scale * R[-1][j]:.1f} ({scale * (R[-1][j] - R[j][j]):+.1f})"
            for j, t in enumerate(tasks[:-1])
        ]
        if losses:
            lines.append(f"{' ' * len(method)}  by the end of the stream: {', '.join(losses)}")
    return "\n".join(lines)


def heatmap_figure(
    tasks: Sequence[str],
    R: Sequence[Sequence[float]],
    title: str = "",
    metric_name: str = "score",
    scale: float = 100.0,
    initial: Sequence[float] | None = None,
    delta_range: float | None = None,
) -> matplotlib.figure.Figure:
    """A two-panel heatmap figure of R (rows: the start ``b`` when given, then after training
    task i; columns: evaluated on task j).

    Left: the scores (0-100 colour scale). Right: the change from each task's own score ``R[j][j]``
    (:func:`forgetting_deltas`) on a diverging scale centred at 0 (red: below, blue: above), its range set by
    the cells after task j was trained (or ``+-delta_range``, in the units of R: one scale for several plots
    that are compared); cells from before that (the start row, above the diagonal) are grey.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm

    T = len(tasks)
    start = initial is not None
    rows = ([list(initial)] if start else []) + [list(r) for r in R]
    data = np.asarray(rows, dtype=float) * scale
    delta = np.asarray(forgetting_deltas(R, initial), dtype=float) * scale
    stage = np.arange(len(rows))[:, None] - int(start)  # training stage i of each row (-1: the start)
    before = stage < np.arange(T)[None, :]  # task j not trained yet at that row
    labels = (["start"] if start else []) + [f"after {t}" for t in tasks]

    width = 1.3 + 1.15 * T
    fig, (ax, ax_d) = plt.subplots(1, 2, figsize=(2 * width + 0.6, 1.4 + 0.75 * len(rows)))
    im = ax.imshow(data, cmap="viridis", vmin=min(0.0, float(data.min())), vmax=max(scale, float(data.max())))
    span = delta_range * scale if delta_range is not None else float(np.abs(delta[~before]).max())
    span = max(span, 0.01 * scale)  # a stream without forgetting still gets a readable scale
    cmap = matplotlib.colormaps["RdBu"].with_extremes(bad="#d9d9d9")
    im_d = ax_d.imshow(np.ma.masked_array(delta, mask=before), cmap=cmap, norm=TwoSlopeNorm(0.0, -span, span))
    for axis, values, sign in ((ax, data, ""), (ax_d, delta, "+")):
        axis.set_xticks(range(T), labels=list(tasks), rotation=30, ha="right")
        axis.set_yticks(range(len(rows)), labels=labels if axis is ax else [])
        axis.set_xlabel(f"evaluated on ({metric_name})")
        for i in range(len(rows)):
            for j in range(T):
                v = values[i, j]
                if axis is ax:
                    color = "w" if v < 0.6 * scale else "k"
                else:
                    color = "#707070" if before[i, j] else ("w" if abs(v) > 0.6 * span else "k")
                axis.text(j, i, f"{v:{sign}.1f}", ha="center", va="center", color=color, fontsize=9)
    for j in range(T):  # the reference cells R[j][j]
        ax_d.add_patch(plt.Rectangle((j - 0.5, j + int(start) - 0.5), 1, 1, fill=False, lw=1.5, ec="k"))
    ax.set_title(title or f"{metric_name} (x{scale:g})", fontsize=10)
    ax_d.set_title(
        "change from the task's own score R[j][j]\n(red: forgotten; grey: not trained yet)", fontsize=10
    )
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.colorbar(im_d, ax=ax_d, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return fig


def plot_heatmap(
    tasks: Sequence[str],
    R: Sequence[Sequence[float]],
    path: str | os.PathLike,
    title: str = "",
    metric_name: str = "score",
    scale: float = 100.0,
    initial: Sequence[float] | None = None,
    delta_range: float | None = None,
) -> None:
    """Write :func:`heatmap_figure` as a PNG, atomically."""
    import matplotlib.pyplot as plt

    fig = heatmap_figure(tasks, R, title, metric_name, scale, initial, delta_range)
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
