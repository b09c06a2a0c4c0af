"""What scoring watches beside its evaluation: calibration and drift, from one vector.

The executors add `batch_watch_sums` of every scored batch (the features they hold
anyway, the predictions, the labels when there are some) into one accumulator;
`watch_from_sums` turns the total into the calibration table, the profile of the
scored data and its drift from the training profile recorded in the model's metadata.
No row reaches the driver.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.config import ScoreSettings
from pipeline.monitoring.calibration import (
    Calibration,
    calibration_from_sums,
    calibration_sums,
)
from pipeline.monitoring.drift import (
    DataProfile,
    Drift,
    compare_profiles,
    profile_from_sums,
    profile_size,
    profile_sums,
)

CALIBRATION_PLOT = "_calibration.png"
DRIFT_PLOT = "_drift.png"


@dataclass(frozen=True)
class WatchShape:
    """Plain sizes the executors need to build the vector."""

    ink_bins: int
    calibration_bins: int

    @classmethod
    def of(cls, settings: ScoreSettings, training: DataProfile | None = None) -> WatchShape:
        """The sizes of `settings`; the ink bins of the training profile when there is one."""
        ink_bins = len(training.ink_histogram) if training else settings.drift.ink_bins
        return cls(ink_bins, settings.calibration_bins)

    @property
    def size(self) -> int:
        return profile_size(self.ink_bins) + 3 * self.calibration_bins


def batch_watch_sums(
    shape: WatchShape,
    x: np.ndarray,
    prediction: np.ndarray,
    confidence: np.ndarray,
    label: np.ndarray | None,
) -> np.ndarray:
    """The profile sums of a batch (classes: the predictions) and its calibration sums
    (rows with a label, -1 meaning none)."""
    profile = profile_sums(x, prediction, shape.ink_bins)
    if label is None:
        calibration = np.zeros(3 * shape.calibration_bins)
    else:
        known = label >= 0
        calibration = calibration_sums(
            confidence[known], prediction[known] == label[known], shape.calibration_bins
        )
    return np.concatenate([profile, calibration])


@dataclass(frozen=True)
class Watch:
    """Calibration (labelled input only), the scored data's profile and its drift."""

    profile: DataProfile
    calibration: Calibration | None
    drift: Drift | None  # None when the model has no training profile or drift is off
    temperature: float | None = None

    def as_dict(self) -> dict:
        return {
            "calibration": None
            if self.calibration is None
            else {**self.calibration.as_dict(), "temperature": self.temperature},
            "drift": None if self.drift is None else self.drift.as_dict(),
        }

    def files(self, training: DataProfile | None) -> dict[str, bytes]:
        """The PNGs by file name: reliability diagram and drift picture when they apply."""
        from pipeline.plots import drift_png, reliability_png

        files = {}
        if self.calibration is not None and self.calibration.rows:
            c = self.calibration
            files[CALIBRATION_PLOT] = reliability_png(
                c.mean_confidence, c.accuracy, c.counts, ece=c.ece, temperature=self.temperature
            )
        if self.drift is not None and training is not None:
            files[DRIFT_PLOT] = drift_png(
                training.mean_image(), self.profile.mean_image(), status=self.drift.status
            )
        return files


def watch_from_sums(
    sums: np.ndarray,
    shape: WatchShape,
    settings: ScoreSettings,
    training: DataProfile | None,
    labelled: bool,
    temperature: float | None = None,
) -> Watch:
    """Calibration, profile and drift from the added `batch_watch_sums` of every batch."""
    split = profile_size(shape.ink_bins)
    profile = profile_from_sums(sums[:split], shape.ink_bins, "prediction")
    calibration = calibration_from_sums(sums[split:]) if labelled else None
    drift = None
    if training is not None and settings.drift.enabled:
        drift = compare_profiles(training, profile, settings.drift)
    return Watch(profile, calibration, drift, temperature)
