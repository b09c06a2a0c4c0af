"""What training records for monitoring: the data profile, the temperature, the model card.

Nothing here reads data: the training tasks add up the profile sums of their training
rows as they read them (`pipeline.monitoring.drift.profile_sums`), and each worker scores
its validation rows with the final model (at most ``MAX_VALIDATION_ROWS`` probability
rows of 10 floats reach the driver, never features). `model_extras` turns those into the
profile, a fitted temperature (``train.calibrate``), the model card's per-class metrics
and calibration, and the first-layer picture.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np

from pipeline.artifact import Metadata
from pipeline.config import Config
from pipeline.contract import LABEL, NUM_CLASSES
from pipeline.monitoring.calibration import (
    apply_temperature,
    calibration_from_sums,
    calibration_sums,
    fit_temperature,
)
from pipeline.monitoring.documents import MODEL_CARD, model_card
from pipeline.monitoring.drift import DataProfile, profile_from_sums

log = logging.getLogger(__name__)

FIRST_LAYER_PLOT = "first_layer.png"
MAX_VALIDATION_ROWS = 50_000


def model_extras(
    config: Config,
    metadata: Metadata,
    model_bytes: bytes,
    profile: DataProfile,
    validation: tuple[np.ndarray, np.ndarray] | None,
    command: str | None = None,
) -> tuple[Metadata, dict[str, bytes]]:
    """`metadata` with the training `profile` (and temperature), and the extra files of the
    model directory: ``first_layer.png`` and ``model_card.md``.

    `validation` holds the model's probabilities of validation rows and their labels.
    """
    from pipeline.explain.weights import first_layer_weights
    from pipeline.plots import first_layer_png

    update: dict[str, Any] = {"profile": profile.as_dict()}
    summary = None
    probabilities, labels = validation if validation is not None else (None, np.zeros(0))
    known = labels >= 0  # rows whose one-hot label had no 1 are left out
    if len(labels[known]):
        probabilities, labels = probabilities[known].astype(np.float64), labels[known]
        temperature = fit_temperature(probabilities, labels) if config.train.calibrate else None
        summary = _validation_summary(probabilities, labels, temperature, config)
        if temperature is not None:
            update["temperature"] = temperature
            log.info(
                "temperature %.3f fitted on %d validation rows: ECE %.4f -> %.4f",
                temperature,
                len(labels),
                summary["calibration"]["ece_before"],
                summary["calibration"]["ece_after"],
            )
    elif config.train.calibrate:
        log.warning("train.calibrate is set but there is no validation data: no temperature")
    metadata = metadata.model_copy(update=update)
    files = {
        FIRST_LAYER_PLOT: first_layer_png(first_layer_weights(metadata, model_bytes)),
        MODEL_CARD: model_card(metadata.model_dump(mode="json"), summary, command).encode(),
    }
    return metadata, files


def training_extras(
    config: Config,
    metadata: Metadata,
    model_bytes: bytes,
    profile_sums: np.ndarray,
    validation: tuple[np.ndarray, np.ndarray] | None,
) -> tuple[Metadata, dict[str, bytes]]:
    """`model_extras` of what the training tasks returned (`FitResult.profile_sums` and
    `FitResult.validation`), with the train command that reproduces the model."""
    profile = profile_from_sums(profile_sums, config.score.drift.ink_bins, LABEL)
    return model_extras(
        config, metadata, model_bytes, profile, validation, _train_command(metadata, config)
    )


def _train_command(metadata: Metadata, config: Config) -> str:
    """The train job's command line for these settings (non-default ones as --set)."""
    from pipeline.config import TrainSettings

    defaults = TrainSettings().model_dump(mode="json")
    changed = [
        f"--set train.{key}={json.dumps(value)}"
        for key, value in config.train.model_dump(mode="json").items()
        if value != defaults.get(key)
    ]
    path = (metadata.data or {}).get("path", "FEATURES")
    return " \\\n  ".join(
        [f"spark-submit jobs/train.py --input {path} --model-dir MODEL --fresh", *changed]
    )


def _validation_summary(
    probabilities: np.ndarray, labels: np.ndarray, temperature: float | None, config: Config
) -> dict[str, Any]:
    bins = config.score.calibration_bins
    prediction = probabilities.argmax(axis=1)
    correct = prediction == labels

    def ece(p: np.ndarray) -> float:
        return calibration_from_sums(calibration_sums(p.max(axis=1), correct, bins)).ece

    per_class = []
    for k in range(NUM_CLASSES):
        tp = int(np.sum((prediction == k) & (labels == k)))
        predicted, support = int(np.sum(prediction == k)), int(np.sum(labels == k))
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class.append({"precision": precision, "recall": recall, "f1": f1, "support": support})
    summary: dict[str, Any] = {
        "rows": len(labels),
        "accuracy": float(correct.mean()),
        "per_class": per_class,
        "ece": ece(probabilities),
    }
    if temperature is not None:
        summary["calibration"] = {
            "temperature": temperature,
            "ece_before": summary["ece"],
            "ece_after": ece(apply_temperature(probabilities, temperature)),
        }
    return summary
