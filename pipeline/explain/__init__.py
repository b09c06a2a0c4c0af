"""Why the model predicts what it does: integrated gradients and their checks.

`IntegratedGradients` attributes a class's probability to the pixels of each row
(`pipeline.explain.gradients`); `deletion_curves` checks that the attributions point at
the pixels the model relies on (`pipeline.explain.faithfulness`).
"""

from pipeline.explain.faithfulness import (
    DeletionCurves,
    curve_area,
    curves_from_sums,
    deletion_curves,
    deletion_drops,
)
from pipeline.explain.gradients import Attributions, IntegratedGradients

__all__ = [
    "Attributions",
    "DeletionCurves",
    "IntegratedGradients",
    "curve_area",
    "curves_from_sums",
    "deletion_curves",
    "deletion_drops",
]
