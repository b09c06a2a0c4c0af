"""What training records for monitoring: the data profile, the temperature, the model card.

`model_extras` runs on the driver after the model is trained, with Spark jobs only:
the profile of the training rows (`pipeline.monitoring.drift.data_profile`), and, when
there is validation data, the validation rows scored by the executors (the same
`predict_digits` as scoring) to fit a temperature (``train.calibrate``) and to give the
model card its per-class metrics and calibration. At most ``_MAX_VALIDATION_ROWS``
probability rows (10 floats each) reach the driver, never features.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from pipeline.artifact import Metadata
from pipeline.config import Config
from pipeline.contract import FEATURES, LABEL, LABEL_ONEHOT, NUM_CLASSES, PROBABILITIES
from pipeline.monitoring.calibration import (
    apply_temperature,
    calibration_from_sums,
    calibration_sums,
    fit_temperature,
)
from pipeline.monitoring.documents import MODEL_CARD, model_card
from pipeline.monitoring.drift import data_profile

log = logging.getLogger(__name__)

FIRST_LAYER_PLOT = "first_layer.png"
_MAX_VALIDATION_ROWS = 50_000


def model_extras(
    spark: SparkSession,
    config: Config,
    training: DataFrame,
    validation: DataFrame | None,
    metadata: Metadata,
    model_bytes: bytes,
    command: str | None = None,
    onnx_bytes: bytes | None = None,
) -> tuple[Metadata, dict[str, bytes]]:
    """`metadata` with the training profile (and temperature), and the extra files of the
    model directory: ``first_layer.png`` and ``model_card.md``.

    `training` and `validation` hold `features` and `label` or `label_onehot`. The
    validation rows are scored with `onnx_bytes`, the model's ONNX export (made here,
    with TensorFlow, when not given).
    """
    from pipeline.explain.weights import first_layer_weights
    from pipeline.plots import first_layer_png

    profile = data_profile(_with_label(training), LABEL, config.score.drift.ink_bins)
    update: dict[str, Any] = {"profile": profile.as_dict()}
    summary = None
    if validation is not None:
        probabilities, labels = _validation_predictions(
            spark, validation, metadata, model_bytes, onnx_bytes
        )
        if len(labels):
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
    spark: SparkSession,
    config: Config,
    prepared: DataFrame,
    metadata: Metadata,
    model_bytes: bytes,
    onnx_bytes: bytes,
    has_validation: bool,
) -> tuple[Metadata, dict[str, bytes]]:
    """`model_extras` of the DataFrame training prepared (`features`, `label_onehot` and
    the validation flag): its training rows profiled, its validation rows (when
    `has_validation`: a fraction held out, train.validation_path or a split=validation)
    scored with `onnx_bytes` (exported by the training worker: no TensorFlow here)."""
    from pipeline.training.data import VALIDATION_FLAG

    flag = F.col(VALIDATION_FLAG)
    validation = prepared.filter(flag) if has_validation else None
    return model_extras(
        spark,
        config,
        prepared.filter(~flag),
        validation,
        metadata,
        model_bytes,
        _train_command(metadata, config),
        onnx_bytes,
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


def _with_label(df: DataFrame) -> DataFrame:
    if LABEL in df.columns:
        return df.select(FEATURES, F.col(LABEL).cast("int").alias(LABEL))
    label = F.array_position(F.col(LABEL_ONEHOT), F.lit(1.0)) - 1
    return df.select(FEATURES, label.cast("int").alias(LABEL))


def _validation_predictions(
    spark: SparkSession,
    validation: DataFrame,
    metadata: Metadata,
    model_bytes: bytes,
    onnx_bytes: bytes | None,
) -> tuple[np.ndarray, np.ndarray]:
    from pipeline.artifact import export_onnx, sha256_bytes
    from pipeline.scoring import broadcast_model, predict_digits, task_cpus

    # Scored as the scoring job scores: the model's ONNX export, run by ONNX Runtime.
    if onnx_bytes is None:
        onnx_bytes = export_onnx(metadata, model_bytes)
    exported = metadata.model_copy(update={"onnx_sha256": sha256_bytes(onnx_bytes)})
    model = broadcast_model(spark, exported, onnx_bytes)
    try:
        rows = (
            predict_digits(
                _with_label(validation).limit(_MAX_VALIDATION_ROWS), model, task_cpus(spark)
            )
            .select(PROBABILITIES, LABEL)
            .collect()
        )
    finally:
        model.handle.unpersist()
    probabilities = np.array([r[PROBABILITIES] for r in rows], np.float64).reshape(-1, NUM_CLASSES)
    labels = np.array([r[LABEL] for r in rows], np.int64)
    return probabilities, labels


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
