"""One training run of a search: the ordinary `run_training`, which the search can stop
between epochs (a pruned trial)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pyspark.sql import SparkSession

from pipeline import training
from pipeline.config import Config, TrainSettings
from pipeline.errors import SlotsBusy, TrainingStopped

log = logging.getLogger(__name__)

__all__ = ["Run", "train_run"]

# A run refused because another run's short jobs (counting rows) held the slot it needed
# is tried again.
_SLOT_RETRIES = 5
_SLOT_RETRY_SECONDS = 3.0
_HISTORY_KEYS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy")


@dataclass(frozen=True)
class Run:
    """How a run ended. Metrics are those of the epoch whose weights the model holds, or
    of the last epoch reported when the run was stopped."""

    history: list[dict[str, float]]
    stopped: bool  # `should_stop` asked to stop: the run ended without a model
    val_accuracy: float | None
    val_loss: float | None
    epoch: int | None
    seconds: float

    @property
    def epochs_run(self) -> int:
        return int(self.history[-1]["epoch"]) if self.history else 0


def train_run(
    spark: SparkSession,
    config: Config,
    settings: TrainSettings,
    input_path: str,
    model_dir: str,
    name: str,
    should_stop: Callable[[dict[str, float]], bool] | None = None,
) -> Run:
    """Train `settings` on one worker into `model_dir`, logging each epoch as `name`.

    `should_stop` sees each epoch's record as the run reports it; when it answers True
    the run stops there (`run_training`'s on_epoch) and returns as ``stopped``, with no
    model. Errors of the training run propagate.
    """
    history: list[dict[str, float]] = []

    def on_epoch(record: Mapping[str, Any]) -> bool:
        history.append({k: float(record[k]) for k in _HISTORY_KEYS if k in record})
        _log_epoch(name, record)
        return should_stop is not None and bool(should_stop(history[-1]))

    run_config = config.model_copy(update={"train": settings})
    started = time.monotonic()
    for attempt in range(_SLOT_RETRIES + 1):
        try:
            result = training.run_training(
                spark,
                run_config,
                input_path,
                model_dir,
                workers=1,
                fresh=True,
                on_epoch=on_epoch,
            )
            break
        except SlotsBusy:
            if attempt == _SLOT_RETRIES:
                raise
            log.info("%s waits for a free task slot", name)
            time.sleep(_SLOT_RETRY_SECONDS)
        except TrainingStopped:
            return _stopped(history, time.monotonic() - started)
    full = [{k: float(h[k]) for k in _HISTORY_KEYS if k in h} for h in result.history]
    judged = _judged_epoch(result, settings)
    record = next((h for h in full if int(h["epoch"]) == judged), {})
    return Run(
        full,
        False,
        record.get("val_accuracy"),
        record.get("val_loss"),
        judged,
        result.metadata.training_seconds or result.seconds,
    )


def _stopped(history: list[dict[str, float]], seconds: float) -> Run:
    last = history[-1]
    return Run(
        list(history),
        True,
        last.get("val_accuracy"),
        last.get("val_loss"),
        int(last["epoch"]),
        seconds,
    )


def _judged_epoch(result: training.TrainResult, settings: TrainSettings) -> int | None:
    """The epoch whose weights the trained model holds: the best epoch when training
    stopped early and restored it, else the last epoch (as the training loop decided)."""
    if not result.history:
        return None
    chief = result.fit.workers[0]
    restored = settings.early_stopping.restore_best_weights
    if chief.get("stopped_early") and restored and chief.get("best_epoch"):
        return int(chief["best_epoch"])
    return int(result.history[-1]["epoch"])


def _log_epoch(name: str, record: Mapping[str, Any]) -> None:
    parts = [f"{name} epoch {int(record['epoch'])}/{int(record.get('epochs', 0))}"]
    parts += [f"{k} {record[k]:.4f}" for k in ("loss", "val_loss", "val_accuracy") if k in record]
    log.info("%s", "  ".join(parts))
