"""``history.png``: loss and accuracy per epoch, training and validation."""

from __future__ import annotations

import io


def history_png(history: list[dict[str, float]]) -> bytes:
    """A PNG with two panels, loss and accuracy against the epoch."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 3.6), dpi=100)
    epochs = [int(h["epoch"]) for h in history]
    for i, (metric, title) in enumerate((("loss", "Loss"), ("accuracy", "Accuracy"))):
        axes = figure.add_subplot(1, 2, i + 1)
        axes.plot(epochs, [h[metric] for h in history], marker="o", label="training")
        if history and f"val_{metric}" in history[0]:
            axes.plot(epochs, [h[f"val_{metric}"] for h in history], marker="o", label="validation")
        axes.set_title(title)
        axes.set_xlabel("epoch")
        axes.grid(alpha=0.3)
        axes.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
