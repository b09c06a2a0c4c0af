"""The executor side of scoring: where a batch enters the model.

Functions that run in Spark's Python workers, one call per partition:

- `score_batches`: Arrow batches of rows that came through Spark (raw input, or an
  ingest output read by Spark);
- `score_files`: task numbers of a `RowGroupPlan`; the task reads its own row groups of
  an ingest output with pyarrow (`pipeline.rowgroups`);
- `write_files`: the same, with the task writing its predictions' Parquet files itself
  (an RDD job: the driver needs no DataFrame for it).

Both check every batch (`features_matrix`) before the model sees it and cache one
predictor per worker: an ONNX Runtime session built from the broadcast ``model.onnx``
bytes after verifying their checksum. TensorFlow is never imported here.

A refusal raises `InvalidFeatures`, `rowgroups.InputChanged` or
`rowgroups.UnreadableRowGroup`; the driver recognises them by their type in the failed
task's Python traceback (`pipeline.scoring.job`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline import rowgroups
from pipeline.contract import (
    CONFIDENCE,
    FEATURE_DIM,
    FEATURES,
    NUM_CLASSES,
    PREDICTION,
    PROBABILITIES,
)
from pipeline.evaluation import batch_metric_sums
from pipeline.rowgroups import read_row_group

log = logging.getLogger(__name__)

# Predictors built in this Python worker, by cache key: one model per worker, not per batch.
_PREDICTORS: dict[str, Callable[[np.ndarray], np.ndarray]] = {}


class InvalidFeatures(ValueError):
    """A batch holds rows that validated features never are (wrong length, null, not in [0, 1])."""


def score_batches(
    batches: Iterator[pa.RecordBatch],
    *,
    broadcast: Any,
    key: str,
    threads: int,
    ids: tuple[str, ...],
    label: str | None,
    watch: tuple[Any, Any] | None = None,
) -> Iterator[pa.RecordBatch]:
    """Predictions for Arrow batches of ids, `features` and `label`, in that output order."""
    predict = _predictor(broadcast, key, threads)
    names = [*ids, PREDICTION, PROBABILITIES, CONFIDENCE, *([label] if label else [])]
    watched = None
    for batch in batches:
        x = features_matrix(batch.column(FEATURES))
        probabilities = predict(x) if len(x) else np.zeros((0, NUM_CLASSES), np.float32)
        out = [
            *(batch.column(name) for name in ids),
            *prediction_arrays(probabilities),
            *([batch.column(label)] if label else []),
        ]
        if watch is not None:
            watched = _plus(watched, _watch_sums(watch, x, out, label is not None))
        yield pa.RecordBatch.from_arrays(out, names=names)
    _add_task_total(watch, watched)


def append_predictions(
    batches: Iterator[pa.RecordBatch],
    *,
    broadcast: Any,
    key: str,
    threads: int,
    features: str,
    keep: tuple[str, ...],
) -> Iterator[pa.RecordBatch]:
    """The `keep` columns of each batch, then `prediction`, `probabilities`, `confidence`.

    Rows whose `features` are null get null predictions; other rows must be validated
    features (`features_matrix`).
    """
    predict = _predictor(broadcast, key, threads)
    for batch in batches:
        column = batch.column(features)
        valid = column.is_valid().to_numpy(zero_copy_only=False)
        rows = np.flatnonzero(valid)
        x = features_matrix(column.take(pa.array(rows, pa.int64())))
        probabilities = np.zeros((len(column), NUM_CLASSES), np.float32)
        if len(rows):
            probabilities[rows] = predict(x)
        prediction, listed, confidence = prediction_arrays(probabilities)
        missing = pa.array(~valid)
        yield pa.RecordBatch.from_arrays(
            [
                *(batch.column(name) for name in keep),
                pa.array(prediction.to_numpy(), mask=~valid),
                pa.ListArray.from_arrays(listed.offsets, listed.values, mask=missing),
                pa.array(confidence.to_numpy(), mask=~valid),
            ],
            names=[*keep, PREDICTION, PROBABILITIES, CONFIDENCE],
        )


def score_files(
    tasks: Iterator[pa.RecordBatch],
    *,
    plan: Any,  # a RowGroupPlan
    broadcast: Any,
    key: str,
    threads: int,
    batch_rows: int,
    metrics: tuple[Any, float, int] | None,
    watch: tuple[Any, Any] | None = None,
) -> Iterator[pa.RecordBatch]:
    """Read, check and score the row groups of the tasks in `tasks` (task numbers)."""
    fs = rowgroups.filesystem(plan.filesystem)
    types = dict(plan.arrow_types)
    passthrough = [name for name in types if name != plan.label]
    from_path = plan.partition_column
    columns = [c for c in passthrough if c != from_path]
    columns += [FEATURES, *([plan.label] if plan.label else [])]
    names = [*passthrough, PREDICTION, PROBABILITIES, CONFIDENCE]
    names += [plan.label] if plan.label else []
    predict = None
    measured = watched = None
    for batch in tasks:
        for task in batch.column(0).to_pylist():
            for index in plan.tasks[task]:
                item = plan.items[index]
                for data in read_row_group(fs, item, columns, batch_rows):
                    x = features_matrix(data.column(FEATURES))
                    if predict is None:  # after the first check: bad input fails before the model
                        predict = _predictor(broadcast, key, threads)
                    n = len(x)
                    out = [
                        pa.array([item.partition], pa.string()).take(np.zeros(n, np.int32))
                        if name == from_path
                        else data.column(name).cast(types[name])
                        for name in passthrough
                    ]
                    probabilities = np.ascontiguousarray(predict(x), np.float32)
                    out += prediction_arrays(probabilities)
                    if plan.label:
                        out.append(data.column(plan.label).cast(types[plan.label]))
                    labelled = plan.label is not None
                    if metrics is not None:
                        sums = _metric_sums(metrics, out, probabilities, labelled)
                        measured = _plus(measured, sums)
                    if watch is not None:
                        watched = _plus(watched, _watch_sums(watch, x, out, labelled))
                    yield pa.RecordBatch.from_arrays(out, names=names)
    _add_task_total(metrics, measured)
    _add_task_total(watch, watched)


def write_files(
    tasks: Iterator[int],
    *,
    output: tuple[str, str],
    max_rows_per_file: int,
    **score: Any,
) -> Iterator[int]:
    """`score_files` for task numbers of an RDD partition, with the task's predictions
    written as Parquet files into the directory `output` (a `rowgroups.locate` root and a
    path in it) rather than handed back to Spark; yields the rows written per task.

    The rows never enter the JVM: Spark's write of them cost more than scoring them.
    """
    fs = rowgroups.filesystem(output[0])
    fs.create_dir(output[1], recursive=True)
    for task in tasks:
        one = pa.RecordBatch.from_arrays([pa.array([task], pa.int64())], names=["task"])
        scored = score_files(iter([one]), **score)
        yield write_parts(fs, output[1], f"part-{task:05d}", scored, max_rows_per_file)


def write_parts(
    fs: Any, directory: str, prefix: str, batches: Iterator[pa.RecordBatch], max_rows: int
) -> int:
    """Write `batches` to ``PREFIX-cNNN.snappy.parquet`` files of at most `max_rows` rows;
    returns the rows written.

    Each file is written under a hidden temporary name and renamed when complete, so a
    retried or speculative attempt of the task replaces whole files with the same rows.
    """
    import uuid

    import pyarrow.parquet as pq

    written = part = in_file = 0
    writer = temporary = None
    try:
        for batch in batches:
            offset = 0
            while offset < batch.num_rows:
                if writer is None:
                    temporary = f"{directory}/.{prefix}-c{part:03d}.{uuid.uuid4().hex}.tmp"
                    writer = pq.ParquetWriter(
                        temporary, batch.schema, filesystem=fs, compression="snappy"
                    )
                    in_file = 0
                n = min(batch.num_rows - offset, max_rows - in_file)
                writer.write_batch(batch.slice(offset, n))
                offset, in_file, written = offset + n, in_file + n, written + n
                if in_file == max_rows:
                    writer.close()
                    fs.move(temporary, f"{directory}/{prefix}-c{part:03d}.snappy.parquet")
                    writer = temporary = None
                    part += 1
        if writer is not None:
            writer.close()
            fs.move(temporary, f"{directory}/{prefix}-c{part:03d}.snappy.parquet")
            writer = temporary = None
    finally:
        if writer is not None:  # failed part-way: leave no partial file behind
            writer.close()
            fs.delete_file(temporary)
    return written


def _metric_sums(
    metrics: tuple[Any, float, int], out: list[pa.Array], probabilities: np.ndarray, labelled: bool
) -> np.ndarray:
    """The batch's evaluation sums (`pipeline.evaluation.batch_metric_sums`)."""
    _, threshold, bins = metrics
    prediction, _, confidence = out[-4:-1] if labelled else out[-3:]
    label = out[-1].fill_null(-1).to_numpy() if labelled else None
    return batch_metric_sums(
        prediction.to_numpy(), confidence.to_numpy(), probabilities, label, threshold, bins
    )


def _watch_sums(
    watch: tuple[Any, Any], x: np.ndarray, out: list[pa.Array], labelled: bool
) -> np.ndarray:
    """The batch's calibration and profile sums (`pipeline.monitoring.watch`)."""
    from pipeline.monitoring.watch import batch_watch_sums

    _, shape = watch
    prediction, _, confidence = out[-4:-1] if labelled else out[-3:]
    label = out[-1].fill_null(-1).to_numpy().astype(np.int64) if labelled else None
    return batch_watch_sums(shape, x, prediction.to_numpy(), confidence.to_numpy(), label)


def _plus(total: np.ndarray | None, sums: np.ndarray) -> np.ndarray:
    return sums if total is None else total + sums


def _add_task_total(gathered: tuple | None, total: np.ndarray | None) -> None:
    """Add this task's total, once, to the `PartitionSums` accumulator of `gathered`."""
    if gathered is not None and total is not None:
        from pyspark import TaskContext

        gathered[0].add({TaskContext.get().partitionId(): total})


def features_matrix(column: pa.Array) -> np.ndarray:
    """An (n, FEATURE_DIM) float32 view of a list<float> Arrow column, copying nothing.

    Refuses (rather than misaligns or scores) rows that are not FEATURE_DIM values in
    [0, 1]: validated features always are.
    """
    n = len(column)
    if column.null_count:
        raise InvalidFeatures(f"{column.null_count} rows have no features")
    offsets = column.offsets.to_numpy()
    if n and not (np.diff(offsets) == FEATURE_DIM).all():
        raise InvalidFeatures(f"rows have other than {FEATURE_DIM} features")
    values = column.flatten()  # honours the array's slice offset, unlike `.values`
    if values.null_count:
        raise InvalidFeatures(f"{values.null_count} feature values are null")
    flat = values.to_numpy(zero_copy_only=values.type == pa.float32())
    x = flat.astype(np.float32, copy=False).reshape(n, FEATURE_DIM)
    if n and not (x.min() >= 0.0 and x.max() <= 1.0):  # also false for NaN
        raise InvalidFeatures("feature values outside [0, 1] or not finite")
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


def start_worker(_: Iterator[int], *, broadcast: Any, key: str, threads: int) -> None:
    """What a scoring task does first, done ahead by the warm-up job while the driver
    plans (`inference.start_workers`): this Python worker imports the scoring code and
    builds its predictor, so a scoring task that lands here starts on its rows."""
    import pyarrow.parquet  # noqa: F401  (what `write_parts` writes with)

    _predictor(broadcast, key, threads)


def _predictor(broadcast: Any, key: str, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    predictor = _PREDICTORS.get(key)
    if predictor is None:
        metadata_json, onnx_bytes = broadcast.value
        predictor = build_predictor(metadata_json, onnx_bytes, threads)
        _PREDICTORS[key] = predictor
    return predictor


def build_predictor(
    metadata_json: str, onnx_bytes: bytes, threads: int
) -> Callable[[np.ndarray], np.ndarray]:
    """A function from an (n, FEATURE_DIM) float32 array to (n, NUM_CLASSES) probabilities.

    An ONNX Runtime session with `threads` threads over the graph the driver verified.
    The checksum is verified again here: the bytes crossed the network.
    """
    from pipeline.artifact import check_onnx_checksum, parse_metadata
    from pipeline.monitoring.calibration import apply_temperature
    from pipeline.onnx_graph import session

    metadata = parse_metadata(metadata_json, "broadcast model metadata")
    check_onnx_checksum(metadata, onnx_bytes, "(broadcast model)")
    forward = session(onnx_bytes, threads)
    temperature = metadata.temperature

    def predict(x: np.ndarray) -> np.ndarray:
        if temperature is None:
            return forward(x)
        return apply_temperature(forward(x), temperature)

    log.info("model %s ready in this worker (%d threads)", metadata.model_sha256[:12], threads)
    return predict
