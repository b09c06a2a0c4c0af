"""The scoring stage: a verified model mapped over Arrow batches of validated features.

``PRED/`` holds Parquet with the pass-through id columns, `prediction`, `probabilities`,
`confidence` and, when the input has one, `label`; ``PRED/_rejected/`` the rows that
failed validation with their reason; ``PRED/_report.json`` the counts and the
evaluation (see `pipeline.evaluation`) and the plots beside it. The directory appears
at once, when complete, replacing any previous one.

Where a batch enters TensorFlow: `_score_batches` (rows that came through Spark) and
`_score_files` (row groups of an ingest output read by the executors themselves), both
in the Python workers. The model is rebuilt from the broadcast, checksum-verified bytes
once per worker and cached; TensorFlow is imported there and nowhere on the driver.

Two routes reach the model:

- raw input, or ``score.ingested_reader: spark``: Spark reads and (for raw input)
  preprocesses the rows, and `predict_digits` hands them to Python over Arrow. Moving
  784 floats a row out of the JVM is the cost of this route.
- an ingest output (the default, ``score.ingested_reader: files``): the driver lists the
  Parquet files and their row groups (footers only), and each task reads its row groups
  with pyarrow straight into the model, so the features never pass through the JVM.
  Only the small prediction rows go back to Spark for the write and the evaluation.
  A task is a pure function of its work items, so Spark's retries are safe.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import re
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from py4j.protocol import Py4JJavaError
from pyspark import StorageLevel
from pyspark.errors import PythonException
from pyspark.sql import Column, DataFrame, Observation, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T
from pyspark.sql.pandas.types import to_arrow_schema

from pipeline import __version__
from pipeline.artifact import Metadata, read_model_dir
from pipeline.config import Config, IngestSettings
from pipeline.contract import (
    CONFIDENCE,
    FEATURE_DIM,
    FEATURES,
    LABEL,
    LABEL_ONEHOT,
    NUM_CLASSES,
    PREDICTION,
    PROBABILITIES,
    REJECT_REASON,
    SPLIT,
    Layout,
)
from pipeline.errors import DataQualityError, InputDataError, ModelError
from pipeline.evaluation import (
    Evaluation,
    MetricSums,
    batch_metric_sums,
    evaluation_files,
    metric_columns,
    metric_names,
    metric_values,
    summarize,
)
from pipeline.features import Preprocessed, accepted_columns, preprocess
from pipeline.ingest import REPORT_FILE, ingest_report, read_features
from pipeline.quarantine import (
    REJECTED_DIR,
    StageResult,
    drop_accepted,
    too_many_rejected,
    write_with_quarantine,
)
from pipeline.sources import translate_read_errors
from pipeline.storage import Storage

log = logging.getLogger(__name__)

ARROW_BATCH_CONF = "spark.sql.execution.arrow.maxRecordsPerBatch"

# Tasks per core for an ingest output read by the executors: a few, so that a core slowed
# by other work hands its share to the others, without many small output files.
TASKS_PER_CORE = 2

# Marks an executor's refusal of invalid features inside Spark's wrapped task error.
_BAD_FEATURES = "invalid features:"
# Marks an executor's finding that an input file changed after the job planned its reads.
_CHANGED = "input changed:"

# Keys of IngestSettings that say where this input keeps its pixels, label and ids,
# rather than how pixels become features. A value changed from the default in the job's
# config overrides the model's recorded preprocessing.
_INPUT_KEYS = (
    "layout",
    "label_column",
    "image_column",
    "array_column",
    "pixel_column_prefix",
    "pixel_max",
    "id_columns",
)


@dataclass(frozen=True)
class ScoreResult(StageResult):
    """The published predictions, their counts, report and evaluation."""

    evaluation: Evaluation | None = None


@dataclass(frozen=True)
class BroadcastModel:
    """What executors need to rebuild a verified model: a broadcast and its cache key."""

    handle: Any  # pyspark Broadcast of (metadata JSON, model bytes)
    key: str  # sha256 of the metadata JSON, which records the model file's sha256


def broadcast_model(spark: SparkSession, metadata: Metadata, model_bytes: bytes) -> BroadcastModel:
    """Ship verified model bytes and their metadata to the executors once per job."""
    metadata_json = metadata.model_dump_json()
    key = hashlib.sha256(metadata_json.encode("utf-8")).hexdigest()
    handle = spark.sparkContext.broadcast((metadata_json, model_bytes))
    return BroadcastModel(handle, key)


def run_scoring(
    spark: SparkSession, config: Config, input_path: str, model_dir: str, output_path: str
) -> ScoreResult:
    """Score `input_path` (raw or ingested) with the model in `model_dir` into `output_path`."""
    started = time.monotonic()
    storage = Storage(spark)
    output = storage.qualify(output_path)
    metadata, model_bytes = read_verified_model(storage, model_dir)
    score = config.score
    raw = read_features(spark, input_path)
    ingested = ingest_report(storage, input_path)
    plan = None
    if ingested is not None:
        source = _ingested_source(raw, ingested)
        if score.ingested_reader == "files":
            with translate_read_errors(input_path):
                plan = plan_row_groups(
                    storage, input_path, raw.select(*source.columns), score.max_rows_per_file
                )
    else:
        settings = scoring_preprocessing(metadata.preprocessing, config.ingest)
        source = _raw_source(preprocess(raw, settings, require_label=False))
    log.info(
        "input %s: %s, %s; model %s (sha256 %s...); %s",
        input_path,
        source.layout,
        "labelled" if source.has_label else "unlabelled",
        model_dir,
        metadata.model_sha256[:12],
        f"{plan.rows} rows in {len(plan.items)} row groups of {plan.files} files read by the "
        f"executors in {len(plan.tasks)} tasks"
        if plan is not None
        else "rows read by Spark",
    )
    model = broadcast_model(spark, metadata, model_bytes)
    threads = task_cpus(spark)
    observation = Observation("evaluation")
    metrics = metric_columns(source.has_label, score.confidence_threshold, score.confidence_bins)

    if plan is None:
        validated = source.validated
        if source.layout == Layout.IMAGE.value:
            validated = validated.persist(StorageLevel.MEMORY_AND_DISK)
        rejected_columns = source.raw_columns

        def to_output(good: DataFrame) -> DataFrame:
            scored = predict_digits(good.select(*source.columns), model, threads)
            return scored.observe(observation, *metrics)

        def metric_results() -> dict:
            return observation.get

    else:
        # Rows of an ingest output are never rejected (the executors refuse a bad batch
        # instead), so the quarantine contract holds with the scored rows themselves.
        names = metric_names(source.has_label, score.confidence_bins)
        sums = spark.sparkContext.accumulator(np.zeros(len(names)), MetricSums())
        scored = score_row_groups(
            spark,
            plan,
            model,
            threads,
            score.batch_size,
            (sums, score.confidence_threshold, score.confidence_bins),
        )
        validated = scored.withColumn(REJECT_REASON, F.lit(None).cast("string"))
        rejected_columns = tuple(c for c in scored.columns if c in (*source.ids, LABEL))

        def to_output(good: DataFrame) -> DataFrame:
            return good.drop(REJECT_REASON)

        def metric_results() -> dict:
            return metric_values(sums.value, source.has_label, score.confidence_bins)

    staging = storage.staging_dir(output)
    phases = {"prepare": time.monotonic() - started}
    try:
        with (
            translate_read_errors(input_path),
            translate_task_errors(input_path),
            arrow_batch_rows(spark, score.batch_size),
        ):
            counts = write_with_quarantine(
                validated,
                to_output=to_output,
                rejected_columns=rejected_columns,
                output_path=staging,
                rejected_path=f"{staging}/{REJECTED_DIR}",
                max_rows_per_file=score.max_rows_per_file,
            )
        phases["score_and_write"] = time.monotonic() - started - phases["prepare"]
        if counts.rows_in == 0:
            raise InputDataError(f"{input_path} holds no rows: nothing to score")
        if plan is not None and counts.rows_in != plan.rows:
            raise DataQualityError(
                f"the file footers of {input_path} list {plan.rows} rows but {counts.rows_in} "
                f"were scored; the input changed while it was read, rerun on stable input"
            )
        evaluation = summarize(
            metric_results(), source.has_label, score.confidence_threshold, score.confidence_bins
        )
        if evaluation.rows != counts.rows_out:
            raise DataQualityError(
                f"{counts.rows_out} rows were validated but {evaluation.rows} scored; "
                f"the input changed while it was read, rerun on stable input"
            )
        seconds = time.monotonic() - started
        report = _report(input_path, output, model_dir, metadata, source, counts, config, seconds)
        report["evaluation"] = evaluation.as_dict()
        failed = counts.rejected_fraction > score.max_reject_fraction
        if failed:
            report["status"] = "failed"
            drop_accepted(storage, staging)
        else:
            plotted = time.monotonic()
            for name, data in evaluation_files(evaluation).items():
                storage.write_bytes(f"{staging}/{name}", data)
            phases["plots"] = time.monotonic() - plotted
        # prepare: model, input, plan; score_and_write: the Spark job(s) that read, score
        # and write; plots: drawing and writing them. `seconds` excludes the plots.
        report["seconds_by_phase"] = {name: round(t, 3) for name, t in phases.items()}
        storage.write_json(f"{staging}/{REPORT_FILE}", report)
        storage.publish(staging, output)
    except BaseException:
        storage.delete(staging)
        raise
    finally:
        validated.unpersist()
        model.handle.unpersist()

    if failed:
        raise too_many_rejected(
            counts, "score.max_reject_fraction", score.max_reject_fraction, output, "predictions"
        )
    return ScoreResult(output, source.layout, counts, seconds, report, evaluation)


def predict_digits(features: DataFrame, model: BroadcastModel, threads: int = 1) -> DataFrame:
    """Append `prediction`, `probabilities` and `confidence`; drop the `features` column.

    `features` must hold a non-null array<float> of FEATURE_DIM values per row (validated
    features); every other column passes through unchanged, `label` last. Inference runs
    in the executors, one call per Arrow batch (``spark.sql.execution.arrow.maxRecordsPerBatch``
    rows), with TensorFlow limited to `threads` threads per task.
    """
    schema, ids, label = prediction_schema(features.schema)
    score = functools.partial(
        _score_batches,
        broadcast=model.handle,
        key=model.key,
        threads=int(threads),
        ids=ids,
        label=label,
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


@dataclass(frozen=True)
class RowGroupPlan:
    """The work of scoring an ingest output from its files: row groups grouped into tasks.

    Made on the driver from the Parquet footers alone; no data is read. Every value is
    plain (strings, ints, Arrow types), so the plan can be shipped to the executors.
    """

    filesystem: str  # "file", or the URI the executors build their pyarrow filesystem from
    items: tuple[tuple[str, int, int, int, str | None], ...]  # path, group, rows, size, split
    tasks: tuple[tuple[int, ...], ...]  # indices into `items`, contiguous, one tuple per task
    schema: T.StructType  # the predictions' Spark schema (as `predict_digits` would give)
    arrow_types: tuple[tuple[str, pa.DataType], ...]  # pass-through columns read from files
    split_from_path: bool  # `split` comes from ``split=...`` directories, not the files
    label: str | None
    rows: int
    files: int


def plan_row_groups(
    storage: Storage, input_path: str, features: DataFrame, max_rows_per_task: int = 500_000
) -> RowGroupPlan | None:
    """Plan to score the ingest output at `input_path` by reading its files in the executors.

    `features` is the input as Spark reads it, with the columns to score (ids, `split`,
    `features`, `label`): its schema fixes the output. Returns None, with a log line, when
    pyarrow cannot reach the storage or the directory has partition columns other than
    `split`: Spark then reads the rows itself.
    """
    schema, ids, label = prediction_schema(features.schema)
    root = storage.qualify(input_path).rstrip("/")
    located = _arrow_location(root)
    if located is None:
        return None
    filesystem, _ = located
    files = storage.list_files(input_path)
    partitions = [_partition_values(root, path) for path, _ in files]
    keys = {key for values in partitions for key in values}
    if keys - {SPLIT} or (keys and features.schema[SPLIT].dataType != T.StringType()):
        log.info("%s is partitioned by %s: rows are read by Spark", input_path, sorted(keys))
        return None
    split_from_path = SPLIT in keys
    fs = _filesystem(filesystem)
    paths = [_arrow_location(path)[1] for path, _ in files]
    with ThreadPoolExecutor(max_workers=max(1, min(16, len(paths)))) as pool:
        footers = list(pool.map(functools.partial(_footer, fs), paths, [p for p, _ in files]))

    needed = [FEATURES, *(c for c in ids if not (c == SPLIT and split_from_path))]
    needed += [label] if label else []
    items = []
    for (uri, size), path, footer, values in zip(files, paths, footers, partitions, strict=True):
        names = set(footer.schema.to_arrow_schema().names)
        missing = [c for c in needed if c not in names]
        if missing:
            raise InputDataError(
                f"{uri} has no {', '.join(missing)} column: every file of an ingest output "
                f"holds {', '.join(needed)}; rerun the ingest job"
            )
        for group in range(footer.num_row_groups):
            rows = footer.row_group(group).num_rows
            if rows:
                items.append((path, group, rows, size, values.get(SPLIT)))
    arrow = to_arrow_schema(schema)
    return RowGroupPlan(
        filesystem=filesystem,
        items=tuple(items),
        tasks=_group_tasks(
            [rows for _, _, rows, _, _ in items],
            TASKS_PER_CORE * cluster_parallelism(features),
            max_rows_per_task,
        ),
        schema=schema,
        arrow_types=tuple(
            (name, arrow.field(name).type) for name in (*ids, *([label] if label else []))
        ),
        split_from_path=split_from_path,
        label=label,
        rows=sum(rows for _, _, rows, _, _ in items),
        files=len(files),
    )


def cluster_parallelism(df: DataFrame) -> int:
    """Tasks the cluster runs at once (``spark.default.parallelism``)."""
    return max(1, int(df.sparkSession.sparkContext.defaultParallelism))


def score_row_groups(
    spark: SparkSession,
    plan: RowGroupPlan,
    model: BroadcastModel,
    threads: int,
    batch_rows: int,
    metrics: tuple[Any, float, int] | None = None,
) -> DataFrame:
    """The predictions for every row of `plan`, each task reading its own row groups.

    The tasks are the rows of a tiny range, one per partition, so task i scores exactly
    ``plan.tasks[i]``: a rerun or a retried task reads the same row groups. `metrics`,
    (a `MetricSums` accumulator, confidence threshold, bins), collects the evaluation's
    sums as the batches are scored; Spark applies a task's update once, when it succeeds.
    """
    score = functools.partial(
        _score_files,
        plan=plan,
        broadcast=model.handle,
        key=model.key,
        threads=int(threads),
        batch_rows=int(batch_rows),
        metrics=metrics,
    )
    tasks = max(1, len(plan.tasks))
    return spark.range(0, tasks, 1, numPartitions=tasks).mapInArrow(score, plan.schema)


def task_cpus(spark: SparkSession) -> int:
    """Cores each task may use (``spark.task.cpus``): TensorFlow's thread budget per task."""
    return max(1, int(spark.conf.get("spark.task.cpus", "1") or 1))


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


def read_verified_model(storage: Storage, model_dir: str) -> tuple[Metadata, bytes]:
    """`read_model_dir`, with a file failing the Hadoop checksum refused as a model error.

    On a local or checksummed file system a file edited behind Hadoop's back fails its
    ``.crc`` before our sha256 check even sees it.
    """
    try:
        return read_model_dir(storage, model_dir)
    except Py4JJavaError as exc:
        found = re.search(r"ChecksumException: Checksum error: (\S+)", str(exc))
        if found is None:
            raise
        raise ModelError(
            f"{found.group(1)} does not match its checksum file: it was changed or truncated; "
            f"refusing to load it"
        ) from None


def scoring_preprocessing(trained: IngestSettings, current: IngestSettings) -> IngestSettings:
    """The preprocessing to score raw input with: the model's own, located in this input.

    Keys that locate pixels, label and ids (`_INPUT_KEYS`) and that the job's config
    changed from their defaults win over the model's recorded ones.
    """
    defaults = IngestSettings()
    update = {
        key: getattr(current, key)
        for key in _INPUT_KEYS
        if getattr(current, key) != getattr(defaults, key)
    }
    return trained.model_copy(update=update)


@dataclass(frozen=True)
class _Source:
    """Validated rows to score and how to turn a good row into the model's input."""

    validated: DataFrame  # every input row, with `reject_reason`
    columns: list[Column]  # ids, `features`, `label` of a good row
    ids: tuple[str, ...]
    has_label: bool
    raw_columns: tuple[str, ...]  # what a rejected row keeps
    layout: str
    preprocessing: dict


def _raw_source(prepared: Preprocessed) -> _Source:
    """Raw input: the shared preprocessing validates and scales every row."""
    return _Source(
        validated=prepared.df,
        columns=accepted_columns(prepared, with_onehot=False),
        ids=prepared.layout.id_columns,
        has_label=prepared.layout.label_column is not None,
        raw_columns=prepared.raw_columns,
        layout=prepared.layout.layout.value,
        preprocessing=prepared_settings(prepared),
    )


def _ingested_source(raw: DataFrame, report: dict) -> _Source:
    """An ingest output: rows the shared preprocessing already validated and scaled.

    Running it again would give back the same features at the cost of two passes over
    784 values a row in the JVM; the executors instead check every batch (lengths,
    nulls, values in [0, 1]) and fail the job if this is not a genuine ingest output.
    """
    reserved = {FEATURES, LABEL, LABEL_ONEHOT, SPLIT}
    ids = tuple(c for c in report.get("id_columns") or () if c in raw.columns)
    passthrough = ids + ((SPLIT,) if SPLIT in raw.columns and SPLIT not in ids else ())
    has_label = LABEL in raw.columns
    columns = [F.col(c) for c in passthrough] + [F.col(FEATURES)]
    if has_label:
        columns.append(F.col(LABEL).cast("int").alias(LABEL))
    unknown = [c for c in raw.columns if c not in reserved and c not in ids]
    if unknown:
        log.info("ingest output columns not passed through: %s", ", ".join(unknown))
    return _Source(
        validated=raw.withColumn(REJECT_REASON, F.lit(None).cast("string")),
        columns=columns,
        ids=passthrough,
        has_label=has_label,
        raw_columns=tuple(raw.columns),
        layout="ingested",
        preprocessing=report["preprocessing"],
    )


def prepared_settings(prepared: Preprocessed) -> dict:
    """What the preprocessing decided for this input, for the report."""
    layout = prepared.layout
    return {
        "layout": layout.layout.value,
        "pixel_source": list(layout.pixel_source)[:1],
        "pixel_max": layout.pixel_max,
        "label_column": layout.label_column,
        "id_columns": list(layout.id_columns),
    }


@contextmanager
def translate_task_errors(input_path: str) -> Iterator[None]:
    """Re-raise an executor's refusal of bad features as `InputDataError`."""
    try:
        yield
    except PythonException as exc:
        message = str(exc)
        if _CHANGED in message:
            detail = message.split(_CHANGED, 1)[1].splitlines()[0].strip()
            raise DataQualityError(
                f"{detail}: the input changed while it was read, rerun on stable input"
            ) from None
        if _BAD_FEATURES in message:
            detail = message.split(_BAD_FEATURES, 1)[1].splitlines()[0].strip()
            raise InputDataError(
                f"{input_path}: {detail}. It is marked as an ingest output but holds rows the "
                f"ingest job would have rejected: rerun the ingest job on its raw data"
            ) from None
        raise


# --- executor side ------------------------------------------------------------------------

# Predictors built in this Python worker, by cache key: one model per worker, not per batch.
_PREDICTORS: dict[str, Callable[[np.ndarray], np.ndarray]] = {}
_FILESYSTEMS: dict[str, pafs.FileSystem] = {}


def _score_batches(
    batches: Iterator[pa.RecordBatch],
    *,
    broadcast: Any,
    key: str,
    threads: int,
    ids: tuple[str, ...],
    label: str | None,
) -> Iterator[pa.RecordBatch]:
    predict = _predictor(broadcast, key, threads)
    names = [*ids, PREDICTION, PROBABILITIES, CONFIDENCE, *([label] if label else [])]
    for batch in batches:
        x = features_matrix(batch.column(FEATURES))
        probabilities = predict(x) if len(x) else np.zeros((0, NUM_CLASSES), np.float32)
        yield pa.RecordBatch.from_arrays(
            [
                *(batch.column(name) for name in ids),
                *prediction_arrays(probabilities),
                *([batch.column(label)] if label else []),
            ],
            names=names,
        )


def _score_files(
    tasks: Iterator[pa.RecordBatch],
    *,
    plan: RowGroupPlan,
    broadcast: Any,
    key: str,
    threads: int,
    batch_rows: int,
    metrics: tuple[Any, float, int] | None,
) -> Iterator[pa.RecordBatch]:
    """Read, check and score the row groups of the tasks in `tasks` (task numbers)."""
    fs = _filesystem(plan.filesystem)
    types = dict(plan.arrow_types)
    passthrough = [name for name in types if name != plan.label]
    from_files = [c for c in passthrough if not (c == SPLIT and plan.split_from_path)]
    columns = [*from_files, FEATURES, *([plan.label] if plan.label else [])]
    names = [*passthrough, PREDICTION, PROBABILITIES, CONFIDENCE]
    names += [plan.label] if plan.label else []
    predict = None
    for batch in tasks:
        for task in batch.column(0).to_pylist():
            for item in plan.tasks[task]:
                split = plan.items[item][4]
                for data in _row_group_batches(fs, plan.items[item], columns, batch_rows):
                    x = features_matrix(data.column(FEATURES))
                    if predict is None:  # after the first check: bad input fails before TF
                        predict = _predictor(broadcast, key, threads)
                    n = len(x)
                    out = [
                        pa.array([split], pa.string()).take(np.zeros(n, np.int32))
                        if name == SPLIT and plan.split_from_path
                        else data.column(name).cast(types[name])
                        for name in passthrough
                    ]
                    probabilities = np.ascontiguousarray(predict(x), np.float32)
                    out += prediction_arrays(probabilities)
                    if plan.label:
                        out.append(data.column(plan.label).cast(types[plan.label]))
                    if metrics is not None:
                        _add_metrics(metrics, out, probabilities, plan.label is not None)
                    yield pa.RecordBatch.from_arrays(out, names=names)


def _row_group_batches(
    fs: pafs.FileSystem, item: tuple, columns: list[str], batch_rows: int
) -> Iterator[pa.RecordBatch]:
    """`columns` of one planned row group in batches, refusing a file changed since the plan."""
    path, group, rows, size, _ = item
    with fs.open_input_file(path) as file:
        parquet = pq.ParquetFile(file) if file.size() == size else None
        found = (
            parquet.metadata.row_group(group).num_rows
            if parquet is not None and group < parquet.num_row_groups
            else None
        )
        if parquet is None or found != rows:
            raise ValueError(
                f"{_CHANGED} {path} was {size} bytes with {rows} rows in row group {group} "
                f"when the job started, now {file.size()} bytes and {found}"
            )
        yield from parquet.iter_batches(
            batch_size=batch_rows, row_groups=[group], columns=columns, use_threads=False
        )


def _add_metrics(
    metrics: tuple[Any, float, int], out: list[pa.Array], probabilities: np.ndarray, labelled: bool
) -> None:
    accumulator, threshold, bins = metrics
    prediction, _, confidence = out[-4:-1] if labelled else out[-3:]
    label = out[-1].fill_null(-1).to_numpy() if labelled else None
    accumulator.add(
        batch_metric_sums(
            prediction.to_numpy(), confidence.to_numpy(), probabilities, label, threshold, bins
        )
    )


def _filesystem(location: str) -> pafs.FileSystem:
    """The pyarrow filesystem of a `RowGroupPlan`, made once per Python worker."""
    fs = _FILESYSTEMS.get(location)
    if fs is None:
        if location == "file":
            fs = pafs.LocalFileSystem()
        else:
            fs, _ = pafs.FileSystem.from_uri(location)
        _FILESYSTEMS[location] = fs
    return fs


def features_matrix(column: pa.Array) -> np.ndarray:
    """An (n, FEATURE_DIM) float32 view of a list<float> Arrow column, copying nothing.

    Refuses (rather than misaligns or scores) rows that are not FEATURE_DIM values in
    [0, 1]: validated features always are.
    """
    n = len(column)
    if column.null_count:
        raise ValueError(f"{_BAD_FEATURES} {column.null_count} rows have no features")
    offsets = column.offsets.to_numpy()
    if n and not (np.diff(offsets) == FEATURE_DIM).all():
        raise ValueError(f"{_BAD_FEATURES} rows have other than {FEATURE_DIM} features")
    values = column.flatten()  # honours the array's slice offset, unlike `.values`
    if values.null_count:
        raise ValueError(f"{_BAD_FEATURES} {values.null_count} feature values are null")
    flat = values.to_numpy(zero_copy_only=values.type == pa.float32())
    x = flat.astype(np.float32, copy=False).reshape(n, FEATURE_DIM)
    if n and not (x.min() >= 0.0 and x.max() <= 1.0):  # also false for NaN
        raise ValueError(f"{_BAD_FEATURES} feature values outside [0, 1] or not finite")
    return x


def prediction_arrays(probabilities: np.ndarray) -> list[pa.Array]:
    """`prediction` (int32), `probabilities` (list<float>) and `confidence` (float32)."""
    probabilities = np.ascontiguousarray(probabilities, dtype=np.float32)
    n = len(probabilities)
    prediction = probabilities.argmax(axis=1).astype(np.int32)
    confidence = probabilities[np.arange(n), prediction]
    offsets = pa.array(np.arange(0, (n + 1) * NUM_CLASSES, NUM_CLASSES, dtype=np.int32))
    return [
        pa.array(prediction),
        pa.ListArray.from_arrays(offsets, pa.array(probabilities.reshape(-1))),
        pa.array(confidence),
    ]


def _predictor(broadcast: Any, key: str, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    predictor = _PREDICTORS.get(key)
    if predictor is None:
        metadata_json, model_bytes = broadcast.value
        predictor = build_predictor(metadata_json, model_bytes, threads)
        _PREDICTORS[key] = predictor
    return predictor


def build_predictor(
    metadata_json: str, model_bytes: bytes, threads: int
) -> Callable[[np.ndarray], np.ndarray]:
    """A function from an (n, FEATURE_DIM) float32 array to (n, NUM_CLASSES) probabilities.

    The checksum is verified again here: the bytes crossed the network.
    """
    from pipeline.artifact import model_from_bytes, parse_metadata
    from pipeline.tf_runtime import tensorflow

    tf = tensorflow(threads)

    metadata = parse_metadata(metadata_json, "broadcast model metadata")
    model = model_from_bytes(metadata, model_bytes)
    forward = tf.function(
        lambda x: model(x, training=False),
        input_signature=[tf.TensorSpec([None, FEATURE_DIM], tf.float32)],
    )

    def predict(x: np.ndarray) -> np.ndarray:
        return forward(x).numpy()

    log.info(
        "model %s built in this worker (%d TensorFlow threads)", metadata.model_sha256[:12], threads
    )
    return predict


# --- driver side helpers ------------------------------------------------------------------


def _arrow_location(uri: str) -> tuple[str, str] | None:
    """(filesystem, path within it) of a Hadoop-qualified URI for pyarrow, or None."""
    scheme, sep, rest = uri.partition(":")
    if not sep or scheme == "file":
        return "file", "/" + (rest if sep else uri).lstrip("/")
    scheme = {"s3a": "s3", "s3n": "s3"}.get(scheme, scheme)
    try:
        _, path = pafs.FileSystem.from_uri(f"{scheme}:{rest}")
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
        log.info("pyarrow cannot open %s (%s): rows are read by Spark", uri, exc)
        return None
    authority = rest[2:].split("/", 1)[0] if rest.startswith("//") else ""
    return f"{scheme}://{authority}/", path


def _partition_values(root: str, path: str) -> dict[str, str | None]:
    """``key=value`` directories between `root` and the file `path`, as Spark reads them."""
    relative = path[len(root) :].lstrip("/") if path.startswith(root) else ""
    values: dict[str, str | None] = {}
    for part in relative.split("/")[:-1]:
        key, sep, value = part.partition("=")
        if sep:
            value = urllib.parse.unquote(value)
            values[key] = None if value == "__HIVE_DEFAULT_PARTITION__" else value
    return values


def _footer(fs: pafs.FileSystem, path: str, uri: str) -> pq.FileMetaData:
    try:
        return pq.read_metadata(path, filesystem=fs)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputDataError(
            f"cannot read {uri} with pyarrow ({exc}): a corrupt or non-Parquet file, or storage "
            f"that pyarrow cannot reach with this environment's credentials. Remove or "
            f"replace that file, or set score.ingested_reader=spark to read through Spark"
        ) from None


def _group_tasks(
    rows: Sequence[int], parallelism: int, max_rows_per_task: int
) -> tuple[tuple[int, ...], ...]:
    """Contiguous runs of items with about equal rows: `parallelism` of them, more when a
    task would exceed `max_rows_per_task`, never more than the items."""
    total = sum(rows)
    if not rows:
        return ()
    tasks = min(len(rows), max(parallelism, math.ceil(total / max_rows_per_task)))
    groups: list[tuple[int, ...]] = []
    current: list[int] = []
    done = 0
    for index, n in enumerate(rows):
        current.append(index)
        done += n
        left = len(rows) - index - 1
        boundary = total * (len(groups) + 1) / tasks
        if done >= boundary or left == tasks - len(groups) - 1:
            groups.append(tuple(current))
            current = []
    if current:
        groups.append(tuple(current))
    return tuple(groups)


def _report(input_path, output, model_dir, metadata: Metadata, source, counts, config, seconds):
    return {
        "status": "ok",
        "input": input_path,
        "output": output,
        "model_dir": model_dir,
        "model_sha256": metadata.model_sha256,
        "layout": source.layout,
        "label_column": LABEL if source.has_label else None,
        "id_columns": list(source.ids),
        **counts.as_dict(),
        "rejected_fraction": round(counts.rejected_fraction, 6),
        "seconds": round(seconds, 3),
        "rows_per_second": round(counts.rows_in / seconds, 1) if seconds else None,
        "preprocessing": source.preprocessing,
        "score": config.score.model_dump(mode="json"),
        "version": __version__,
    }
