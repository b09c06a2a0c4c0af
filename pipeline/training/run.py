"""The training job's orchestration: features in, a published model directory out."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from pyspark.sql import SparkSession

from pipeline.artifact import (
    CHECKPOINTS_DIR,
    HISTORY_PLOT,
    Metadata,
    new_metadata,
    write_model_dir,
)
from pipeline.config import Config, IngestSettings
from pipeline.errors import ConfigError
from pipeline.monitoring.training import MAX_VALIDATION_ROWS, training_extras
from pipeline.outputs import MODEL, check_output
from pipeline.session import start_seconds
from pipeline.storage import Storage
from pipeline.training.checkpoints import check_resumable
from pipeline.training.distributed import check_slots
from pipeline.training.fit import FitResult, repartition_in_a_fixed_order, run_stage
from pipeline.training.inputs import (
    describe_input,
    plan_files,
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
    on_epoch: Callable[[dict[str, Any]], bool | None] | None = None,
) -> TrainResult:
    """Train on the features at `input_path` and publish the model directory `model_dir`.

    Resumes from ``MODEL/checkpoints/`` unless `fresh`. `workers` overrides
    ``train.workers``. `on_epoch` receives worker 0's per-epoch record while training
    runs (default: one log line); when it returns a true value, training stops there:
    the stage is cancelled, worker 0 stops before its next checkpoint, no model is
    published, and `TrainingStopped` is raised (the checkpoints stay, to resume from).
    """
    started = time.monotonic()
    waited = start_seconds()
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
    plan = plan_files(storage, source, settings)
    if plan is None:
        features = read_features(spark, source.train_path)
        for more in source.more_train_paths:
            features = features.unionByName(read_features(spark, more))
        validation = (
            read_features(spark, source.validation_path) if source.validation_path else None
        )
        # Spark's splits of the files need not all hold rows (a row group belongs to one
        # split only), nor come in the same order on every run: spread the rows over the
        # workers by their content, in an order that depends on nothing else.
        data = repartition_in_a_fixed_order(
            prepare_training_data(features, settings, validation), settings.workers
        )
        rows, schema = features.count(), features.schema.simpleString()
    else:
        # The tasks read the files themselves: Spark reads nothing here.
        data, rows, schema = None, plan.train_rows, plan.schema
        log.info(
            "%s rows read by the %d training task(s) from the files, %s each",
            f"{plan.train_rows + plan.validation_rows:,}",
            settings.workers,
            "/".join(f"{sum(r[5] - r[4] for r in share):,}" for share in plan.shares),
        )
    described = describe_input(storage, *source.train_paths, rows=rows, schema=schema)
    if source.split_output is not None:
        counted = plan.rows_by_path if plan is not None else {}
        described["splits"] = _split_rows(spark, source, settings, rows, counted)
    if fresh and storage.exists(checkpoint_dir):
        log.info("--fresh: deleting %s", checkpoint_dir)
        storage.delete(checkpoint_dir)
    check_resumable(storage, checkpoint_dir, settings, described["sha256"])
    preprocessing = IngestSettings.model_validate(report.get("preprocessing") or {})

    staged = time.monotonic()
    from pipeline.plots import import_in_background

    import_in_background()  # for the history and first-layer pictures after the stage
    fit = run_stage(
        spark,
        data,
        settings,
        checkpoint_dir=checkpoint_dir,
        fingerprint=described["sha256"],
        tensorboard_dir=f"{model_dir}/logs" if settings.tensorboard else None,
        on_epoch=on_epoch,
        files=plan.spec() if plan is not None else None,
        classes_of={
            "path": ", ".join(source.train_paths),
            "with_validation": bool(settings.validation_fraction and validation is None),
        },
        monitoring={
            "profile_bins": config.score.drift.ink_bins,
            "validation_rows_kept": MAX_VALIDATION_ROWS,
        },
    )
    fitted = time.monotonic()
    described["class_counts"] = fit.workers[0].get("class_counts", {})
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
    from pipeline.plots import history_png

    # The data profile, temperature, first-layer picture, model card and history plot.
    metadata, extras = training_extras(
        config, metadata, fit.model_bytes, fit.profile_sums, fit.validation
    )
    extras[HISTORY_PLOT] = history_png(fit.history)
    phases = job_phases(waited, started, staged, fitted, fit.workers, time.monotonic())
    metadata = metadata.model_copy(update={"phases": phases})
    log.info("phases (s): %s", ", ".join(f"{k} {v:.1f}" for k, v in phases.items()))
    metadata = write_model_dir(
        storage, model_dir, metadata, fit.model_bytes, extras, onnx_bytes=fit.onnx_bytes
    )
    return TrainResult(model_dir, metadata, fit, time.monotonic() - started)


def job_phases(
    waited: float | None,
    started: float,
    staged: float,
    fitted: float,
    workers: list[dict[str, Any]],
    ended: float,
) -> dict[str, float]:
    """Seconds of what the user waits for, in order (``metadata.json`` ``phases``).

    ``start``: the process's start (the ``spark-submit`` JVM's, when it launched this
    driver) until training began (for the first job of a process only); ``prepare``: the
    driver's checks and plan, no data read. Then, in the barrier stage, the slowest
    worker's ``read`` (its rows spooled, their profile added up) and ``import``
    (TensorFlow, in its own process, at the same time as the read: the two overlap),
    ``load`` (model built, rows in its tensor store, the training call compiled, cluster
    joined), ``trace`` (the first epoch's extra time over the later ones': the rest of
    tracing and compiling), ``steps`` (the SGD steps of every epoch, without that extra),
    ``validate``, ``checkpoints``, ``export`` (worker 0's model files), ``predict`` (the
    final model on the validation rows);
    ``stage``: the whole barrier stage as the driver saw it; ``publish``: temperature,
    model card and plots (the writing of the model directory, which records these
    phases, comes after)."""
    import statistics

    def slowest(name: str) -> float:
        return max((float(w.get("phases", {}).get(name, 0.0)) for w in workers), default=0.0)

    epochs = [float(s) for s in workers[0].get("epoch_seconds", [])] if workers else []
    trace = max(0.0, epochs[0] - statistics.median(epochs[1:])) if len(epochs) > 1 else 0.0
    phases = {
        **({"start": waited} if waited is not None else {}),
        "prepare": staged - started,
        "read": slowest("read"),
        "import": slowest("import"),
        "load": slowest("cluster") + slowest("load") + slowest("first_collective"),
        "trace": trace,
        "steps": sum(epochs) - trace,
        "validate": slowest("validate"),
        "checkpoints": slowest("checkpoints"),
        "export": slowest("export"),
        "predict": slowest("predict"),
        "stage": fitted - staged,
        "publish": ended - fitted,
    }
    return {name: round(max(seconds, 0.0), 3) for name, seconds in phases.items()}


def _split_rows(
    spark: SparkSession, source, settings, trained_rows: int, counted: dict[str, int]
) -> dict[str, int]:
    """Rows of each split used (for ``metadata.json``), and the console line that says so;
    `trained_rows` are all the rows trained on (split=train's unless more were added).
    `counted` holds the rows of the folders the plan read from their footers; Spark counts
    the others."""
    from pipeline.ingest import read_features

    rows = {
        name: counted[path] if path in counted else read_features(spark, path).count()
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

    versions = {"pipeline": __version__, "spark": spark.sparkContext.version}
    for package in ("tensorflow", "keras", "pyarrow", "numpy", "pandas", "pyspark"):
        try:
            versions[package] = importlib_metadata.version(package)
        except importlib_metadata.PackageNotFoundError:
            try:
                versions[package] = importlib_metadata.version(f"{package}-cpu")
            except importlib_metadata.PackageNotFoundError:
                continue
    return versions
