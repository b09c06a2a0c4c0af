"""The training stage: the ingest output in, a published model directory out.

`run_training` reads the features, marks validation rows, checks that the barrier stage
can be scheduled, trains with `fit_partitions` and publishes ``MODEL/`` (``model.keras``,
``metadata.json``, ``history.png``) atomically. `fit_partitions` is the distributed part:
one worker per partition of a DataFrame, streamed from Spark into TensorFlow (see
`pipeline.training.distributed` for the barrier stage and `pipeline.training.loop` for
the training loop). Nothing but worker 0's model bytes and history reaches the driver.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from pipeline.artifact import (
    CHECKPOINTS_DIR,
    Metadata,
    new_metadata,
    sha256_bytes,
    write_model_dir,
)
from pipeline.config import Config, IngestSettings, TrainSettings
from pipeline.contract import FEATURES, LABEL, LABEL_ONEHOT, NUM_CLASSES
from pipeline.errors import ConfigError, InputDataError, PipelineError, TrainingError
from pipeline.features import onehot as one_hot
from pipeline.storage import Storage
from pipeline.training.checkpoints import decode, epoch_of
from pipeline.training.data import VALIDATION_FLAG
from pipeline.training.distributed import (
    RESULT_SCHEMA,
    ProgressListener,
    check_slots,
    failure_message,
    make_task,
)

log = logging.getLogger(__name__)

__all__ = ["FitResult", "TrainResult", "fit_partitions", "prepare_training_data", "run_training"]

# Settings that may change between a checkpoint and the run resuming from it.
_RESUMABLE_CHANGES = {
    "epochs",
    "workers",
    "steps_per_call",
    "memory_budget_mb",
    "collective_timeout_s",
    "tensorboard",
    "early_stopping",
}


@dataclass(frozen=True)
class FitResult:
    """What the barrier stage hands back to the driver."""

    model_bytes: bytes
    history: list[dict[str, float]]
    workers: list[dict[str, Any]]  # per-worker statistics, by rank
    seconds: float
    resumed_from: list[int] = field(default_factory=list)

    @property
    def epochs_completed(self) -> int:
        return int(self.history[-1]["epoch"]) if self.history else 0

    @property
    def samples_per_second(self) -> float:
        """Training samples per second of training time, all workers together."""
        samples = sum(w["samples"] for w in self.workers)
        seconds = max((w["train_seconds"] for w in self.workers), default=0.0)
        return samples / seconds if seconds else 0.0


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
    _fail_at_epoch: int | None = None,
    _stall_at_epoch: int | None = None,
) -> TrainResult:
    """Train on the features at `input_path` and publish the model directory `model_dir`.

    Resumes from ``MODEL/checkpoints/`` unless `fresh`. `workers` overrides
    ``train.workers``. `on_epoch` receives worker 0's per-epoch record while training
    runs (default: one log line). `_fail_at_epoch` and `_stall_at_epoch` are for tests:
    the last worker's Spark task is killed once, after that epoch's checkpoint, or that
    worker stops answering after the epoch (the others time out on their next collective).
    """
    started = time.monotonic()
    settings = config.train
    if workers is not None and workers != settings.workers:
        settings = settings.model_copy(update={"workers": workers})
    workers = settings.workers
    if settings.early_stopping.enabled and not (
        settings.validation_fraction or settings.validation_path
    ):
        raise ConfigError(
            "train.early_stopping.enabled needs validation data: set "
            "train.validation_fraction or train.validation_path"
        )
    check_slots(spark, workers)

    from pipeline.ingest import ingest_report, read_features

    storage = Storage(spark)
    model_dir = storage.qualify(model_dir).rstrip("/")
    checkpoint_dir = f"{model_dir}/{CHECKPOINTS_DIR}"
    if fresh and storage.exists(checkpoint_dir):
        log.info("--fresh: deleting %s", checkpoint_dir)
        storage.delete(checkpoint_dir)
    _check_resumable(storage, checkpoint_dir, settings)

    features = read_features(spark, input_path)
    validation = (
        read_features(spark, settings.validation_path) if settings.validation_path else None
    )
    data = prepare_training_data(features, settings, validation)
    fingerprint = data_fingerprint(storage, features, input_path)
    check_classes(fingerprint["class_counts"], input_path)
    report = ingest_report(storage, input_path) or {}
    preprocessing = IngestSettings.model_validate(report.get("preprocessing") or {})

    fit = fit_partitions(
        spark,
        data,
        settings,
        checkpoint_dir=checkpoint_dir,
        fingerprint=fingerprint["sha256"],
        tensorboard_dir=f"{model_dir}/logs" if settings.tensorboard else None,
        on_epoch=on_epoch,
        _fail_at_epoch=_fail_at_epoch,
        _stall_at_epoch=_stall_at_epoch,
    )
    metadata = new_metadata(
        fit.model_bytes,
        settings,
        preprocessing=preprocessing,
        workers=workers,
        epochs_completed=fit.epochs_completed,
        history=fit.history,
        samples_per_second=round(fit.samples_per_second, 1),
        training_seconds=round(fit.seconds, 3),
        data=fingerprint,
        versions=_versions(spark),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    from pipeline.monitoring.training import training_extras
    from pipeline.plots import history_png

    # The data profile, temperature, first-layer picture and model card.
    metadata, extras = training_extras(spark, config, data, metadata, fit.model_bytes)
    write_model_dir(
        storage,
        model_dir,
        metadata,
        fit.model_bytes,
        {"history.png": history_png(fit.history), **extras},
    )
    return TrainResult(model_dir, metadata, fit, time.monotonic() - started)


def prepare_training_data(
    features: DataFrame, settings: TrainSettings, validation: DataFrame | None = None
) -> DataFrame:
    """`features` and one-hot `label_onehot` as float arrays, plus the validation flag.

    Validation rows are the separate `validation` dataset when given, else a deterministic
    ``validation_fraction`` of the rows chosen by a hash of their features and label.
    """
    train = _contract_columns(features, "input")
    if validation is not None:
        flagged = train.withColumn(VALIDATION_FLAG, F.lit(False)).unionByName(
            _contract_columns(validation, "validation data").withColumn(
                VALIDATION_FLAG, F.lit(True)
            )
        )
    elif settings.validation_fraction > 0:
        bucket = F.pmod(
            F.xxhash64(F.lit(settings.seed), F.col(FEATURES), F.col(LABEL_ONEHOT)),
            F.lit(1_000_000),
        )
        flagged = train.withColumn(
            VALIDATION_FLAG, bucket < F.lit(int(settings.validation_fraction * 1_000_000))
        )
    else:
        flagged = train.withColumn(VALIDATION_FLAG, F.lit(False))
    return flagged


def _contract_columns(df: DataFrame, what: str) -> DataFrame:
    names = set(df.columns)
    if FEATURES not in names or not ({LABEL_ONEHOT, LABEL} & names):
        raise InputDataError(
            f"the {what} needs a '{FEATURES}' column and a '{LABEL_ONEHOT}' or '{LABEL}' "
            f"column; it has {sorted(names)}. Train on the output of jobs/ingest.py"
        )
    floats = T.ArrayType(T.FloatType())
    if LABEL_ONEHOT in names:
        onehot: Column = F.col(LABEL_ONEHOT).cast(floats)
    else:
        onehot = one_hot(F.col(LABEL))
    return df.select(F.col(FEATURES).cast(floats).alias(FEATURES), onehot.alias(LABEL_ONEHOT))


def fit_partitions(
    spark: SparkSession,
    data: DataFrame,
    settings: TrainSettings,
    *,
    checkpoint_dir: str,
    fingerprint: str = "",
    tensorboard_dir: str | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    _fail_at_epoch: int | None = None,
    _stall_at_epoch: int | None = None,
) -> FitResult:
    """Train on `data` (from `prepare_training_data`) with ``settings.workers`` workers.

    Each worker consumes one partition. A DataFrame that already has exactly that many
    partitions is used as it is (its partitions may be uneven); any other is
    repartitioned. Checkpoints go to `checkpoint_dir` (any URI pyarrow can write).
    """
    started = time.monotonic()
    workers = settings.workers
    check_slots(spark, workers)
    if data.rdd.getNumPartitions() != workers:
        data = data.repartition(workers)
    resumed: list[int] = []
    fatal: list[str] = []
    console = on_epoch or _log_epoch
    sc = spark.sparkContext
    group = f"train-{uuid.uuid4().hex[:8]}"

    def on_message(message: dict[str, Any]) -> None:
        event = message.get("event")
        if event == "resume":
            resumed.append(int(message["epoch"]))
            log.info("resuming from the checkpoint of epoch %d", message["epoch"])
        elif event == "epoch":
            console(message)
        elif event == "cluster":
            log.info(
                "TensorFlow cluster %s; worker 0's gRPC server listens on %s",
                ", ".join(message["workers"]),
                ", ".join(message["listen"]) or "?",
            )
        elif event == "fatal":
            # A retry would stall the same way: stop the stage now rather than let Spark
            # rerun it spark.stage.maxConsecutiveAttempts times.
            fatal.append(str(message.get("message")))
            sc.cancelJobGroup(group)

    spec_base = {
        "train": settings.model_dump(mode="json"),
        "workers": workers,
        "checkpoint_dir": checkpoint_dir,
        "fingerprint": fingerprint,
        "tensorboard_dir": tensorboard_dir,
        "fail_at_epoch": _fail_at_epoch,
        "stall_at_epoch": _stall_at_epoch,
        "settings_key": _resume_key(settings),
    }
    host = spark.sparkContext.getConf().get("spark.driver.host", "127.0.0.1")
    with ProgressListener(host, on_message) as listener:
        spec = {**spec_base, "progress": list(listener.address)}
        sc.setJobGroup(group, f"train {workers} worker(s), {settings.epochs} epochs")
        try:
            rows = (
                data.mapInArrow(make_task(spec), RESULT_SCHEMA, barrier=workers > 1)
                # The shuffle makes the barrier stage a ShuffleMapStage, which Spark retries.
                .repartition(1)
                .collect()
            )
        except PipelineError:
            raise
        except Exception as exc:  # Py4JJavaError and friends: the stage failed for good
            if fatal:
                raise TrainingError(f"training failed: {fatal[0]}") from None
            message = failure_message(exc)
            if "InputDataError" in str(exc):
                raise InputDataError(message) from None
            raise TrainingError(f"training failed: {message}") from None
        finally:
            sc.setLocalProperty("spark.jobGroup.id", None)
    infos = sorted((json.loads(r["info"]) for r in rows), key=lambda i: i["rank"])
    chief = next((r for r in rows if r["rank"] == 0), None)
    if chief is None or chief["model"] is None:
        raise TrainingError(f"worker 0 returned no model ({len(rows)} results)")
    for info in infos:
        if info["resumed_from"] and info["resumed_from"] not in resumed:
            resumed.append(info["resumed_from"])
    return FitResult(
        model_bytes=bytes(chief["model"]),
        history=infos[0]["history"],
        workers=infos,
        seconds=time.monotonic() - started,
        resumed_from=resumed,
    )


def _log_epoch(record: dict[str, Any]) -> None:
    log.info("%s", format_epoch(record))


def format_epoch(record: dict[str, Any]) -> str:
    """One console line for an epoch record."""
    parts = [
        f"epoch {int(record['epoch'])}/{int(record.get('epochs', record['epoch']))}",
        f"loss {record['loss']:.4f}",
        f"accuracy {record['accuracy']:.4f}",
    ]
    if "val_loss" in record:
        parts += [
            f"val_loss {record['val_loss']:.4f}",
            f"val_accuracy {record['val_accuracy']:.4f}",
        ]
    parts.append(f"{record['samples_per_second']:,.0f} samples/s")
    if "eta_s" in record:
        parts.append(f"{_duration(record['eta_s'])} left")
    return "  ".join(parts)


def _duration(seconds: float) -> str:
    seconds = max(0, math.ceil(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def data_fingerprint(storage: Storage, df: DataFrame, path: str) -> dict[str, Any]:
    """Row count, rows per class, schema and files (name, size) of the training data, and
    their sha256. Counting reads only the label column."""
    files = [{"path": p, "bytes": size} for p, size in storage.list_files(path)]
    counts = class_counts(df)
    described = {
        "path": storage.qualify(path),
        "rows": sum(counts.values()),
        "class_counts": counts,
        "schema": df.schema.simpleString(),
        "files": files,
    }
    described["sha256"] = sha256_bytes(
        json.dumps({k: described[k] for k in ("rows", "schema", "files")}, sort_keys=True).encode()
    )
    return described


def class_counts(df: DataFrame) -> dict[str, int]:
    """Rows per class (at most NUM_CLASSES aggregated rows reach the driver)."""
    if LABEL in df.columns:
        label = F.col(LABEL)
    else:
        label = F.array_position(F.col(LABEL_ONEHOT), F.lit(1.0)) - 1
    rows = df.groupBy(label.alias("class")).count().collect()
    return {str(row["class"]): int(row["count"]) for row in sorted(rows, key=lambda r: str(r[0]))}


def check_classes(counts: dict[str, int], path: str) -> None:
    """Refuse training data without rows of at least two classes."""
    present = [label for label, n in counts.items() if n > 0]
    if not present:
        raise InputDataError(f"{path} holds no rows: nothing to train on")
    if len(present) < 2:
        raise InputDataError(
            f"{path} holds rows of one class only (label {present[0]}, "
            f"{counts[present[0]]} rows): a classifier needs at least two classes. "
            f"Check the input, its filter or the ingest split"
        )
    missing = NUM_CLASSES - len(present)
    if missing:
        log.warning("%s has no rows of %d of the %d classes", path, missing, NUM_CLASSES)


def _check_resumable(storage: Storage, checkpoint_dir: str, settings: TrainSettings) -> None:
    """Refuse to resume from checkpoints written with another model or optimizer."""
    if not storage.exists(checkpoint_dir):
        return
    found = [(epoch_of(p), p) for p, _ in storage.list_files(checkpoint_dir)]
    found = sorted((e, p) for e, p in found if e is not None)
    if not found:
        return
    epoch, path = found[-1]
    state, _ = decode(storage.read_bytes(path), path)
    before = state.get("settings") or {}
    now = _resume_key(settings)
    changed = sorted(k for k in now if k in before and before[k] != now[k])
    if changed:
        raise ConfigError(
            f"{checkpoint_dir} holds a checkpoint (epoch {epoch}) trained with other "
            f"settings ({', '.join(f'train.{k}' for k in changed)} differ): rerun with --fresh "
            f"to start over, or use another model directory"
        )
    if epoch >= settings.epochs:
        log.info("checkpoint of epoch %d already reaches train.epochs = %d", epoch, settings.epochs)
    else:
        log.info("found the checkpoint of epoch %d: training resumes from it", epoch)


def _resume_key(settings: TrainSettings) -> dict[str, Any]:
    dumped = settings.model_dump(mode="json")
    return {k: v for k, v in dumped.items() if k not in _RESUMABLE_CHANGES}


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
