"""The driver half of the barrier stage: `fit_partitions` trains on a DataFrame's partitions.

It opens the progress channel, runs one barrier task per worker over the DataFrame
(`pipeline.training.distributed` holds the task), turns a failed stage into the error the
tasks reported, and returns worker 0's model bytes (``model.keras`` and its checked ONNX
export), its history and every worker's statistics: nothing else reaches the driver,
which never imports TensorFlow.
"""

from __future__ import annotations

import io
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from py4j.protocol import Py4JError
from pyspark.errors import PySparkException
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from pipeline.config import TrainSettings
from pipeline.errors import InputDataError, TrainingError, TrainingStopped
from pipeline.training.checkpoints import resume_key
from pipeline.training.distributed import (
    RESULT_SCHEMA,
    check_slots,
    make_rank_task,
    make_task,
    spark_failure,
)
from pipeline.training.progress import STOP, ProgressListener, log_epoch

log = logging.getLogger("pipeline.training")

# Two workers against one on the steady-state training benchmark (2 cores, 300,000 rows,
# 10 epochs): samples/s ratio of each sync mode and its validation accuracy minus one
# worker's, in points. local_sgd (averaging every 200 steps, learning rate scaled):
# `python benchmarks/local_sgd_bench.py --every 200 --repeats 3`, median of 3 rounds
# (one worker 0.936, two 0.933); exact: `make bench`'s train stage on the slower machine
# before (0.941 and 0.932), not rerun since.
SYNC_BENCHMARK = {"local_sgd": (1.29, -0.34), "exact": (0.15, -0.9)}

# The errors a barrier task reports through the progress channel, by type name.
_TASK_ERRORS: dict[str, type[Exception]] = {
    "InputDataError": InputDataError,
    "TrainingError": TrainingError,
}


@dataclass(frozen=True)
class FitResult:
    """What the barrier stage hands back to the driver."""

    model_bytes: bytes
    onnx_bytes: bytes  # the same network for ONNX Runtime, checked against Keras by worker 0
    history: list[dict[str, float]]
    workers: list[dict[str, Any]]  # per-worker statistics, by rank
    seconds: float
    resumed_from: list[int] = field(default_factory=list)
    # With `run_stage(monitoring=...)`: the training rows' profile sums, all workers added,
    # and the final model's validation probabilities and labels (None when not asked).
    profile_sums: np.ndarray | None = None
    validation: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def epochs_completed(self) -> int:
        return int(self.history[-1]["epoch"]) if self.history else 0

    @property
    def samples_per_second(self) -> float:
        """Training samples per second of training time, all workers together."""
        samples = sum(w["samples"] for w in self.workers)
        seconds = max((w["train_seconds"] for w in self.workers), default=0.0)
        return samples / seconds if seconds else 0.0


def fit_partitions(
    spark: SparkSession,
    data: DataFrame,
    settings: TrainSettings,
    *,
    checkpoint_dir: str,
    fingerprint: str = "",
    tensorboard_dir: str | None = None,
    on_epoch: Callable[[dict[str, Any]], bool | None] | None = None,
) -> FitResult:
    """Train on `data` (from `prepare_training_data`) with ``settings.workers`` workers.

    Each worker consumes one partition. A DataFrame that already has exactly that many
    partitions is used as it is (its partitions may be uneven), unless they merge others
    (a union of training and validation rows, say: a barrier stage cannot run on those);
    any other is repartitioned with `repartition_in_a_fixed_order`, so that the same rows
    train the same model on every run. Checkpoints go to `checkpoint_dir` (any URI pyarrow
    can write), each recording `fingerprint` as the data it was trained on. `on_epoch`
    gets each epoch's record and may stop training (`run_training`).
    """
    check_slots(spark, settings.workers)
    return run_stage(
        spark,
        data,
        settings,
        checkpoint_dir=checkpoint_dir,
        fingerprint=fingerprint,
        tensorboard_dir=tensorboard_dir,
        on_epoch=on_epoch,
    )


def run_stage(
    spark: SparkSession,
    data: DataFrame | None,
    settings: TrainSettings,
    *,
    checkpoint_dir: str,
    fingerprint: str,
    tensorboard_dir: str | None,
    on_epoch: Callable[[dict[str, Any]], bool | None] | None,
    files: dict[str, Any] | None = None,
    classes_of: dict[str, Any] | None = None,
    monitoring: dict[str, int] | None = None,
) -> FitResult:
    """`fit_partitions` once the task slots have been checked.

    `files` (a `FilePlan.spec()`) makes each task read its own share of an ingest output's
    row groups instead of a partition of `data` (then None: nothing is shuffled).
    `classes_of` (``{"path", "with_validation"}``) makes the tasks count the input's rows
    per class and refuse it through `check_classes` before training. `monitoring`
    (``{"profile_bins", "validation_rows_kept"}``) makes the tasks add up the training
    rows' profile as they read them and the workers score their validation rows with the
    final model, so that training's monitoring record needs no second pass over the data.
    """
    started = time.monotonic()
    workers = settings.workers
    if workers > 1:
        log.info("%s", sync_message(settings))
    if files is None and (
        data.rdd.getNumPartitions() != workers or (workers > 1 and _merges_partitions(data))
    ):
        data = repartition_in_a_fixed_order(data, workers)
    resumed: list[int] = []
    errors: list[dict[str, Any]] = []
    console = on_epoch or log_epoch
    stopped_after: list[int] = []  # the epoch after which `on_epoch` asked to stop
    sc = spark.sparkContext
    group = f"train-{uuid.uuid4().hex[:8]}"

    def on_message(message: dict[str, Any]) -> dict[str, Any] | None:
        event = message.get("event")
        if event == "resume":
            resumed.append(int(message["epoch"]))
            log.info("resuming from the checkpoint of epoch %d", message["epoch"])
        elif event == "epoch":
            if not stopped_after and console(message):
                stopped_after.append(int(message["epoch"]))
                sc.cancelJobGroup(group)
            if stopped_after:  # worker 0 stops before its next checkpoint
                return STOP
        elif event == "cluster":
            log.info(
                "TensorFlow cluster %s; worker 0's gRPC server listens on %s",
                ", ".join(message["workers"]),
                ", ".join(message["listen"]) or "?",
            )
        elif event == "error":
            errors.append(message)
            if message.get("final"):
                # A retry would fail the same way: stop the stage now rather than let
                # Spark rerun it spark.stage.maxConsecutiveAttempts times.
                sc.cancelJobGroup(group)

    spec = {
        "train": settings.model_dump(mode="json"),
        "workers": workers,
        "checkpoint_dir": checkpoint_dir,
        "fingerprint": fingerprint,
        "tensorboard_dir": tensorboard_dir,
        "settings_key": resume_key(settings),
        "files": files,
        "classes_of": classes_of,
        **(monitoring or {}),
    }
    host = sc.getConf().get("spark.driver.host", "127.0.0.1")
    with ProgressListener(host, on_message) as listener:
        spec["progress"] = list(listener.address)
        sc.setJobGroup(group, f"train {workers} worker(s), {settings.epochs} epochs")
        try:
            if files is not None:
                # The tasks read their own files: each gets its rank alone, from an RDD (a
                # DataFrame would cost a cold JVM two more seconds of query planning and code
                # generation for this one-row-per-task job).
                ranks = sc.parallelize(range(workers), workers)
                stage = (ranks.barrier() if workers > 1 else ranks).mapPartitions(
                    make_rank_task(spec)
                )
            else:
                stage = data.mapInArrow(make_task(spec), RESULT_SCHEMA, barrier=workers > 1)
            # The shuffle makes a barrier stage a ShuffleMapStage, which Spark retries (it
            # never retries a failed barrier ResultStage). One worker's task is an ordinary
            # one, which Spark retries itself (spark.task.maxFailures): no second stage.
            rows = (stage.repartition(1) if workers > 1 else stage).collect()
        except (Py4JError, PySparkException) as exc:  # the stage failed for good
            if stopped_after:  # cancelled, as asked
                raise TrainingStopped(stopped_after[0]) from None
            raise _stage_error(errors, exc) from None
        finally:
            sc.setLocalProperty("spark.jobGroup.id", None)
    if stopped_after:  # the stage ended before its cancellation reached it
        raise TrainingStopped(stopped_after[0])
    infos = sorted((json.loads(r["info"]) for r in rows), key=lambda i: i["rank"])
    chief = next((r for r in rows if r["rank"] == 0), None)
    if chief is None or chief["model"] is None or chief["onnx"] is None:
        raise TrainingError(f"worker 0 returned no model ({len(rows)} results)")
    for info in infos:
        if info["resumed_from"] and info["resumed_from"] not in resumed:
            resumed.append(info["resumed_from"])
    return FitResult(
        model_bytes=bytes(chief["model"]),
        onnx_bytes=bytes(chief["onnx"]),
        history=infos[0]["history"],
        workers=infos,
        seconds=time.monotonic() - started,
        resumed_from=resumed,
        **_monitoring(rows),
    )


def repartition_in_a_fixed_order(data: DataFrame, workers: int) -> DataFrame:
    """`data` in `workers` partitions that hold the same rows in the same order on every
    run, whatever the master and however the input was split.

    A round-robin shuffle gives a worker rows that depend on how the input was split, in
    the order the map outputs arrive, which varies from run to run on a cluster; the
    workers' batches, and so the model, would vary with them. Here a hash of each row picks
    its worker and orders the rows within the worker (Spark's external sort: memory stays
    bounded), so one seed trains one model, and a run resumed from a checkpoint continues
    the run that wrote it. Identical rows go to the same worker.
    """
    order = "__row_order"
    return (
        data.withColumn(order, F.xxhash64(*(F.col(name) for name in data.columns)))
        .repartition(workers, order)
        .sortWithinPartitions(order)
        .drop(order)
    )


def _merges_partitions(data: DataFrame) -> bool:
    """Whether `data`'s partitions come from RDDs with other partition counts (a union, a
    coalesce, a limit): a barrier stage refuses to run on those without a shuffle first."""
    lineage = data.rdd.toDebugString() or b""
    text = lineage.decode("utf-8", "replace") if isinstance(lineage, bytes) else str(lineage)
    last_stage = text.split("+-")[0]  # the RDDs after the last shuffle, if any
    return any(name in last_stage for name in ("UnionRDD", "CoalescedRDD", "PartitionPruningRDD"))


def _monitoring(rows) -> dict[str, Any]:
    """The workers' monitoring arrays, combined: profile sums added, predictions joined."""
    saved = [np.load(io.BytesIO(r["monitoring"])) for r in rows if r["monitoring"] is not None]
    if not saved:
        return {}
    sums = [s["profile_sums"] for s in saved if "profile_sums" in s.files]
    predicted = [s for s in saved if "probabilities" in s.files]
    return {
        "profile_sums": np.sum(sums, axis=0) if sums else None,
        "validation": (
            np.concatenate([s["probabilities"] for s in predicted]),
            np.concatenate([s["labels"] for s in predicted]),
        )
        if predicted
        else None,
    }


def sync_message(settings: TrainSettings) -> str:
    """The console line of a multi-worker run: the sync mode that runs and what the other
    one costs on the benchmark."""
    mode = settings.sync_mode()
    other = "exact" if mode == "local_sgd" else "local_sgd"
    (speed, accuracy), (other_speed, other_accuracy) = SYNC_BENCHMARK[mode], SYNC_BENCHMARK[other]
    how = {
        "local_sgd": f"local SGD, weights averaged every {settings.average_every} steps",
        "exact": "exact synchronous SGD, one all-reduce per step",
    }
    rate = settings.worker_learning_rate()
    if rate != settings.learning_rate:
        how[mode] += (
            f", learning rate {settings.learning_rate:g} x {settings.workers} workers = "
            f"{rate:g}, see train.scale_learning_rate"
        )
    xla = "on" if settings.compiles_with_xla() else "off"
    if mode == "exact" and settings.jit_compile:
        xla += ", it cannot compile the all-reduce on CPU"
    return (
        f"{settings.workers} workers, train.sync={mode} ({how[mode]}; XLA {xla}). On the "
        f"benchmark (2 workers, 2 cores) {mode} ran at {speed:.2f}x one worker's samples/s "
        f"(validation accuracy {accuracy:+.2f} points against one worker's), {other} at "
        f"{other_speed:.2f}x ({other_accuracy:+.2f} points): --set train.sync={other} for "
        f"{how[other]}"
    )


def _stage_error(errors: list[dict[str, Any]], exc: Exception) -> Exception:
    """The error to raise for a failed stage: the first final error a task reported, else
    the last one, else what Spark says."""
    reported = next((e for e in errors if e.get("final")), errors[-1] if errors else None)
    if reported is None:
        return TrainingError(f"training failed: {spark_failure(exc)}")
    kind = _TASK_ERRORS.get(str(reported.get("type")), TrainingError)
    message = str(reported.get("message"))
    return kind(message if kind is InputDataError else f"training failed: {message}")
