"""The loss-curve PNG attached to every stage run."""

from __future__ import annotations

from pathlib import Path


def render_loss_curve(series: dict[str, list[tuple[int, float]]], path: Path, title: str = "") -> Path:
    """Draw one panel per metric key (losses differ in scale), value against step, and save a PNG.

    Uses matplotlib's object API with the Agg canvas, not ``pyplot``: it runs in the tracker's sender
    thread, and pyplot's global figure state is not thread-safe.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keys = sorted(series)
    fig = Figure(figsize=(7, 2.4 * max(1, len(keys))), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(max(1, len(keys)), 1, squeeze=False)[:, 0]
    for ax, key in zip(axes, keys, strict=False):
        points = sorted(series[key])
        ax.plot([s for s, _ in points], [v for _, v in points], linewidth=1.2)
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    if title:
        fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
