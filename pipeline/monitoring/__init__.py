"""Watching a model in use: calibration of its confidence and drift of its input data.

`pipeline.monitoring.calibration`: expected calibration error and temperature scaling.
`pipeline.monitoring.drift`: data profiles and their distances to the training profile.
Both work from sums that Spark or the executors aggregate: no rows reach the driver.
"""

from pipeline.monitoring.calibration import (
    Calibration,
    apply_temperature,
    calibration_from_sums,
    calibration_sums,
    calibration_sums_of,
    fit_temperature,
)
from pipeline.monitoring.drift import (
    DataProfile,
    Drift,
    compare_profiles,
    profile_from_sums,
    profile_sums,
    psi,
)

__all__ = [
    "Calibration",
    "DataProfile",
    "Drift",
    "apply_temperature",
    "calibration_from_sums",
    "calibration_sums",
    "calibration_sums_of",
    "compare_profiles",
    "fit_temperature",
    "profile_from_sums",
    "profile_sums",
    "psi",
]
