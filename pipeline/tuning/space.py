"""The search space as pure functions: candidates -> combinations -> validated trials.

``tune.space`` maps train settings to candidate values. `grid` and `sample` expand it into
combinations; `plan_trials` turns those into `Trial`s whose `TrainSettings` are validated,
distinct and set up the way every trial is judged (one worker, the tune section's epochs,
validation split and early stopping).
"""

from __future__ import annotations

import itertools
import logging
import math
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from pipeline.config import TrainSettings, TuneSettings
from pipeline.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["Trial", "grid", "plan_trials", "sample", "trial_base"]

_SHUFFLE_LIMIT = 100_000  # combinations shuffled outright; above it, sampled by rejection


@dataclass(frozen=True)
class Trial:
    """One point of the search: the train settings it overrides, and all of them."""

    number: int
    params: dict[str, Any]
    settings: TrainSettings
    reference: bool = False

    @property
    def name(self) -> str:
        """``NNN``: the trial's folder under ``TUNE_DIR/trials/``."""
        return f"{self.number:03d}"

    @property
    def structure(self) -> str:
        """Hidden layers and activation, e.g. ``64-32 relu``."""
        units = "-".join(str(u) for u in self.settings.hidden_units)
        activations = self.settings.activations()
        names = activations[0] if len(set(activations)) == 1 else "/".join(activations)
        return f"{units} {names}"


def grid(space: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every combination of the candidates, the first key varying slowest."""
    keys = list(space)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*space.values())]


def sample(space: Mapping[str, Sequence[Any]], count: int, seed: int) -> list[dict[str, Any]]:
    """`count` distinct combinations drawn at random without replacement (fewer if the
    space holds fewer). The same seed gives the same draws in the same order."""
    return list(itertools.islice(_random_combinations(space, seed), count))


def _random_combinations(space: Mapping[str, Sequence[Any]], seed: int) -> Iterator[dict]:
    keys = list(space)
    sizes = [len(space[k]) for k in keys]
    total = math.prod(sizes)
    rng = random.Random(seed)
    if total <= _SHUFFLE_LIMIT:
        order: Iterator[int] = iter(rng.sample(range(total), total))
    else:
        order = _distinct_randrange(rng, total)
    for index in order:
        combination = {}
        for key, size in zip(reversed(keys), reversed(sizes), strict=True):
            index, position = divmod(index, size)
            combination[key] = space[key][position]
        yield {k: combination[k] for k in keys}


def _distinct_randrange(rng: random.Random, total: int) -> Iterator[int]:
    seen: set[int] = set()
    while len(seen) < total:
        index = rng.randrange(total)
        if index not in seen:
            seen.add(index)
            yield index


def trial_base(train: TrainSettings, tune: TuneSettings) -> dict[str, Any]:
    """The train section every trial starts from: one worker, the tune section's epochs,
    validation split and early stopping."""
    return {
        **train.model_dump(mode="json"),
        "workers": 1,
        "epochs": tune.epochs,
        "validation_fraction": tune.validation_fraction,
        "validation_path": None,
        "early_stopping": tune.early_stopping.model_dump(mode="json"),
    }


def plan_trials(train: TrainSettings, tune: TuneSettings) -> list[Trial]:
    """The trials of a search, numbered from 0, each with validated, distinct settings.

    Trial 0 is the train section unchanged when ``tune.include_reference``. Combinations
    that `TrainSettings` rejects together (an activation list that does not match the
    layers) and combinations equal to an earlier trial are skipped; the random strategy
    draws further ones in their place, up to ``tune.trials`` in all.
    """
    base = trial_base(train, tune)
    if tune.strategy == "grid":
        combinations: Iterator[dict[str, Any]] = iter(grid(tune.space))
        budget = None
    else:
        combinations = _random_combinations(tune.space, tune.seed)
        budget = tune.trials
    trials: list[Trial] = []
    seen: set[str] = set()

    def add(params: dict[str, Any], reference: bool) -> None:
        settings = TrainSettings.model_validate({**base, **params})
        key = settings.model_dump_json()
        if key not in seen:
            seen.add(key)
            trials.append(Trial(len(trials), params, settings, reference))

    if tune.include_reference:
        add({}, reference=True)
    skipped = 0
    for params in combinations:
        if budget is not None and len(trials) >= budget:
            break
        try:
            add(params, reference=False)
        except ValidationError as exc:
            skipped += 1
            log.debug("skipping %s: %s", params, exc.errors()[0]["msg"])
    if skipped:
        log.info("skipped %d combinations that train settings reject together", skipped)
    if not trials:
        raise ConfigError("tune.space yields no valid combination of train settings")
    return trials
