"""The model on a DataFrame, driver half: verified bytes broadcast, Arrow batches mapped.

`read_scoring_model` reads and checks a model directory's ``model.onnx`` on the driver
(no TensorFlow anywhere in scoring); `broadcast_model` ships those bytes
to the executors once per job; `predict_digits`
(rows Spark holds) and `score_row_groups` (a `RowGroupPlan`'s files) map the executor
functions of `pipeline.scoring.executor` over the data with ``mapInArrow``.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from py4j.protocol import Py4JJavaError
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import types as T

from pipeline.artifact import Metadata, read_model_dir, read_onnx_model
from pipeline.contract import CONFIDENCE, FEATURES, LABEL, PREDICTION, PROBABILITIES
from pipeline.errors import InputDataError, ModelError
from pipeline.scoring import executor
from pipeline.storage import Storage

if TYPE_CHECKING:
    from pipeline.scoring.plan import RowGroupPlan

log = logging.getLogger(__name__)

ARROW_BATCH_CONF = "spark.sql.execution.arrow.maxRecordsPerBatch"
_CHECKSUM_EXCEPTION = "org.apache.hadoop.fs.ChecksumException"


@dataclass(frozen=True)
class BroadcastModel:
    """What executors need to rebuild a verified model: a broadcast and its cache key."""

    handle: Any  # pyspark Broadcast of (metadata JSON, model bytes)
    key: str  # sha256 of the metadata JSON, which records the model files' sha256


def broadcast_model(spark: SparkSession, metadata: Metadata, model_bytes: bytes) -> BroadcastModel:
    """Ship verified model bytes and their metadata to the executors once per job.

    Scoring ships ``model.onnx``; explanations, which need TensorFlow, ``model.keras``.
    """
    metadata_json = metadata.model_dump_json()
    key = hashlib.sha256(metadata_json.encode("utf-8")).hexdigest()
    handle = spark.sparkContext.broadcast((metadata_json, model_bytes))
    return BroadcastModel(handle, key)


def read_verified_model(storage: Storage, model_dir: str) -> tuple[Metadata, bytes]:
    """`read_model_dir`: metadata and verified ``model.keras`` bytes (for TensorFlow users,
    such as explanations), with a file failing the Hadoop checksum refused as a model error.
    """
    with _checksum_errors(model_dir):
        return read_model_dir(storage, model_dir)


def read_scoring_model(storage: Storage, model_dir: str) -> tuple[Metadata, bytes]:
    """`read_onnx_model`: metadata and verified ``model.onnx`` bytes, what scoring runs,
    with a file failing the Hadoop checksum refused as a model error."""
    with _checksum_errors(model_dir):
        return read_onnx_model(storage, model_dir)


@contextmanager
def _checksum_errors(model_dir: str) -> Iterator[None]:
    """Re-raise Hadoop's checksum failure as `ModelError`.

    On a local or checksummed file system a file edited behind Hadoop's back fails its
    ``.crc`` before our sha256 check even sees it.
    """
    try:
        yield
    except Py4JJavaError as exc:
        failed = _java_cause(exc.java_exception, _CHECKSUM_EXCEPTION)
        if failed is None:
            raise
        raise ModelError(
            f"a file of {model_dir} does not match its checksum file ({failed.getMessage()}): "
            f"it was changed or truncated; refusing to load it"
        ) from None


def _java_cause(throwable: Any, class_name: str) -> Any:
    """The first exception of class `class_name` in a Java exception's cause chain."""
    seen = 0
    while throwable is not None and seen < 20:
        if throwable.getClass().getName() == class_name:
            return throwable
        throwable, seen = throwable.getCause(), seen + 1
    return None


def predict_digits(
    features: DataFrame, model: BroadcastModel, threads: int = 1, watch: tuple | None = None
) -> DataFrame:
    """Append `prediction`, `probabilities` and `confidence`; drop the `features` column.

    `features` must hold a non-null array<float> of FEATURE_DIM values per row (validated
    features); every other column passes through unchanged, `label` last. Inference runs
    in the executors, one call per Arrow batch (``spark.sql.execution.arrow.maxRecordsPerBatch``
    rows), with the model limited to `threads` threads per task. `watch`, (a
    `pipeline.evaluation.PartitionSums` accumulator, a `pipeline.monitoring.watch.WatchShape`),
    collects calibration and drift sums: one total a task, which a re-run task replaces.
    """
    schema, ids, label = prediction_schema(features.schema)
    score = functools.partial(
        executor.score_batches,
        broadcast=model.handle,
        key=model.key,
        threads=int(threads),
        ids=ids,
        label=label,
        watch=watch,
    )
    return features.mapInArrow(score, schema)


def prediction_schema(features: T.StructType) -> tuple[T.StructType, tuple[str, ...], str | None]:
    """The output schema for rows of `features`, its pass-through ids and its label column.

    Ids first, in the input's order, then `prediction`, `probabilities`, `confidence`,
    and `label` last when there is one.
    """
    fields = {f.name: f for f in features.fields}
    if FEATURES not in fields:
        raise InputDataError(f"no '{FEATURES}' column to score; columns: {list(fields)}")
    ids = [f for name, f in fields.items() if name not in (FEATURES, LABEL)]
    label = [fields[LABEL]] if LABEL in fields else []
    schema = T.StructType(
        [
            *ids,
            T.StructField(PREDICTION, T.IntegerType(), False),
            T.StructField(PROBABILITIES, T.ArrayType(T.FloatType(), False), False),
            T.StructField(CONFIDENCE, T.FloatType(), False),
            *label,
        ]
    )
    return schema, tuple(f.name for f in ids), (LABEL if label else None)


def score_row_groups(
    spark: SparkSession,
    plan: RowGroupPlan,
    model: BroadcastModel,
    threads: int,
    batch_rows: int,
    metrics: tuple[Any, float, int] | None = None,
    watch: tuple | None = None,
) -> DataFrame:
    """The predictions for every row of `plan`, each task reading its own row groups.

    The tasks are the rows of a tiny range, one per partition, so task i scores exactly
    ``plan.tasks[i]``: a rerun or a retried task reads the same row groups. `metrics`,
    (a `PartitionSums` accumulator, confidence threshold, bins), collects the evaluation's
    sums as the batches are scored, one total a task, which a re-run task replaces.
    `watch` does the same for calibration and drift (see `predict_digits`).
    """
    return _over_tasks(
        spark, plan, executor.score_files, plan.schema, model, threads, batch_rows, metrics, watch
    )


def write_row_groups(
    spark: SparkSession,
    plan: RowGroupPlan,
    model: BroadcastModel,
    threads: int,
    batch_rows: int,
    output: tuple[str, str],
    max_rows_per_file: int,
    metrics: tuple[Any, float, int] | None = None,
    watch: tuple | None = None,
) -> int:
    """`score_row_groups`, with each task writing its predictions as Parquet files into
    `output` (a `rowgroups.locate` root and directory); returns the rows written.

    Files are named by task (``part-TTTTT-cNNN.snappy.parquet``), so a retried task
    replaces its own. Only one count a task comes back to the driver. The job is an RDD
    of task numbers: as a DataFrame it would cost a cold JVM seconds of query planning
    and code generation.
    """
    mapped = _task_function(
        plan,
        executor.write_files,
        model,
        threads,
        batch_rows,
        metrics,
        watch,
        output=output,
        max_rows_per_file=int(max_rows_per_file),
    )
    tasks = max(1, len(plan.tasks))
    return sum(spark.sparkContext.parallelize(range(tasks), tasks).mapPartitions(mapped).collect())


def _over_tasks(
    spark: SparkSession,
    plan: RowGroupPlan,
    function: Any,
    schema: Any,
    model: BroadcastModel,
    threads: int,
    batch_rows: int,
    metrics: tuple[Any, float, int] | None,
    watch: tuple | None,
) -> DataFrame:
    """`function` (an executor function of task numbers) over a tiny range, one row and one
    partition per task of `plan`, so task i always works on ``plan.tasks[i]``."""
    mapped = _task_function(plan, function, model, threads, batch_rows, metrics, watch)
    tasks = max(1, len(plan.tasks))
    return spark.range(0, tasks, 1, numPartitions=tasks).mapInArrow(mapped, schema)


def _task_function(
    plan: RowGroupPlan,
    function: Any,
    model: BroadcastModel,
    threads: int,
    batch_rows: int,
    metrics: tuple[Any, float, int] | None,
    watch: tuple | None,
    **options: Any,
) -> Any:
    """`function` with the plan, the model and the settings every task needs bound."""
    return functools.partial(
        function,
        plan=plan,
        broadcast=model.handle,
        key=model.key,
        threads=int(threads),
        batch_rows=int(batch_rows),
        metrics=metrics,
        watch=watch,
        **options,
    )


def start_workers(spark: SparkSession, model: BroadcastModel, threads: int) -> threading.Thread:
    """Start the Python workers of an RDD scoring job ahead of it, on a thread of its own:
    a tiny job, one task a slot, in which each worker imports the scoring code and builds
    its predictor (`executor.start_worker`). The job's own tasks then find the workers
    ready (Spark reuses them). It overlaps the driver's planning; a failure here is left
    for the scoring job to report."""
    sc = spark.sparkContext
    slots = max(1, sc.defaultParallelism // max(1, threads))
    start = functools.partial(
        executor.start_worker, broadcast=model.handle, key=model.key, threads=int(threads)
    )

    def run() -> None:
        sc.setJobDescription("start the scoring workers")
        try:
            sc.parallelize(range(slots), slots).foreachPartition(start)
        except Exception as exc:  # the scoring job meets any real problem again
            log.debug("starting the scoring workers ahead failed: %s", exc)

    thread = threading.Thread(target=run, name="start-scoring-workers", daemon=True)
    thread.start()
    return thread


def task_cpus(spark: SparkSession) -> int:
    """Cores each task may use (``spark.task.cpus``, a core setting): the model's thread
    budget per task."""
    return max(1, int(spark.sparkContext.getConf().get("spark.task.cpus", "1") or 1))


@contextmanager
def arrow_batch_rows(spark: SparkSession, rows: int) -> Iterator[None]:
    """Set the Arrow batch size (rows per inference call) for the actions inside."""
    previous = spark.conf.get(ARROW_BATCH_CONF, None)
    spark.conf.set(ARROW_BATCH_CONF, str(rows))
    try:
        yield
    finally:
        if previous is None:
            spark.conf.unset(ARROW_BATCH_CONF)
        else:
            spark.conf.set(ARROW_BATCH_CONF, previous)
