"""The training job's orchestration: features in, a published model directory out."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from pyspark.sql import SparkSession

from pipeline.artifact import CHECKPOINTS_DIR, Metadata, new_metadata, write_model_dir
from pipeline.config import Config, IngestSettings
from pipeline.errors import ConfigError
from pipeline.outputs import MODEL, check_output
from pipeline.storage import Storage
from pipeline.training.checkpoints import check_resumable
from pipeline.training.distributed import check_slots
from pipeline.training.fit import FitResult, run_stage
from pipeline.training.inputs import (
    check_classes,
    describe_input,
    prepare_training_data,
    resolve_input,
)
from pipeline.training.overfitting import overfitting, overfitting_message

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    model_dir: str
    metadata: Metadata
    fit: FitResult
    seconds: float

    @property
    def history(self) -> list[dict[str, float]]:
        return self.metadata.history


def run_training(
    spark: SparkSession,
    config: Config,
    input_path: str,
    model_dir: str,
    workers: int | None = None,
    fresh: bool = False,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train on the features at `input_path` and publish the model directory `model_dir`.

    Resumes from ``MODEL/checkpoints/`` unless `fresh`. `workers` overrides
    ``train.workers``. `on_epoch` receives worker 0's per-epoch record while training
    runs (default: one log line).
    """
    started = time.monotonic()
    settings = config.train
    if workers is not None and workers != settings.workers:
        settings = settings.model_copy(update={"workers": workers})
    check_slots(spark, settings.workers)  # before any data is read: fail fast

    from pipeline.ingest import ingest_report, read_features

    storage = Storage(spark)
    model_dir = check_output(
        storage,
        model_dir,
        MODEL,
        {"--input": input_path, "train.validation_path": settings.validation_path},
        option="--model-dir",
    )
    checkpoint_dir = f"{model_dir}/{CHECKPOINTS_DIR}"
    report = ingest_report(storage, input_path) or {}
    source = resolve_input(storage, input_path, settings, report)
    if settings.early_stopping.enabled and not (
        settings.validation_fraction or source.validation_path
    ):
        raise ConfigError(
            "train.early_stopping.enabled needs validation data: set "
            "train.validation_fraction or train.validation_path"
        )
    features = read_features(spark, source.train_path)
    for more in source.more_train_paths:
        features = features.unionByName(read_features(spark, more))
    validation = read_features(spark, source.validation_path) if source.validation_path else None
    data = prepare_training_data(features, settings, validation)
    described = describe_input(storage, features, *source.train_paths)
    check_classes(described["class_counts"], ", ".join(source.train_paths))
    if source.split_output is not None:
        described["splits"] = _split_rows(spark, source, settings, described["rows"])
    if fresh and storage.exists(checkpoint_dir):
        log.info("--fresh: deleting %s", checkpoint_dir)
        storage.delete(checkpoint_dir)
    check_resumable(storage, checkpoint_dir, settings, described["sha256"])
    preprocessing = IngestSettings.model_validate(report.get("preprocessing") or {})

    fit = run_stage(
        spark,
        data,
        settings,
        checkpoint_dir=checkpoint_dir,
        fingerprint=described["sha256"],
        tensorboard_dir=f"{model_dir}/logs" if settings.tensorboard else None,
        on_epoch=on_epoch,
    )
    overfit = overfitting(fit.history, settings.overfit_patience)
    if overfit is not None:
        log.warning("%s", overfitting_message(overfit, settings))
    metadata = new_metadata(
        fit.model_bytes,
        settings,
        preprocessing=preprocessing,
        workers=settings.workers,
        sync_mode=settings.sync_mode(),
        xla=settings.compiles_with_xla(),
        epochs_completed=fit.epochs_completed,
        history=fit.history,
        samples_per_second=round(fit.samples_per_second, 1),
        training_seconds=round(fit.seconds, 3),
        data=described,
        overfitting=overfit,
        versions=_versions(spark),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    from pipeline.monitoring.training import training_extras
    from pipeline.plots import history_png

    # The data profile, temperature, first-layer picture and model card.
    metadata, extras = training_extras(
        spark, config, data, metadata, fit.model_bytes, fit.onnx_bytes
    )
    metadata = write_model_dir(
        storage,
        model_dir,
        metadata,
        fit.model_bytes,
        {"history.png": history_png(fit.history), **extras},
        onnx_bytes=fit.onnx_bytes,
    )
    return TrainResult(model_dir, metadata, fit, time.monotonic() - started)


def _split_rows(spark: SparkSession, source, settings, trained_rows: int) -> dict[str, int]:
    """Rows of each split used (for ``metadata.json``), and the console line that says so;
    `trained_rows` are all the rows trained on (split=train's unless more were added)."""
    from pipeline.ingest import read_features

    rows = {
        name: read_features(spark, path).count()
        for name, path in source.splits().items()
        if name != "train"
    }
    trained = source.trained_splits()
    rows = {"train": trained_rows - sum(rows[n] for n in trained if n in rows), **rows}
    validated = [n for n in rows if n not in trained]
    if validated:
        validating = ", ".join(f"split={n} ({rows[n]:,} rows)" for n in validated)
    elif source.validation_path:
        validating = source.validation_path
    elif settings.validation_fraction:
        validating = f"train.validation_fraction = {settings.validation_fraction:g} of them"
    else:
        validating = "nothing"
    log.info(
        "%s is a split ingest output: training on %s, validating on %s; split=test is not read",
        source.split_output,
        " and ".join(f"split={n} ({rows[n]:,} rows)" for n in trained),
        validating,
    )
    return rows


def _versions(spark: SparkSession) -> dict[str, str]:
    from importlib import metadata as importlib_metadata

    from pipeline import __version__

    versions = {"pipeline": __version__, "spark": spark.version}
    for package in ("tensorflow", "keras", "pyarrow", "numpy", "pandas", "pyspark"):
        try:
            versions[package] = importlib_metadata.version(package)
        except importlib_metadata.PackageNotFoundError:
            try:
                versions[package] = importlib_metadata.version(f"{package}-cpu")
            except importlib_metadata.PackageNotFoundError:
                continue
    return versions
