"""Evaluation of predictions: Spark aggregates in, a report, two plots and a table out.

Every figure comes from one set of sums over the predictions, defined twice, exactly
alike: as Spark aggregate columns (`metric_columns`) and as NumPy sums over an Arrow
batch (`batch_metric_sums`). The scoring job gets them while it writes: through
`DataFrame.observe` when Spark holds the rows, or summed by an accumulator in the
executors that read an ingest output themselves (there the 124 aggregate columns cost
about a second per 300,000 rows, the NumPy sums a few milliseconds), one total a task
(`PartitionSums`), so a re-run task is not counted twice. `run_evaluation`
recomputes them from an existing ``PRED/`` with `DataFrame.agg`. Only the aggregated
numbers reach the driver, never rows. The plots are drawn from those numbers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pyspark.accumulators import AccumulatorParam
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from pipeline import __version__
from pipeline.cli import table
from pipeline.config import Config
from pipeline.contract import (
    CONFIDENCE,
    LABEL,
    NUM_CLASSES,
    PREDICTION,
    PROBABILITIES,
    REJECT_REASON,
    SPLIT,
)
from pipeline.errors import InputDataError
from pipeline.ingest import REPORT_FILE
from pipeline.outputs import SCORE, check_output
from pipeline.plots import confidence_png, confusion_png
from pipeline.quarantine import REJECTED_DIR
from pipeline.sources import read_parquet, translate_read_errors
from pipeline.storage import Storage

log = logging.getLogger(__name__)

CONFUSION_PLOT = "_confusion_matrix.png"
CONFIDENCE_PLOT = "_confidence_histogram.png"

# Probabilities are clipped to [EPSILON, 1] for the log loss, as Keras does.
EPSILON = 1e-7


@dataclass(frozen=True)
class ClassMetrics:
    precision: float
    recall: float
    f1: float
    support: int


@dataclass(frozen=True)
class Evaluation:
    """What a user looks at to judge a scoring run. Label metrics are None without labels."""

    rows: int
    predicted: list[int]  # rows predicted as each class
    confidence_threshold: float
    rows_below_threshold: int
    mean_confidence: float | None
    histogram: list[int]  # rows per confidence bin, equal bins over [0, 1]
    labelled_rows: int = 0
    accuracy: float | None = None
    log_loss: float | None = None
    confusion: list[list[int]] | None = None  # [true label][prediction]
    per_class: list[ClassMetrics] = field(default_factory=list)

    @property
    def has_labels(self) -> bool:
        return self.confusion is not None

    def macro(self) -> dict[str, float] | None:
        if not self.per_class:
            return None
        return {
            name: float(np.mean([getattr(m, name) for m in self.per_class]))
            for name in ("precision", "recall", "f1")
        }

    def as_dict(self) -> dict:
        bins = len(self.histogram)
        out: dict[str, Any] = {
            "rows_scored": self.rows,
            "predicted_class_distribution": {str(k): n for k, n in enumerate(self.predicted)},
            "mean_confidence": _round(self.mean_confidence),
            "confidence_threshold": self.confidence_threshold,
            "rows_below_threshold": self.rows_below_threshold,
            "fraction_below_threshold": _round(self.rows_below_threshold / self.rows)
            if self.rows
            else None,
            "confidence_histogram": [
                {"from": round(b / bins, 6), "to": round((b + 1) / bins, 6), "rows": n}
                for b, n in enumerate(self.histogram)
            ],
        }
        if self.has_labels:
            out.update(
                labelled_rows=self.labelled_rows,
                accuracy=_round(self.accuracy),
                log_loss=_round(self.log_loss),
                per_class={
                    str(k): {
                        "precision": _round(m.precision),
                        "recall": _round(m.recall),
                        "f1": _round(m.f1),
                        "support": m.support,
                    }
                    for k, m in enumerate(self.per_class)
                },
                macro={k: _round(v) for k, v in (self.macro() or {}).items()},
                confusion_matrix=self.confusion,
                confusion_matrix_axes="rows: true label, columns: prediction",
            )
        return out


@dataclass(frozen=True)
class EvaluationResult:
    output: str
    evaluation: Evaluation
    report: dict
    files: list[str]


def metric_columns(has_label: bool, threshold: float, bins: int) -> list[Column]:
    """The aggregate columns every evaluation figure is derived from (see `summarize`).

    Over a DataFrame with `prediction`, `confidence` and, when `has_label`,
    `probabilities` and `label`.
    """
    prediction = F.col(PREDICTION)
    confidence = F.col(CONFIDENCE)
    confidence_bin = F.least(F.floor(confidence.cast("double") * bins), F.lit(bins - 1))
    columns = [
        F.count(F.lit(1)).alias("rows"),
        F.count(F.when(confidence < F.lit(threshold), 1)).alias("below_threshold"),
        F.avg(confidence.cast("double")).alias("mean_confidence"),
        *[F.count(F.when(prediction == k, 1)).alias(f"predicted_{k}") for k in range(NUM_CLASSES)],
        *[F.count(F.when(confidence_bin == b, 1)).alias(f"bin_{b}") for b in range(bins)],
    ]
    if has_label:
        label = F.col(LABEL)
        cell = label * NUM_CLASSES + prediction
        p_true = F.element_at(F.col(PROBABILITIES), label + 1).cast("double")
        columns += [F.count(F.when(cell == i, 1)).alias(f"cell_{i}") for i in range(NUM_CLASSES**2)]
        columns.append(
            F.sum(F.when(label.isNotNull(), -F.log(F.greatest(p_true, F.lit(EPSILON))))).alias(
                "log_loss_sum"
            )
        )
    return columns


def metric_names(has_label: bool, bins: int) -> list[str]:
    """The keys `summarize` reads, in the order of `batch_metric_sums`' vector."""
    names = ["rows", "below_threshold", "confidence_sum"]
    names += [f"predicted_{k}" for k in range(NUM_CLASSES)]
    names += [f"bin_{b}" for b in range(bins)]
    if has_label:
        names += [f"cell_{i}" for i in range(NUM_CLASSES**2)]
        names += ["log_loss_sum", "log_loss_rows"]
    return names


def batch_metric_sums(
    prediction: np.ndarray,
    confidence: np.ndarray,
    probabilities: np.ndarray,
    label: np.ndarray | None,
    threshold: float,
    bins: int,
) -> np.ndarray:
    """`metric_columns` for one batch, as a float64 vector named by `metric_names`.

    `label` holds -1 where a row has none. Sums of batches add up to the sums of the
    whole; `metric_values` turns them into what `summarize` reads.
    """
    n = len(prediction)
    confidence = confidence.astype(np.float64)
    confidence_bin = np.minimum(np.floor(confidence * bins), bins - 1).astype(np.int64)
    parts = [
        np.array([n, np.count_nonzero(confidence < threshold), confidence.sum()], np.float64),
        np.bincount(prediction, minlength=NUM_CLASSES)[:NUM_CLASSES],
        np.bincount(confidence_bin, minlength=bins)[:bins],
    ]
    if label is not None:
        known = (label >= 0) & (label < NUM_CLASSES)
        cell = label[known] * NUM_CLASSES + prediction[known]
        p_true = probabilities[np.flatnonzero(known), label[known]].astype(np.float64)
        parts += [
            np.bincount(cell, minlength=NUM_CLASSES**2)[: NUM_CLASSES**2],
            np.array([-np.log(np.maximum(p_true, EPSILON)).sum(), np.count_nonzero(known)]),
        ]
    return np.concatenate([np.asarray(p, np.float64) for p in parts])


def metric_values(sums: np.ndarray, has_label: bool, bins: int) -> dict[str, Any]:
    """`batch_metric_sums` of every batch, added up, as the values `summarize` reads."""
    values: dict[str, Any] = dict(zip(metric_names(has_label, bins), sums.tolist(), strict=True))
    rows = values["rows"]
    values["mean_confidence"] = values.pop("confidence_sum") / rows if rows else None
    if has_label and not values.pop("log_loss_rows"):
        values["log_loss_sum"] = None
    return values


class PartitionSums(AccumulatorParam):
    """{partition: what its task added up}: the executors' share of a job's figures.

    A task adds its partition's total once, when it has seen all its rows. A retried or
    re-run task (a lost executor, a stage computed again, a DataFrame acted on twice)
    replaces its partition's entry instead of adding to it, so the totals count every row
    once, whichever stage the task runs in; an accumulator that adds would count it again.
    """

    def zero(self, value: dict) -> dict:
        return {}

    def addInPlace(self, value1: dict, value2: dict) -> dict:
        value1.update(value2)
        return value1


def partition_total(by_partition: Mapping[int, np.ndarray], size: int) -> np.ndarray:
    """The sum of the vectors of a `PartitionSums` accumulator (zeros when it holds none)."""
    total = np.zeros(size)
    for partition in sorted(by_partition):
        total += by_partition[partition]
    return total


def summarize(
    values: Mapping[str, Any], has_label: bool, threshold: float, bins: int
) -> Evaluation:
    """The evaluation from the aggregated values of `metric_columns` (driver side, tiny)."""
    rows = int(values["rows"])
    mean_confidence = values["mean_confidence"]
    base = {
        "rows": rows,
        "predicted": [int(values[f"predicted_{k}"]) for k in range(NUM_CLASSES)],
        "confidence_threshold": threshold,
        "rows_below_threshold": int(values["below_threshold"]),
        "mean_confidence": float(mean_confidence) if mean_confidence is not None else None,
        "histogram": [int(values[f"bin_{b}"]) for b in range(bins)],
    }
    if not has_label:
        return Evaluation(**base)

    confusion = np.array(
        [int(values[f"cell_{i}"]) for i in range(NUM_CLASSES**2)], dtype=np.int64
    ).reshape(NUM_CLASSES, NUM_CLASSES)
    labelled = int(confusion.sum())
    correct = np.diag(confusion)
    predicted = confusion.sum(axis=0)
    support = confusion.sum(axis=1)
    per_class = []
    for k in range(NUM_CLASSES):
        precision = _ratio(correct[k], predicted[k])
        recall = _ratio(correct[k], support[k])
        f1 = _ratio(2 * precision * recall, precision + recall)
        per_class.append(ClassMetrics(precision, recall, f1, int(support[k])))
    log_loss_sum = values["log_loss_sum"]
    return Evaluation(
        **base,
        labelled_rows=labelled,
        accuracy=_ratio(correct.sum(), labelled) if labelled else None,
        log_loss=float(log_loss_sum) / labelled if labelled and log_loss_sum is not None else None,
        confusion=confusion.tolist(),
        per_class=per_class,
    )


def evaluations_by_split(
    predictions: DataFrame, has_label: bool, threshold: float, bins: int
) -> dict[str, Evaluation]:
    """The evaluation of each value of the `split` column (train, validation, test), by name.

    Empty when the predictions have no `split` column. One aggregation grouped by split,
    over the prediction columns only.
    """
    if SPLIT not in predictions.columns:
        return {}
    grouped = predictions.groupBy(SPLIT).agg(*metric_columns(has_label, threshold, bins))
    return {
        str(row[SPLIT]): summarize(row.asDict(), has_label, threshold, bins)
        for row in sorted(grouped.collect(), key=lambda r: str(r[SPLIT]))
    }


def metric_inputs(columns) -> list[str]:
    """The columns the evaluation reads, of those present: predictions, label, split."""
    return [c for c in (PREDICTION, PROBABILITIES, CONFIDENCE, LABEL, SPLIT) if c in columns]


def split_summary(by_split: Mapping[str, Evaluation]) -> str:
    """One line per split: rows, accuracy and rows below the confidence threshold."""
    rows = [
        [
            name,
            e.rows,
            f"{e.accuracy:.4f}" if e.accuracy is not None else "-",
            e.rows_below_threshold,
        ]
        for name, e in by_split.items()
    ]
    return table(rows, ["split", "rows", "accuracy", "below threshold"])


def evaluation_files(evaluation: Evaluation) -> dict[str, bytes]:
    """The plots, as PNG bytes by file name: the confusion matrix only when labelled."""
    files = {
        CONFIDENCE_PLOT: confidence_png(
            evaluation.histogram,
            threshold=evaluation.confidence_threshold,
            rows=evaluation.rows,
            below=evaluation.rows_below_threshold,
        )
    }
    if evaluation.has_labels:
        files[CONFUSION_PLOT] = confusion_png(
            evaluation.confusion, accuracy=evaluation.accuracy, rows=evaluation.labelled_rows
        )
    return files


def console_summary(evaluation: Evaluation) -> str:
    """A short table per class, then the totals: what to read after a large scoring run."""
    headers = ["class", "predicted"]
    if evaluation.has_labels:
        headers += ["true", "precision", "recall", "f1"]
    rows: list[list[object]] = []
    for k in range(NUM_CLASSES):
        row: list[object] = [str(k), evaluation.predicted[k]]
        if evaluation.has_labels:
            m = evaluation.per_class[k]
            row += [m.support, m.precision, m.recall, m.f1]
        rows.append(row)
    macro = evaluation.macro()
    if macro:
        rows.append(["macro", evaluation.rows, evaluation.labelled_rows, *macro.values()])
    lines = [table(rows, headers), ""]
    if evaluation.accuracy is not None:
        lines.append(f"accuracy {evaluation.accuracy:.4f}   log loss {evaluation.log_loss:.4f}")
    share = evaluation.rows_below_threshold / evaluation.rows if evaluation.rows else 0.0
    lines.append(
        f"confidence below {evaluation.confidence_threshold:g}: "
        f"{evaluation.rows_below_threshold:,} rows ({share:.1%})"
        + (f", mean confidence {evaluation.mean_confidence:.3f}" if evaluation.rows else "")
    )
    bins = len(evaluation.histogram)
    peak = max(evaluation.histogram) or 1
    for b, n in enumerate(evaluation.histogram):
        bar = "#" * round(30 * n / peak)
        lines.append(f"  {b / bins:4.2f}-{(b + 1) / bins:4.2f} {n:>10,} {bar}".rstrip())
    return "\n".join(lines)


def run_evaluation(spark: SparkSession, config: Config, pred_path: str) -> EvaluationResult:
    """Recompute the evaluation of an existing ``PRED/`` and rewrite its report and plots.

    Reads only the prediction columns and the rejected rows' reasons; the model is not
    needed. The report's scoring counts are refreshed from the data, the rest kept.
    """
    started = time.monotonic()
    storage = Storage(spark)
    output = check_output(storage, pred_path, SCORE, option="--predictions")
    report_path = f"{output}/{REPORT_FILE}"
    report = storage.read_json(report_path) if storage.exists(report_path) else {}
    if report.get("status") == "failed":
        raise InputDataError(
            f"{output} is the output of a failed scoring run (no predictions): rerun scoring"
        )
    predictions = read_parquet(spark, output)
    missing = [c for c in (PREDICTION, CONFIDENCE, PROBABILITIES) if c not in predictions.columns]
    if missing:
        raise InputDataError(
            f"{output} has no {', '.join(missing)} column: not a scoring output "
            f"(columns: {', '.join(predictions.columns)})"
        )
    has_label = LABEL in predictions.columns
    score = config.score
    with translate_read_errors(output):
        values = predictions.agg(
            *metric_columns(has_label, score.confidence_threshold, score.confidence_bins)
        ).first()
        rejected = _rejected_counts(spark, storage, f"{output}/{REJECTED_DIR}")
        by_split = evaluations_by_split(
            predictions.select(*metric_inputs(predictions.columns)),
            has_label,
            score.confidence_threshold,
            score.confidence_bins,
        )
    evaluation = summarize(
        values.asDict(), has_label, score.confidence_threshold, score.confidence_bins
    )

    rows_rejected = sum(rejected.values())
    rows_in = evaluation.rows + rows_rejected
    if by_split:
        report["evaluation_by_split"] = {name: e.as_dict() for name, e in by_split.items()}
    report.update(
        status="ok",
        output=output,
        rows_in=rows_in,
        rows_out=evaluation.rows,
        rows_rejected=rows_rejected,
        rejected_by_reason=rejected,
        rejected_fraction=round(rows_rejected / rows_in, 6) if rows_in else 0.0,
        evaluation=evaluation.as_dict(),
        evaluated_seconds=round(time.monotonic() - started, 3),
        evaluated_version=__version__,
    )
    files = []
    for name, data in evaluation_files(evaluation).items():
        storage.write_bytes(f"{output}/{name}", data)
        files.append(f"{output}/{name}")
    if not evaluation.has_labels and storage.exists(f"{output}/{CONFUSION_PLOT}"):
        storage.delete(f"{output}/{CONFUSION_PLOT}")
    storage.write_json(report_path, report)
    log.info("evaluation of %s rewritten", output)
    return EvaluationResult(output, evaluation, report, [report_path, *files])


def _rejected_counts(spark: SparkSession, storage: Storage, path: str) -> dict[str, int]:
    if not storage.exists(path) or not storage.list_files(path):
        return {}
    by_reason = read_parquet(spark, path).groupBy(REJECT_REASON).count().collect()
    return {str(r[REJECT_REASON]): int(r["count"]) for r in sorted(by_reason, key=str)}


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator) / float(denominator) if denominator else 0.0


def _round(value: float | None) -> float | None:
    return round(float(value), 6) if value is not None else None
