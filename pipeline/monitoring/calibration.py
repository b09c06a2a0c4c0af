"""Can the model's confidence be trusted? Expected calibration error and temperature scaling.

Predictions are put in equal-width bins of confidence over [0, 1]. In a calibrated
model the accuracy within each bin equals its mean confidence; the expected calibration
error (ECE) is the gap averaged over the bins, weighted by their rows (Guo et al.,
2017). Everything is computed from per-bin sums (rows, confidence, correct
predictions), which Spark aggregates (`calibration_sums_of`) or executors add up
(`calibration_sums`), so no rows reach the driver.

Temperature scaling divides the log-probabilities by one number T fitted on validation
data to minimise the negative log-likelihood: T > 1 softens an over-confident model.
The predicted class never changes, so neither does the accuracy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from pipeline.contract import CONFIDENCE, LABEL, PREDICTION

# Per bin: rows, sum of confidence, correct predictions.
_FIELDS = 3
# Search interval of the temperature and the golden-section search's tolerance on log T.
_LOG_T_RANGE = (math.log(0.05), math.log(20.0))
_TOLERANCE = 1e-4
_MIN_PROBABILITY = 1e-12


@dataclass(frozen=True)
class Calibration:
    """Accuracy against confidence per bin, and the calibration errors."""

    rows: int
    counts: tuple[int, ...]
    mean_confidence: tuple[float | None, ...]  # None for an empty bin
    accuracy: tuple[float | None, ...]
    ece: float  # expected calibration error: the row-weighted mean gap
    mce: float  # maximum calibration error: the largest gap of a non-empty bin

    @property
    def bins(self) -> int:
        return len(self.counts)

    def as_dict(self) -> dict:
        return {
            "rows": self.rows,
            "bins": self.bins,
            "ece": round(self.ece, 6),
            "mce": round(self.mce, 6),
            "counts": list(self.counts),
            "mean_confidence": [_round(v) for v in self.mean_confidence],
            "accuracy": [_round(v) for v in self.accuracy],
        }


def confidence_bins(confidence: np.ndarray, bins: int) -> np.ndarray:
    """Bin index of each confidence in equal-width bins over [0, 1] (1.0 in the last)."""
    index = np.floor(np.asarray(confidence, np.float64) * bins).astype(np.int64)
    return np.clip(index, 0, bins - 1)


def calibration_sums(confidence: np.ndarray, correct: np.ndarray, bins: int) -> np.ndarray:
    """Per-bin rows, confidence and correct predictions of a batch, flattened (bins * 3)."""
    index = confidence_bins(confidence, bins)
    sums = np.zeros((bins, _FIELDS), np.float64)
    np.add.at(sums[:, 0], index, 1.0)
    np.add.at(sums[:, 1], index, np.asarray(confidence, np.float64))
    np.add.at(sums[:, 2], index, np.asarray(correct, np.float64))
    return sums.reshape(-1)


def calibration_sums_of(
    predictions: DataFrame, bins: int, label: str = LABEL, prediction: str = PREDICTION
) -> np.ndarray:
    """`calibration_sums` of a DataFrame of predictions, by one Spark aggregation.

    Rows without a label are left out. At most `bins` aggregated rows reach the driver.
    """
    confidence = F.col(CONFIDENCE).cast("double")
    index = F.least(F.greatest(F.floor(confidence * bins), F.lit(0)), F.lit(bins - 1))
    grouped = (
        predictions.filter(F.col(label).isNotNull())
        .groupBy(index.cast("int").alias("bin"))
        .agg(
            F.count(F.lit(1)).alias("rows"),
            F.sum(confidence).alias("confidence"),
            F.sum((F.col(prediction) == F.col(label)).cast("double")).alias("correct"),
        )
        .collect()
    )
    sums = np.zeros((bins, _FIELDS), np.float64)
    for row in grouped:
        sums[row["bin"]] = (row["rows"], row["confidence"], row["correct"])
    return sums.reshape(-1)


def calibration_from_sums(sums: np.ndarray) -> Calibration:
    """The per-bin table, ECE and MCE from `calibration_sums` (added across batches)."""
    table = np.asarray(sums, np.float64).reshape(-1, _FIELDS)
    counts, confidence, correct = table[:, 0], table[:, 1], table[:, 2]
    rows = int(counts.sum())
    filled = counts > 0
    mean_confidence = np.where(filled, confidence / np.maximum(counts, 1), np.nan)
    accuracy = np.where(filled, correct / np.maximum(counts, 1), np.nan)
    gaps = np.abs(accuracy - mean_confidence)[filled]
    ece = float((gaps * counts[filled]).sum() / rows) if rows else 0.0
    return Calibration(
        rows=rows,
        counts=tuple(int(c) for c in counts),
        mean_confidence=tuple(None if math.isnan(v) else float(v) for v in mean_confidence),
        accuracy=tuple(None if math.isnan(v) else float(v) for v in accuracy),
        ece=ece,
        mce=float(gaps.max()) if gaps.size else 0.0,
    )


def apply_temperature(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T) of each row of `probabilities`, in float32."""
    if temperature == 1.0:
        return np.asarray(probabilities, np.float32)
    logits = np.log(np.maximum(np.asarray(probabilities, np.float64), _MIN_PROBABILITY))
    scaled = logits / temperature
    scaled -= scaled.max(axis=1, keepdims=True)
    exp = np.exp(scaled)
    return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)


def negative_log_likelihood(probabilities: np.ndarray, labels: np.ndarray, t: float) -> float:
    """Mean -log p(label) after scaling with temperature `t`."""
    scaled = apply_temperature(probabilities, t).astype(np.float64)
    chosen = scaled[np.arange(len(labels)), np.asarray(labels, np.int64)]
    return float(-np.log(np.maximum(chosen, _MIN_PROBABILITY)).mean())


def fit_temperature(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """The temperature in [0.05, 20] that minimises the NLL of `labels` (golden-section
    search on log T; the NLL is convex in 1/T, so it has one minimum)."""
    if len(labels) == 0:
        raise ValueError("fitting a temperature needs at least one labelled row")
    nll = lambda log_t: negative_log_likelihood(probabilities, labels, math.exp(log_t))  # noqa: E731
    lo, hi = _LOG_T_RANGE
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = nll(a), nll(b)
    while hi - lo > _TOLERANCE:
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = nll(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = nll(b)
    return float(math.exp((lo + hi) / 2))


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)
