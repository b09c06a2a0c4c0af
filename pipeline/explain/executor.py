"""The executor side of the explain job: Arrow batches of features in, explanations out.

`explain_batches` is the `mapInArrow` body. Each Python worker rebuilds the verified
model from the broadcast once and caches its `IntegratedGradients`. Besides the output
rows, every task adds one `TaskSums` to a `pipeline.evaluation.PartitionSums`
accumulator, keyed by its partition: per-class
sums of inputs and attributions (for the class pictures), completeness errors, the
deletion curves of its first rows (its share of ``explain.faithfulness_rows``) and its
most confident errors. A retried or re-run task replaces its own entry instead of adding
to it, so the totals count every row once.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.contract import CONFIDENCE, FEATURE_DIM, FEATURES, NUM_CLASSES, PREDICTION
from pipeline.explain.faithfulness import deletion_drops

ATTRIBUTION = "attribution"  # array<float>, FEATURE_DIM values
TOP_PIXELS = "top_pixels"  # array<struct<pixel: int, value: float>>, largest first
EXPLAINED = "explained_class"  # int: the class whose probability is attributed
COMPLETENESS = "completeness_error"  # float

_EXPLAINERS: dict[tuple, Any] = {}


@dataclass(frozen=True)
class ExplainTask:
    """Plain values the tasks need (no session, no config object)."""

    broadcast: Any  # Broadcast of (metadata JSON, model bytes)
    key: str
    threads: int
    ids: tuple[str, ...]
    label: str | None
    target: str  # "predicted" or "label"
    steps: int
    baseline: float
    store_attributions: bool
    top_pixels: int
    faithfulness_rows: int  # per task
    fractions: tuple[float, ...]
    error_examples: int
    seed: int
    names: tuple[str, ...]  # output columns, in order
    arrow_types: tuple[pa.DataType, ...]  # their exact Arrow types


@dataclass
class TaskSums:
    """What one task adds up while it explains its rows."""

    counts: np.ndarray = field(default_factory=lambda: np.zeros(NUM_CLASSES))
    inputs: np.ndarray = field(default_factory=lambda: np.zeros((NUM_CLASSES, FEATURE_DIM)))
    attributions: np.ndarray = field(default_factory=lambda: np.zeros((NUM_CLASSES, FEATURE_DIM)))
    completeness_sum: float = 0.0
    completeness_max: float = 0.0
    deletion_rows: int = 0
    deletion_attribution: np.ndarray | None = None
    deletion_random: np.ndarray | None = None
    # (confidence, row number, label, prediction, pixels, attribution): most confident first
    errors: list[tuple] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return int(self.counts.sum())

    def merge(self, other: TaskSums, error_examples: int) -> TaskSums:
        def add(a, b):
            return b if a is None else a if b is None else a + b

        return TaskSums(
            counts=self.counts + other.counts,
            inputs=self.inputs + other.inputs,
            attributions=self.attributions + other.attributions,
            completeness_sum=self.completeness_sum + other.completeness_sum,
            completeness_max=max(self.completeness_max, other.completeness_max),
            deletion_rows=self.deletion_rows + other.deletion_rows,
            deletion_attribution=add(self.deletion_attribution, other.deletion_attribution),
            deletion_random=add(self.deletion_random, other.deletion_random),
            errors=heapq.nlargest(error_examples, self.errors + other.errors, key=_error_key),
        )


def explain_batches(
    batches: Iterator[pa.RecordBatch], *, task: ExplainTask, sums: Any
) -> Iterator[pa.RecordBatch]:
    """Explain every row of `batches` (one partition); add the partition's `TaskSums`."""
    from pyspark import TaskContext

    from pipeline.scoring import features_matrix

    partition = TaskContext.get().partitionId()
    rng = np.random.default_rng([task.seed, partition])
    totals = TaskSums()
    explainer = None
    seen = 0
    for batch in batches:
        x = features_matrix(batch.column(FEATURES))
        n = len(x)
        if not n:
            continue
        if explainer is None:  # after the first check: bad input fails before TF
            explainer = _explainer(task)
        label = (
            batch.column(task.label).fill_null(-1).to_numpy().astype(np.int64)
            if task.label
            else None
        )
        explained = explainer(x, label if task.target == "label" else None)
        prediction = explained.probabilities.argmax(axis=1).astype(np.int32)
        confidence = explained.probabilities[np.arange(n), prediction].astype(np.float32)
        errors = explained.completeness_error
        _add(totals, task, x, explained, prediction, confidence, label, errors, seen, rng)
        seen += n

        columns = {
            **{name: batch.column(name) for name in task.ids},
            PREDICTION: pa.array(prediction),
            CONFIDENCE: pa.array(confidence),
            EXPLAINED: pa.array(explained.target.astype(np.int32)),
            COMPLETENESS: pa.array(errors),
        }
        if task.store_attributions:
            columns[ATTRIBUTION] = _float_lists(explained.values)
        else:
            columns[TOP_PIXELS] = _top_pixels(explained.values, task.top_pixels)
        if task.label:
            columns[task.label] = batch.column(task.label)
        yield pa.RecordBatch.from_arrays(
            [
                columns[name].cast(kind)
                for name, kind in zip(task.names, task.arrow_types, strict=True)
            ],
            names=list(task.names),
        )
    sums.add({partition: totals})


def _add(totals, task, x, explained, prediction, confidence, label, errors, seen, rng) -> None:
    target = explained.target
    totals.counts += np.bincount(target, minlength=NUM_CLASSES)
    np.add.at(totals.inputs, target, x)
    np.add.at(totals.attributions, target, explained.values)
    totals.completeness_sum += float(errors.sum(dtype=np.float64))
    totals.completeness_max = max(totals.completeness_max, float(errors.max()))

    quota = task.faithfulness_rows - seen
    if quota > 0:
        part = slice(0, quota)
        by_attribution, at_random = deletion_drops(
            _explainer(task).predict,
            x[part],
            explained.values[part],
            target[part],
            task.fractions,
            rng,
            task.baseline,
        )
        totals.deletion_rows += len(by_attribution)
        for name, drops in (
            ("deletion_attribution", by_attribution),
            ("deletion_random", at_random),
        ):
            current = getattr(totals, name)
            summed = drops.sum(axis=0)
            setattr(totals, name, summed if current is None else current + summed)

    if label is not None and task.error_examples:
        wrong = np.flatnonzero((label >= 0) & (label != prediction))
        best = wrong[np.argsort(-confidence[wrong], kind="stable")][: task.error_examples]
        found = [
            (
                float(confidence[i]),
                seen + int(i),
                int(label[i]),
                int(prediction[i]),
                x[i].copy(),
                explained.values[i].copy(),
            )
            for i in best
        ]
        totals.errors = heapq.nlargest(task.error_examples, totals.errors + found, key=_error_key)


def _error_key(error: tuple) -> tuple:
    return (error[0], -error[1])


def _explainer(task: ExplainTask):
    cache_key = (task.key, task.steps, task.baseline, task.threads)
    explainer = _EXPLAINERS.get(cache_key)
    if explainer is None:
        from pipeline.artifact import model_from_bytes, parse_metadata
        from pipeline.explain.gradients import IntegratedGradients
        from pipeline.tf_runtime import tensorflow

        tensorflow(task.threads)  # first: quiet, with the task's threads, before Keras
        metadata_json, model_bytes = task.broadcast.value
        metadata = parse_metadata(metadata_json, "broadcast model metadata")
        model = model_from_bytes(metadata, model_bytes)
        explainer = IntegratedGradients(model, task.steps, task.baseline, task.threads)
        _EXPLAINERS[cache_key] = explainer
    return explainer


def _float_lists(values: np.ndarray) -> pa.Array:
    n, width = values.shape
    offsets = pa.array(np.arange(0, (n + 1) * width, width, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1).astype(np.float32)))


def _top_pixels(values: np.ndarray, k: int) -> pa.Array:
    """The k largest attributions of each row as (pixel, value), largest first."""
    n = len(values)
    k = min(k, values.shape[1])
    top = np.argpartition(-values, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(values, top, axis=1), axis=1, kind="stable")
    pixels = np.take_along_axis(top, order, axis=1)
    chosen = np.take_along_axis(values, pixels, axis=1)
    offsets = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32))
    items = pa.StructArray.from_arrays(
        [pa.array(pixels.reshape(-1).astype(np.int32)), pa.array(chosen.reshape(-1))],
        names=["pixel", "value"],
    )
    return pa.ListArray.from_arrays(offsets, items)
