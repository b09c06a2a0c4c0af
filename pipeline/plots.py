"""Every PNG the pipeline draws: training history, evaluation and search figures.

Each function takes plain values (lists, arrays, numbers) and returns the PNG's bytes;
the stage that owns the figure decides where it is written. Matplotlib is imported
inside the functions, with a figure that needs no display.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Bar", "bars_png", "confidence_png", "confusion_png", "history_png"]


@dataclass(frozen=True)
class Bar:
    """One horizontal bar: a value, an optional ± error, highlighted when `reference`."""

    label: str
    value: float
    error: float | None = None
    reference: bool = False


def history_png(history: Sequence[Mapping[str, float]]) -> bytes:
    """Loss and accuracy against the epoch, training and (when recorded) validation."""
    figure = _figure(9, 3.6)
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
    return _png(figure)


def confusion_png(matrix: Sequence[Sequence[int]], *, accuracy: float | None, rows: int) -> bytes:
    """The confusion matrix (true label down, prediction across) with a count in each cell."""
    counts = np.asarray(matrix)
    figure = _figure(6.4, 5.6)
    axes = figure.add_subplot()
    image = axes.imshow(counts, cmap="Blues")
    figure.colorbar(image, ax=axes, label="rows")
    ticks = range(counts.shape[0])
    axes.set_xticks(ticks)
    axes.set_yticks(ticks)
    axes.set_xlabel("prediction")
    axes.set_ylabel("true label")
    shown = f"accuracy {accuracy:.2%}" if accuracy is not None else ""
    axes.set_title(f"Confusion matrix ({rows:,} rows, {shown})")
    threshold = counts.max() / 2 if counts.size else 0
    for i in ticks:
        for j in ticks:
            axes.text(
                j,
                i,
                f"{counts[i, j]:,}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if counts[i, j] > threshold else "black",
            )
    figure.tight_layout()
    return _png(figure)


def confidence_png(histogram: Sequence[int], *, threshold: float, rows: int, below: int) -> bytes:
    """Predictions per bin of confidence over [0, 1], with the threshold marked."""
    bins = len(histogram)
    edges = np.linspace(0.0, 1.0, bins + 1)
    figure = _figure(6.4, 4.0)
    axes = figure.add_subplot()
    axes.bar(edges[:-1], histogram, width=1.0 / bins, align="edge", edgecolor="white")
    axes.axvline(threshold, color="tab:red", linestyle="--")
    axes.set_xlim(0.0, 1.0)
    axes.set_xlabel("confidence (largest probability)")
    axes.set_ylabel("rows")
    axes.set_title(f"Confidence of {rows:,} predictions; {below:,} below {threshold:g}")
    figure.tight_layout()
    return _png(figure)


def bars_png(
    bars: Sequence[Bar],
    *,
    title: str,
    xlabel: str,
    band: tuple[float, float] | None = None,
    band_label: str = "",
) -> bytes:
    """Horizontal bars, the first at the top, each with its value written beside it.

    A bar's `error` draws a ± error bar; reference bars are orange. `band` shades an
    interval across the whole plot (e.g. the reference's mean ± its spread).
    """
    figure = _figure(8, 1.4 + 0.35 * max(len(bars), 1), layout="constrained")
    axes = figure.subplots()
    positions = list(range(len(bars)))[::-1]
    values = [b.value for b in bars]
    errors = [b.error or 0.0 for b in bars]
    colours = ["tab:orange" if b.reference else "tab:blue" for b in bars]
    if band is not None:
        axes.axvspan(band[0], band[1], color="tab:orange", alpha=0.15, label=band_label or None)
    axes.barh(
        positions,
        values,
        xerr=errors if any(errors) else None,
        color=colours,
        capsize=3 if any(errors) else 0,
        error_kw={"elinewidth": 1},
    )
    axes.set_yticks(positions, [b.label for b in bars], fontsize=8)
    for y, bar in zip(positions, bars, strict=True):
        text = f" {bar.value:.4f}" + (f" ± {bar.error:.4f}" if bar.error else "")
        axes.text(bar.value + (bar.error or 0.0), y, text, va="center", fontsize=8)
    if values:
        low = min([v - e for v, e in zip(values, errors, strict=True)] + list(band or ()))
        high = max([v + e for v, e in zip(values, errors, strict=True)] + list(band or ()))
        span = max(high - low, 0.01)
        axes.set_xlim(max(0.0, low - span), min(1.0, high + 0.6 * span) if high <= 1 else high)
    axes.set_xlabel(xlabel)
    axes.set_title(title, fontsize=9)
    if band is not None and band_label:
        axes.legend(loc="lower right", fontsize=8)
    return _png(figure)


def _figure(width: float, height: float, layout: str | None = None):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout=layout)


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
