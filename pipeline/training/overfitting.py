"""Seeing overfitting in a run's history: validation loss rising while training loss falls."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pipeline.config import TrainSettings

__all__ = ["overfitting", "overfitting_message"]


def overfitting(history: Sequence[Mapping[str, float]], epochs: int) -> dict[str, Any] | None:
    """The first stretch of `epochs` epochs in a row in which validation loss rose and
    training loss fell, each against the epoch before: ``{"from_epoch", "to_epoch",
    "val_loss": [start, end], "loss": [start, end]}``, or None (also without validation
    losses, or with `epochs` 0)."""
    if epochs < 1:
        return None
    run = 0
    for i in range(1, len(history)):
        before, now = history[i - 1], history[i]
        if "val_loss" not in now or "val_loss" not in before:
            return None
        rising = now["val_loss"] > before["val_loss"] and now["loss"] < before["loss"]
        run = run + 1 if rising else 0
        if run == epochs:
            start = history[i - epochs]
            return {
                "from_epoch": int(start["epoch"]),
                "to_epoch": int(now["epoch"]),
                "val_loss": [round(start["val_loss"], 6), round(now["val_loss"], 6)],
                "loss": [round(start["loss"], 6), round(now["loss"], 6)],
            }
    return None


def overfitting_message(found: Mapping[str, Any], settings: TrainSettings) -> str:
    """What was seen and the settings that counter it, with their current values."""
    stopping = settings.early_stopping
    return (
        f"the model overfits: validation loss rose for "
        f"{found['to_epoch'] - found['from_epoch']} epochs in a row (epochs "
        f"{found['from_epoch']}-{found['to_epoch']}: {found['val_loss'][0]:.4f} -> "
        f"{found['val_loss'][1]:.4f}) while training loss fell ({found['loss'][0]:.4f} -> "
        f"{found['loss'][1]:.4f}). Counter it with train.dropout (now {settings.dropout:g}), "
        f"train.l2 (now {settings.l2:g}), train.augment.* (now "
        f"{'on' if settings.augment.enabled else 'off'}) or early stopping "
        f"(train.early_stopping.enabled, now {'on' if stopping.enabled else 'off'})"
    )
