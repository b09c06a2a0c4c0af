"""The search space: what a trial may vary, and how a sampled point becomes train settings.

``tune.space`` maps train settings (``section.field`` for a nested one) to a list of
candidates or a numeric range. `suggest` asks an Optuna trial for one point of it;
`trial_settings` lays that point over the train section every trial starts from (one
worker, the tune section's epochs, validation split and early stopping) and validates it.
Pure functions: nothing here trains or touches Spark.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import TypeAdapter

from pipeline.config import SearchRange, TrainSettings, TuneSettings, train_setting

if TYPE_CHECKING:
    import optuna

__all__ = [
    "Trial",
    "grid_choices",
    "reference_trial",
    "suggest",
    "trial_base",
    "trial_settings",
]

REFERENCE_NAME = "ref"


@dataclass(frozen=True)
class Trial:
    """One point of the search: the train settings it overrides, and all of them.

    The reference (the train section unchanged) is a trial too, numbered -1.
    """

    number: int
    params: dict[str, Any]
    settings: TrainSettings
    reference: bool = False

    @property
    def name(self) -> str:
        """``NNN`` (its folder under ``TUNE_DIR/trials/``), or ``ref`` for the reference."""
        return REFERENCE_NAME if self.reference else f"{self.number:03d}"

    @property
    def structure(self) -> str:
        """Hidden layers and activation, e.g. ``64-32 relu``."""
        units = "-".join(str(u) for u in self.settings.hidden_units)
        activations = self.settings.activations()
        names = activations[0] if len(set(activations)) == 1 else "/".join(activations)
        return f"{units} {names}"


def trial_base(train: TrainSettings, tune: TuneSettings) -> dict[str, Any]:
    """The train section every trial starts from: one worker, the tune section's epochs,
    validation split and early stopping; never a split ingest output's split=validation
    rows (only the final model trains on them)."""
    return {
        **train.model_dump(mode="json"),
        "workers": 1,
        "epochs": tune.epochs,
        "validation_fraction": tune.validation_fraction,
        "validation_path": None,
        "include_validation_split": False,
        "early_stopping": tune.early_stopping.model_dump(mode="json"),
    }


def trial_settings(base: Mapping[str, Any], params: Mapping[str, Any]) -> TrainSettings:
    """`params` (``key`` or ``section.field`` -> value) over `base`, validated.

    Raises pydantic's `ValidationError` for values train settings reject together (an
    activation list that does not match the layers).
    """
    merged = copy.deepcopy(dict(base))
    for key, value in params.items():
        *sections, field = key.split(".")
        target = merged
        for section in sections:
            target = target.setdefault(section, {})
        target[field] = value
    return TrainSettings.model_validate(merged)


def reference_trial(train: TrainSettings, tune: TuneSettings) -> Trial:
    """The train section unchanged, judged the way every trial is."""
    return Trial(-1, {}, trial_settings(trial_base(train, tune), {}), reference=True)


def suggest(trial: optuna.Trial, space: Mapping[str, list[Any] | SearchRange]) -> dict[str, Any]:
    """One point of `space`, drawn by `trial`'s sampler: setting -> value."""
    params: dict[str, Any] = {}
    for key, spec in space.items():
        if isinstance(spec, SearchRange):
            if _integer(key):
                params[key] = trial.suggest_int(
                    key, round(spec.low), round(spec.high), step=round(spec.step or 1), log=spec.log
                )
            else:
                params[key] = trial.suggest_float(
                    key, spec.low, spec.high, step=spec.step, log=spec.log
                )
        else:
            labels = [_label(candidate) for candidate in spec]
            chosen = trial.suggest_categorical(key, labels)
            params[key] = spec[labels.index(chosen)]
    return params


def grid_choices(space: Mapping[str, list[Any] | SearchRange]) -> dict[str, list[Any]]:
    """The space as Optuna's grid sampler takes it (every entry a candidate list)."""
    return {key: [_label(c) for c in spec] for key, spec in space.items()}  # type: ignore[union-attr]


def grid_size(space: Mapping[str, list[Any] | SearchRange]) -> int | None:
    """Combinations in a space of candidate lists; None when it holds a range."""
    size = 1
    for spec in space.values():
        if isinstance(spec, SearchRange):
            return None
        size *= len(spec)
    return size


def _label(candidate: Any) -> Any:
    """Optuna's categorical choices are scalars: a list candidate goes in as its JSON."""
    return json.dumps(candidate) if isinstance(candidate, (list, dict)) else candidate


def _integer(key: str) -> bool:
    return TypeAdapter(train_setting(key)).json_schema().get("type") == "integer"
