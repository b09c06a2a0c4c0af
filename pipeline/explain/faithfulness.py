"""Deletion curves: do the pixels with the largest attributions matter most to the model?

For each share k of the pixels, the k·784 pixels with the largest attributions of a row
are set to the baseline value and the drop of the explained class's probability is
recorded; the same is done with k·784 pixels drawn at random. Attributions that capture
what the model uses drop the probability much faster than random pixels: the area under
the attribution curve is larger than the area under the random one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.contract import FEATURE_DIM


@dataclass(frozen=True)
class DeletionCurves:
    """Mean probability drops per share of pixels removed, over `rows` rows."""

    fractions: tuple[float, ...]
    attribution: tuple[float, ...]  # mean drop removing the top-attributed pixels
    random: tuple[float, ...]  # mean drop removing random pixels
    rows: int

    @property
    def attribution_area(self) -> float:
        return curve_area(self.fractions, self.attribution)

    @property
    def random_area(self) -> float:
        return curve_area(self.fractions, self.random)

    def as_dict(self) -> dict:
        return {
            "rows": self.rows,
            "fractions": list(self.fractions),
            "attribution_drop": [round(v, 6) for v in self.attribution],
            "random_drop": [round(v, 6) for v in self.random],
            "attribution_area": round(self.attribution_area, 6),
            "random_area": round(self.random_area, 6),
        }


def curve_area(fractions: Sequence[float], drops: Sequence[float]) -> float:
    """Trapezoid area under a deletion curve, divided by the range of shares covered:
    the mean drop over that range, in units of probability."""
    x = np.asarray(fractions, np.float64)
    y = np.asarray(drops, np.float64)
    width = x[-1] - x[0]
    if width <= 0:
        return float(y.mean()) if len(y) else 0.0
    return float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2.0 / width)


def deletion_drops(
    predict: Callable[[np.ndarray], np.ndarray],
    x: np.ndarray,
    attributions: np.ndarray,
    target: np.ndarray,
    fractions: Sequence[float],
    rng: np.random.Generator,
    baseline: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-row probability drops, (n, len(fractions)) for the attribution order and for a
    random order. `predict` maps (n, FEATURE_DIM) inputs to class probabilities."""
    n = len(x)
    rows = np.arange(n)
    if not n:
        empty = np.zeros((0, len(fractions)), np.float64)
        return empty, empty
    x = np.asarray(x, np.float32)
    before = predict(x)[rows, target].astype(np.float64)
    by_attribution = np.argsort(-attributions, axis=1, kind="stable")
    at_random = np.argsort(rng.random((n, FEATURE_DIM)), axis=1)
    drops = []
    for order in (by_attribution, at_random):
        curve = np.empty((n, len(fractions)), np.float64)
        for j, share in enumerate(fractions):
            k = int(np.rint(share * FEATURE_DIM))
            removed = x.copy()
            if k:
                np.put_along_axis(removed, order[:, :k], baseline, axis=1)
            curve[:, j] = before - predict(removed)[rows, target]
        drops.append(curve)
    return drops[0], drops[1]


def deletion_curves(
    predict: Callable[[np.ndarray], np.ndarray],
    x: np.ndarray,
    attributions: np.ndarray,
    target: np.ndarray,
    fractions: Sequence[float],
    seed: int = 0,
    baseline: float = 0.0,
) -> DeletionCurves:
    """The mean deletion curves of the rows of `x` (see `deletion_drops`)."""
    by_attribution, at_random = deletion_drops(
        predict, x, attributions, target, fractions, np.random.default_rng(seed), baseline
    )
    return curves_from_sums(
        fractions, by_attribution.sum(axis=0), at_random.sum(axis=0), len(by_attribution)
    )


def curves_from_sums(
    fractions: Sequence[float], attribution_sums, random_sums, rows: int
) -> DeletionCurves:
    """Mean curves from per-share sums of drops over `rows` rows (summed across tasks)."""
    scale = 1.0 / rows if rows else 0.0
    return DeletionCurves(
        fractions=tuple(float(f) for f in fractions),
        attribution=tuple(float(v) * scale for v in attribution_sums),
        random=tuple(float(v) * scale for v in random_sums),
        rows=int(rows),
    )
