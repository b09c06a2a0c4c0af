"""Does the data being scored still look like the data the model learned from?

A `DataProfile` summarises a features dataset: per-pixel mean and standard deviation,
a histogram of each digit's mean intensity (its ink), the share of non-zero pixels and
the class mix. It is built from sums that tasks add up batch by batch (`profile_sums`:
training's tasks as they read their rows, scoring's executors as they score), never
from collected rows, and is small enough for ``metadata.json`` (about 20 kB).

`compare_profiles` measures the distance of a profile to the training one: the
population stability index (PSI) of the ink histogram and of the class mix, and the
mean absolute difference of the per-pixel means, each judged `ok`, `warn` or `alert`
against the thresholds of ``score.drift``; the overall status is the worst of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from pipeline.config import DriftSettings
from pipeline.contract import FEATURE_DIM, NUM_CLASSES

STATUSES = ("ok", "warn", "alert")
# Share given to an empty bin, so that the PSI stays finite.
_EPSILON = 1e-4


@dataclass(frozen=True)
class DataProfile:
    """Summary statistics of a features dataset."""

    rows: int
    pixel_mean: tuple[float, ...]  # FEATURE_DIM values
    pixel_std: tuple[float, ...]  # FEATURE_DIM values (population standard deviation)
    ink_histogram: tuple[int, ...]  # rows per equal-width bin of mean intensity over [0, 1]
    nonzero_share: float  # share of all pixels above 0
    class_counts: tuple[int, ...]  # rows per class (labels, or predictions when scoring)
    class_source: str | None = None  # the column the classes came from

    @property
    def ink_mean(self) -> float:
        return float(np.mean(self.pixel_mean))

    def mean_image(self) -> np.ndarray:
        return np.asarray(self.pixel_mean, np.float64)

    def as_dict(self) -> dict:
        return {
            "rows": self.rows,
            "class_source": self.class_source,
            "class_counts": list(self.class_counts),
            "nonzero_share": round(self.nonzero_share, 6),
            "ink_histogram": list(self.ink_histogram),
            "pixel_mean": [round(v, 5) for v in self.pixel_mean],
            "pixel_std": [round(v, 5) for v in self.pixel_std],
        }

    @classmethod
    def from_dict(cls, data: dict) -> DataProfile:
        return cls(
            rows=int(data["rows"]),
            pixel_mean=tuple(float(v) for v in data["pixel_mean"]),
            pixel_std=tuple(float(v) for v in data["pixel_std"]),
            ink_histogram=tuple(int(v) for v in data["ink_histogram"]),
            nonzero_share=float(data["nonzero_share"]),
            class_counts=tuple(int(v) for v in data["class_counts"]),
            class_source=data.get("class_source"),
        )


def profile_size(ink_bins: int) -> int:
    """Length of a `profile_sums` vector."""
    return 2 + 2 * FEATURE_DIM + ink_bins + NUM_CLASSES


def profile_sums(x: np.ndarray, classes: np.ndarray | None, ink_bins: int) -> np.ndarray:
    """The sums a profile is made of, for one batch of (n, FEATURE_DIM) features:
    rows, non-zero pixels, per-pixel sums and sums of squares, ink histogram, class counts.
    Sums of batches add up to the sums of their union."""
    x = np.asarray(x)
    x = x if x.dtype in (np.float32, np.float64) else x.astype(np.float64)
    # Sums accumulate in float64 without a float64 copy of the batch (half the time).
    ink = x.mean(axis=1, dtype=np.float64) if len(x) else np.zeros(0)
    index = np.clip(np.floor(ink * ink_bins).astype(np.int64), 0, ink_bins - 1)
    class_counts = np.zeros(NUM_CLASSES)
    if classes is not None:
        classes = np.asarray(classes, np.int64)
        known = (classes >= 0) & (classes < NUM_CLASSES)
        class_counts = np.bincount(classes[known], minlength=NUM_CLASSES).astype(np.float64)
    return np.concatenate(
        [
            [len(x), np.count_nonzero(x > 0)],
            x.sum(axis=0, dtype=np.float64) if len(x) else np.zeros(FEATURE_DIM),
            np.square(x).sum(axis=0, dtype=np.float64) if len(x) else np.zeros(FEATURE_DIM),
            np.bincount(index, minlength=ink_bins).astype(np.float64),
            class_counts,
        ]
    )


def profile_from_sums(
    sums: np.ndarray, ink_bins: int, class_source: str | None = None
) -> DataProfile:
    """The profile of the rows whose `profile_sums` were added into `sums`."""
    sums = np.asarray(sums, np.float64)
    if len(sums) != profile_size(ink_bins):
        raise ValueError(f"{len(sums)} sums do not make a profile of {ink_bins} ink bins")
    rows, nonzero = sums[0], sums[1]
    total = sums[2 : 2 + FEATURE_DIM]
    squares = sums[2 + FEATURE_DIM : 2 + 2 * FEATURE_DIM]
    rest = sums[2 + 2 * FEATURE_DIM :]
    n = max(rows, 1.0)
    mean = total / n
    std = np.sqrt(np.maximum(squares / n - np.square(mean), 0.0))
    return DataProfile(
        rows=int(rows),
        pixel_mean=tuple(float(v) for v in mean),
        pixel_std=tuple(float(v) for v in std),
        ink_histogram=tuple(int(np.rint(v)) for v in rest[:ink_bins]),
        nonzero_share=float(nonzero / (n * FEATURE_DIM)),
        class_counts=tuple(int(np.rint(v)) for v in rest[ink_bins:]),
        class_source=class_source,
    )


def psi(expected: np.ndarray, actual: np.ndarray) -> float:
    """Population stability index of two histograms of counts over the same bins:
    sum of (a - e) * ln(a / e) over the bins' shares (an empty bin counts as 1e-4)."""
    e = np.asarray(expected, np.float64)
    a = np.asarray(actual, np.float64)
    if e.sum() <= 0 or a.sum() <= 0:
        return 0.0
    e = np.maximum(e / e.sum(), _EPSILON)
    a = np.maximum(a / a.sum(), _EPSILON)
    return float(np.sum((a - e) * np.log(a / e)))


@dataclass(frozen=True)
class Drift:
    """Distances of a scored dataset's profile to the training profile, and their verdict."""

    status: str
    ink_psi: float
    class_mix_psi: float | None  # None when either side has no classes
    pixel_mean_mad: float
    nonzero_share: tuple[float, float]  # training, scored
    ink_mean: tuple[float, float]  # training, scored
    checks: dict[str, str] = field(default_factory=dict)  # measure -> its own status

    def as_dict(self) -> dict:
        return {
            "status": self.status,
            "ink_psi": round(self.ink_psi, 6),
            "class_mix_psi": None if self.class_mix_psi is None else round(self.class_mix_psi, 6),
            "pixel_mean_mad": round(self.pixel_mean_mad, 6),
            "nonzero_share": {
                "training": round(self.nonzero_share[0], 6),
                "scored": round(self.nonzero_share[1], 6),
            },
            "ink_mean": {
                "training": round(self.ink_mean[0], 6),
                "scored": round(self.ink_mean[1], 6),
            },
            "checks": dict(self.checks),
        }

    def summary(self) -> str:
        """One console line."""
        classes = "n/a" if self.class_mix_psi is None else f"{self.class_mix_psi:.3f}"
        return (
            f"drift: {self.status} (ink PSI {self.ink_psi:.3f}, class-mix PSI {classes}, "
            f"pixel-mean difference {self.pixel_mean_mad:.4f})"
        )


def compare_profiles(training: DataProfile, scored: DataProfile, settings: DriftSettings) -> Drift:
    """The drift of `scored` from `training`, judged against `settings`' thresholds."""
    if len(training.ink_histogram) != len(scored.ink_histogram):
        raise ValueError(
            f"the training profile has {len(training.ink_histogram)} ink bins, the scored "
            f"one {len(scored.ink_histogram)}: profiles must be made with the same bins"
        )
    ink_psi = psi(training.ink_histogram, scored.ink_histogram)
    class_mix = (
        psi(training.class_counts, scored.class_counts)
        if sum(training.class_counts) and sum(scored.class_counts)
        else None
    )
    mad = float(np.mean(np.abs(training.mean_image() - scored.mean_image())))
    checks = {
        "ink_psi": _level(ink_psi, settings.psi_warn, settings.psi_alert),
        "pixel_mean_mad": _level(mad, settings.pixel_mean_warn, settings.pixel_mean_alert),
    }
    if class_mix is not None:
        checks["class_mix_psi"] = _level(class_mix, settings.psi_warn, settings.psi_alert)
    status = max(checks.values(), key=STATUSES.index)
    return Drift(
        status=status,
        ink_psi=ink_psi,
        class_mix_psi=class_mix,
        pixel_mean_mad=mad,
        nonzero_share=(training.nonzero_share, scored.nonzero_share),
        ink_mean=(training.ink_mean, scored.ink_mean),
        checks=checks,
    )


def _level(value: float, warn: float, alert: float) -> str:
    if not math.isfinite(value) or value > alert:
        return "alert"
    return "warn" if value > warn else "ok"
