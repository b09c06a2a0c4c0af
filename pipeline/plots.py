"""Every PNG the pipeline draws: training history, evaluation, search, explain and
monitoring figures.

Each function takes plain values (lists, arrays, numbers) and returns the PNG's bytes;
the stage that owns the figure decides where it is written. Matplotlib is imported
inside the functions, with a figure that needs no display.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.contract import IMAGE_SIDE

__all__ = [
    "Entry",
    "class_attributions_png",
    "confidence_png",
    "confusion_png",
    "drift_png",
    "errors_png",
    "first_layer_png",
    "history_png",
    "ranking_png",
    "reliability_png",
]


@dataclass(frozen=True)
class Entry:
    """One row of a ranking: a value, an optional ± error, highlighted when `reference`."""

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


def ranking_png(
    entries: Sequence[Entry],
    *,
    title: str,
    xlabel: str,
    band: tuple[float, float] | None = None,
    band_label: str = "",
) -> bytes:
    """One row per entry, the first at the top: a dot at its value with a ± error bar
    when it has one, the value written beside it; reference entries in orange. `band`
    shades an interval across the plot (e.g. the reference's mean ± its spread)."""
    lines = sum(e.label.count("\n") + 1 for e in entries)
    figure = _figure(10, 1.4 + 0.2 * lines + 0.25 * len(entries), layout="constrained")
    axes = figure.subplots()
    if band is not None:
        axes.axvspan(band[0], band[1], color="tab:orange", alpha=0.18, label=band_label or None)
    positions = list(range(len(entries)))[::-1]
    for y, entry in zip(positions, entries, strict=True):
        colour = "tab:orange" if entry.reference else "tab:blue"
        axes.errorbar(
            entry.value, y, xerr=entry.error, fmt="o", color=colour, capsize=4, markersize=6
        )
        text = f"  {entry.value:.4f}" + (f" ± {entry.error:.4f}" if entry.error else "")
        axes.text(entry.value + (entry.error or 0.0), y, text, va="center", fontsize=8)
    axes.set_yticks(positions, [e.label for e in entries], fontsize=7)
    if entries:
        ends = [e.value - (e.error or 0.0) for e in entries] + list(band or ())
        ends += [e.value + (e.error or 0.0) for e in entries]
        low, high = min(ends), max(ends)
        span = max(high - low, 0.005)
        axes.set_xlim(low - 0.15 * span, high + 0.45 * span)
        axes.set_ylim(-0.7, len(entries) - 0.3)
    axes.set_xlabel(xlabel)
    axes.grid(axis="x", alpha=0.3)
    axes.set_title(title, fontsize=9)
    if band is not None and band_label:
        axes.legend(loc="lower right", fontsize=8)
    return _png(figure)


def class_attributions_png(
    mean_inputs: np.ndarray, mean_attributions: np.ndarray, counts: Sequence[int], by: str
) -> bytes:
    """Per class: the mean input above, the mean attribution below (red adds to the
    class's probability, blue takes away; one colour scale for every class)."""
    classes = len(counts)
    figure = _figure(1.3 * classes, 3.2, layout="constrained")
    axes = figure.subplots(2, classes, squeeze=False)
    # The 99.5th percentile: one extreme pixel should not wash out every map.
    limit = float(np.percentile(np.abs(mean_attributions), 99.5)) or 1.0
    image = None
    for c in range(classes):
        top, bottom = axes[0, c], axes[1, c]
        top.imshow(mean_inputs[c].reshape(IMAGE_SIDE, IMAGE_SIDE), cmap="gray", vmin=0, vmax=1)
        top.set_title(f"{c}\n{counts[c]:,} rows", fontsize=8)
        image = bottom.imshow(
            mean_attributions[c].reshape(IMAGE_SIDE, IMAGE_SIDE),
            cmap="RdBu_r",
            vmin=-limit,
            vmax=limit,
        )
        for a in (top, bottom):
            a.set_xticks([])
            a.set_yticks([])
    axes[0, 0].set_ylabel("mean input", fontsize=8)
    axes[1, 0].set_ylabel("mean attribution", fontsize=8)
    figure.colorbar(image, ax=axes[1, :].tolist(), shrink=0.8, label="attribution")
    figure.suptitle(f"Integrated gradients by {by}", fontsize=10)
    return _png(figure)


def errors_png(examples: Sequence[tuple[np.ndarray, np.ndarray, int, int, float]]) -> bytes:
    """A grid of misclassified digits (pixels, attribution, label, prediction, confidence),
    the attribution of the predicted class overlaid: red where it pushed the prediction."""
    columns = min(8, max(1, len(examples)))
    rows = max(1, -(-len(examples) // columns))
    figure = _figure(1.5 * columns, 1.75 * rows, layout="constrained")
    axes = np.atleast_1d(figure.subplots(rows, columns, squeeze=False)).reshape(-1)
    for a in axes:
        a.set_xticks([])
        a.set_yticks([])
        a.set_frame_on(False)
    for a, (pixels, attribution, label, prediction, confidence) in zip(
        axes, examples, strict=False
    ):
        a.imshow(pixels.reshape(IMAGE_SIDE, IMAGE_SIDE), cmap="gray", vmin=0, vmax=1)
        limit = float(np.abs(attribution).max()) or 1.0
        overlay = attribution.reshape(IMAGE_SIDE, IMAGE_SIDE) / limit
        a.imshow(
            np.ma.masked_where(np.abs(overlay) < 0.1, overlay),
            cmap="RdBu_r",
            vmin=-1,
            vmax=1,
            alpha=0.6,
        )
        a.set_title(f"true {label} -> {prediction}\n{confidence:.2f}", fontsize=8)
    figure.suptitle("Most confident errors (attribution of the prediction)", fontsize=10)
    return _png(figure)


def first_layer_png(weights: np.ndarray, max_units: int = 64) -> bytes:
    """The first layer's weights, one FEATURE_DIM-pixel image per hidden unit, each on its
    own symmetric colour scale (red positive).

    One image of all the units' tiles, labelled with their numbers: a grid of one small
    axes a unit took seconds to lay out and draw."""
    units = min(weights.shape[1], max_units)
    columns = min(8, units)
    rows = -(-units // columns)
    gap, label = 2, 7  # pixels between tiles, and above each for its number
    width, height = IMAGE_SIDE + gap, IMAGE_SIDE + label
    mosaic = np.full((rows * height, columns * width - gap), np.nan)
    inch = 1.25 / width  # a tile and its gap: 1.25 inches wide
    image = (mosaic.shape[1] * inch, mosaic.shape[0] * inch)
    margin, title = 0.1, 0.45
    figure = _figure(image[0] + 2 * margin, image[1] + margin + title)
    size = figure.get_size_inches()
    a = figure.add_axes(
        (margin / size[0], margin / size[1], image[0] / size[0], image[1] / size[1])
    )
    for i in range(units):
        w = weights[:, i]
        limit = float(np.abs(w).max()) or 1.0
        top, left = (i // columns) * height + label, (i % columns) * width
        mosaic[top : top + IMAGE_SIDE, left : left + IMAGE_SIDE] = (
            w.reshape(IMAGE_SIDE, IMAGE_SIDE) / limit
        )
        a.text(left + IMAGE_SIDE / 2, top - 1, str(i), fontsize=7, ha="center", va="bottom")
    colours = _matplotlib().colormaps["RdBu_r"].with_extremes(bad="white")
    a.imshow(mosaic, cmap=colours, vmin=-1.0, vmax=1.0, interpolation="nearest")
    a.set_axis_off()
    shown = f"{units} of {weights.shape[1]}" if units < weights.shape[1] else f"{units}"
    figure.suptitle(f"First-layer weights ({shown} units; red positive)", fontsize=10)
    return _png(figure)


def reliability_png(
    mean_confidence: Sequence[float | None],
    accuracy: Sequence[float | None],
    counts: Sequence[int],
    *,
    ece: float,
    temperature: float | None = None,
) -> bytes:
    """Reliability diagram: accuracy against mean confidence per bin, with the diagonal
    of perfect calibration and the rows per bin below."""
    bins = len(counts)
    edges = np.linspace(0.0, 1.0, bins + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    figure = _figure(5.6, 6.0)
    top, bottom = figure.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    filled = [i for i in range(bins) if counts[i]]
    top.bar(
        [centres[i] for i in filled],
        [accuracy[i] for i in filled],
        width=1.0 / bins,
        edgecolor="black",
        alpha=0.7,
        label="accuracy of the bin",
    )
    top.plot([0, 1], [0, 1], "k--", label="perfect calibration")
    top.plot(
        [mean_confidence[i] for i in filled],
        [accuracy[i] for i in filled],
        "o",
        color="tab:red",
        label="accuracy at the mean confidence",
    )
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    scaled = f", temperature {temperature:.2f}" if temperature is not None else ""
    top.set_title(f"Reliability (ECE {ece:.3f}{scaled})")
    top.legend(loc="upper left")
    top.grid(alpha=0.3)
    bottom.bar(centres, counts, width=1.0 / bins, edgecolor="black", color="tab:gray")
    bottom.set_yscale("symlog")
    bottom.set_xlabel("confidence")
    bottom.set_ylabel("rows")
    figure.tight_layout()
    return _png(figure)


def drift_png(training_mean: np.ndarray, scored_mean: np.ndarray, *, status: str) -> bytes:
    """Mean training image, mean scored image and their difference."""
    difference = np.asarray(scored_mean) - np.asarray(training_mean)
    limit = float(np.abs(difference).max()) or 1.0
    figure = _figure(9.0, 3.4, layout="constrained")
    axes = figure.subplots(1, 3)
    axes[0].imshow(np.reshape(training_mean, (IMAGE_SIDE, IMAGE_SIDE)), cmap="gray", vmin=0, vmax=1)
    axes[0].set_title("training mean")
    axes[1].imshow(np.reshape(scored_mean, (IMAGE_SIDE, IMAGE_SIDE)), cmap="gray", vmin=0, vmax=1)
    axes[1].set_title("scored mean")
    image = axes[2].imshow(
        difference.reshape(IMAGE_SIDE, IMAGE_SIDE), cmap="RdBu_r", vmin=-limit, vmax=limit
    )
    axes[2].set_title("scored - training")
    figure.colorbar(image, ax=axes[2], shrink=0.8)
    for a in axes:
        a.set_xticks([])
        a.set_yticks([])
    figure.suptitle(f"Drift: {status}", fontsize=11)
    return _png(figure)


def import_in_background() -> None:
    """Import Matplotlib on a thread of its own: a job calls this before its long Spark
    stage, during which its own thread only waits, so that its figures do not wait for
    the import (about a third of a second) once the stage is done."""
    threading.Thread(target=_matplotlib, name="import-matplotlib", daemon=True).start()


def _matplotlib():
    """Matplotlib with a backend that needs no display, and what the figures draw with."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.backends.backend_agg
    import matplotlib.figure

    return matplotlib


def _figure(width: float, height: float, layout: str | None = None):
    return _matplotlib().figure.Figure(figsize=(width, height), dpi=100, layout=layout)


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
