"""One configuration schema for every job, validated when it is loaded.

Values are layered, later layers winning key by key:

1. the defaults below (also written out, with comments, in ``conf/base.yaml``);
2. ``conf/base.yaml`` and ``conf/local.yaml`` (the latter ignored by git) when present;
3. each ``--conf FILE`` in the order given;
4. each ``--set key.path=value`` in the order given (values are parsed as YAML).

An unknown key, a wrong type or an out-of-range value raises `ConfigError` naming
the key and what is allowed, before any Spark work starts.
"""

from __future__ import annotations

import copy
import importlib.util
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from pipeline.contract import PIXEL_COLUMN_PREFIX
from pipeline.errors import ConfigError, EnvironmentProblem

BASE_FILE = "base.yaml"
LOCAL_FILE = "local.yaml"
# Mappings that a later layer replaces whole instead of merging key by key.
_REPLACED = ("conf", "space")


# Keys renamed in a section, old -> new; the old name works, with a warning, for one release.
_RENAMES = {"train": {"collective_timeout_s": "stall_timeout_s"}}


def _renamed(section: Mapping[str, Any], name: str) -> dict[str, Any]:
    """`section` (of the config section `name`) with old key names replaced by new ones."""
    section = dict(section)
    for old, new in _RENAMES.get(name, {}).items():
        if old in section:
            warnings.warn(
                f"{name}.{old} is deprecated and will be removed in the next release: "
                f"set {name}.{new} instead",
                FutureWarning,
                stacklevel=2,
            )
            section[new] = section.pop(old)
    return section


def _renamed_layer(layer: Mapping[str, Any]) -> dict[str, Any]:
    """One config layer with old key names replaced, before it is merged over the others."""
    return {
        key: _renamed(value, key) if key in _RENAMES and isinstance(value, Mapping) else value
        for key, value in layer.items()
    }


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class SparkSettings(_Section):
    """How a job builds its SparkSession when spark-submit did not already decide."""

    master: str = Field("local[*]", description="used only when spark-submit set no --master")
    app_name: str = "digits-pipeline"
    log_level: Literal["ERROR", "WARN", "INFO", "DEBUG"] = "WARN"
    show_progress: bool = True
    conf: dict[str, str] = Field(
        default_factory=dict,
        description="extra Spark properties, applied only where spark-submit set none",
    )


class SplitSettings(_Section):
    """Deterministic train/validation/test split written by ingest as a `split` column."""

    enabled: bool = False
    by: Literal["id", "row"] = Field(
        "row", description="hash the id columns, or the row's label and pixels"
    )
    train: float = Field(0.8, ge=0, le=1)
    validation: float = Field(0.1, ge=0, le=1)
    test: float = Field(0.1, ge=0, le=1)
    seed: int = 42

    @model_validator(mode="after")
    def _fractions_sum_to_one(self) -> SplitSettings:
        total = self.train + self.validation + self.test
        if abs(total - 1.0) > 1e-9:
            raise ValueError(
                f"train + validation + test must add up to 1, they add up to {total:g}"
            )
        return self


class IngestSettings(_Section):
    """How raw input is read and validated. Scoring applies the same settings to raw input."""

    format: Literal["auto", "parquet", "csv"] = Field(
        "auto", description="auto: CSV for a .csv file or a directory of them, else Parquet"
    )
    layout: Literal["auto", "image", "array", "columns"] = "auto"
    label_column: str = "label"
    image_column: str | None = Field(None, description="auto: the struct<bytes> or binary column")
    array_column: str | None = Field(None, description="auto: the one numeric array column")
    pixel_column_prefix: str = PIXEL_COLUMN_PREFIX
    pixel_max: float | None = Field(
        None, gt=0, description="scale of array/column pixels; auto: 255 for integers, 1 for floats"
    )
    id_columns: list[str] | None = Field(
        None, description="auto: the columns named id or row_id; none: a row_id is added"
    )
    resize: Literal["nearest", "box", "bilinear", "hamming", "bicubic", "lanczos"] | None = Field(
        None, description="resize images of another size to 28x28 with this Pillow filter"
    )
    max_reject_fraction: float = Field(0.05, ge=0, le=1)
    max_rows_per_file: int = Field(100_000, ge=1)
    split: SplitSettings = SplitSettings()


class EarlyStoppingSettings(_Section):
    enabled: bool = False
    monitor: Literal["val_loss", "val_accuracy"] = "val_loss"
    patience: int = Field(2, ge=1)
    restore_best_weights: bool = True


class AugmentSettings(_Section):
    """Random affine transforms of each training batch (never validation or scoring)."""

    enabled: bool = False
    max_rotation: float = Field(14.0, ge=0, le=90, description="degrees, either way")
    max_shift: float = Field(2.0, ge=0, le=14, description="pixels, each direction")
    max_scale_change: float = Field(0.08, ge=0, lt=0.5, description="scale in [1 - s, 1 + s]")
    max_shear: float = Field(15.0, ge=0, le=45, description="degrees, either way")


Activation = Literal[
    "relu", "tanh", "sigmoid", "elu", "selu", "gelu", "swish", "softplus", "linear"
]


class TrainSettings(_Section):
    """The model and how it is trained. The defaults are the reference model."""

    hidden_units: list[int] = Field(default_factory=lambda: [32], min_length=1)
    activation: Activation | list[Activation] = "relu"
    learning_rate: float = Field(0.01, gt=0)
    decay: float = Field(1e-6, ge=0, description="time-based decay: lr / (1 + decay * step)")
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    batch_size: int = Field(32, ge=1, description="per worker")
    epochs: int = Field(10, ge=1)
    seed: int = 42
    l2: float = Field(0.0, ge=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    shuffle_buffer: int = Field(10_000, ge=0, description="0 turns shuffling off")
    steps_per_call: int = Field(100, ge=1, description="training steps fused into one call")
    jit_compile: bool = Field(
        True,
        description="compile the fused training steps with XLA (one worker and "
        "sync=local_sgd); sync=exact runs without it: TensorFlow cannot compile its "
        "all-reduce on CPU",
    )
    workers: int = Field(1, ge=1)
    sync: Literal["exact", "local_sgd"] = Field(
        "local_sgd",
        description="several workers: local_sgd averages the weights every average_every "
        "steps (faster, same held-out accuracy on the benchmark); exact all-reduces every "
        "step (N workers at batch b = one at batch N*b, several times slower on CPU)",
    )
    average_every: int = Field(
        200,
        ge=1,
        description="steps between averages when sync=local_sgd (each average waits on the "
        "slowest worker: on 2 cores 100 ran at 1.1-1.2x one worker, 200 at about 1.3x)",
    )
    scale_learning_rate: bool = Field(
        True,
        description="sync=local_sgd: each worker steps at learning_rate x workers (an average "
        "of N models moves the weights 1/N as far per sample; on the benchmark's held-out "
        "digits 2 workers came 0.11 points below one worker on average over 6 seeds, 0.32 "
        "without); exact keeps learning_rate",
    )
    validation_fraction: float = Field(0.0, ge=0, lt=1)
    validation_path: str | None = None
    include_validation_split: bool = Field(
        False,
        description="a split ingest output: train on its split=validation rows too (a final "
        "model whose settings are chosen); validation then only from validation_fraction or "
        "validation_path",
    )
    early_stopping: EarlyStoppingSettings = EarlyStoppingSettings()
    overfit_patience: int = Field(
        3,
        ge=0,
        description="warn when validation loss rose this many epochs in a row while "
        "training loss fell (0: never)",
    )
    augment: AugmentSettings = AugmentSettings()
    memory_budget_mb: int = Field(
        1024, ge=0, description="per worker: keep the partition in memory up to this, else spill"
    )
    checkpoint_every: int | str = Field(
        1,
        description="epochs between checkpoints (2) or seconds ('60s'); the last epoch always "
        "has one",
    )
    stall_timeout_s: float = Field(
        300.0,
        gt=0,
        description="several workers: one that makes no progress for this long (waiting on a "
        "stalled peer) fails the job",
    )
    tensorboard: bool = False
    calibrate: bool = Field(
        False, description="fit a softmax temperature on the validation data; scoring applies it"
    )

    @model_validator(mode="before")
    @classmethod
    def _renamed_keys(cls, data: Any) -> Any:
        return _renamed(data, "train") if isinstance(data, Mapping) else data

    @model_validator(mode="after")
    def _activations_match_layers(self) -> TrainSettings:
        if isinstance(self.activation, list) and len(self.activation) != len(self.hidden_units):
            raise ValueError(
                f"activation lists {len(self.activation)} entries for "
                f"{len(self.hidden_units)} hidden layers; give one per layer or a single name"
            )
        if any(units < 1 for units in self.hidden_units):
            raise ValueError("hidden_units must all be at least 1")
        return self

    @field_validator("checkpoint_every")
    @classmethod
    def _checkpoint_interval(cls, value: int | str) -> int | str:
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value
        if isinstance(value, str):
            text = value.strip()
            if text.isdigit() and int(text) >= 1:
                return int(text)
            number = text[:-1] if text.endswith("s") else ""
            if number.replace(".", "", 1).isdigit() and float(number) > 0:
                return text
        raise ValueError("give epochs (an integer of at least 1, e.g. 2) or seconds (e.g. '60s')")

    def checkpoint_interval(self) -> tuple[int, float]:
        """(epochs, seconds) between checkpoints: one of them is 0 (not used)."""
        if isinstance(self.checkpoint_every, int):
            return self.checkpoint_every, 0.0
        return 0, float(self.checkpoint_every[:-1])

    def sync_mode(self) -> Literal["single", "exact", "local_sgd"]:
        """How the workers keep in step: ``single`` for one worker, else `sync`."""
        return "single" if self.workers == 1 else self.sync

    def worker_learning_rate(self) -> float:
        """The learning rate each worker's optimizer starts from: `learning_rate`, times
        the workers under local SGD when `scale_learning_rate` (the linear scaling rule:
        averaging N workers' weights averages their steps)."""
        if self.scale_learning_rate and self.sync_mode() == "local_sgd":
            return self.learning_rate * self.workers
        return self.learning_rate

    def compiles_with_xla(self) -> bool:
        """Whether the training steps run XLA-compiled: `jit_compile`, except under exact
        sync, whose all-reduce inside the loop TensorFlow cannot compile on CPU."""
        return self.jit_compile and self.sync_mode() != "exact"

    def activations(self) -> list[str]:
        if isinstance(self.activation, str):
            return [self.activation] * len(self.hidden_units)
        return list(self.activation)


class DriftSettings(_Section):
    """How far the scored data may move from the training data's profile."""

    enabled: bool = True
    ink_bins: int = Field(
        20, ge=2, le=200, description="equal-width bins of mean intensity over [0, 1]"
    )
    psi_warn: float = Field(0.1, gt=0, description="population stability index: warn above")
    psi_alert: float = Field(0.25, gt=0, description="population stability index: alert above")
    pixel_mean_warn: float = Field(
        0.02, gt=0, description="mean absolute difference of per-pixel means: warn above"
    )
    pixel_mean_alert: float = Field(
        0.05, gt=0, description="mean absolute difference of per-pixel means: alert above"
    )

    @model_validator(mode="after")
    def _alert_above_warn(self) -> DriftSettings:
        for name in ("psi", "pixel_mean"):
            warn, alert = getattr(self, f"{name}_warn"), getattr(self, f"{name}_alert")
            if alert < warn:
                raise ValueError(
                    f"{name}_alert ({alert:g}) must be at least {name}_warn ({warn:g})"
                )
        return self


class ScoreSettings(_Section):
    """Batch scoring and the evaluation of its predictions."""

    batch_size: int = Field(
        8192, ge=1, description="rows per Arrow batch handed to the model (one inference call)"
    )
    confidence_threshold: float = Field(
        0.5, ge=0, le=1, description="rows below it are counted as low-confidence"
    )
    confidence_bins: int = Field(
        10, ge=1, le=100, description="bins of the confidence histogram over [0, 1]"
    )
    max_reject_fraction: float = Field(0.05, ge=0, le=1)
    max_rows_per_file: int = Field(500_000, ge=1)
    ingested_reader: Literal["files", "spark"] = Field(
        "files",
        description="ingest outputs: executors read the Parquet files (files) or Spark does",
    )
    calibration_bins: int = Field(
        15, ge=2, le=100, description="equal-width confidence bins of the calibration error"
    )
    drift: DriftSettings = DriftSettings()


class ExplainSettings(_Section):
    """Integrated-gradients explanations (jobs/explain.py) and their checks."""

    target: Literal["predicted", "label"] = Field(
        "predicted", description="explain the predicted class's probability, or the true class's"
    )
    steps: int = Field(32, ge=1, le=1024, description="midpoint-rule steps along the path")
    baseline: float = Field(
        0.0, ge=0, le=1, description="pixel value of the baseline image (0: black)"
    )
    store_attributions: bool = Field(
        True, description="write all 784 attributions a row; false: only top_pixels"
    )
    top_pixels: int = Field(20, ge=1, le=784, description="pixels kept a row without attributions")
    batch_size: int = Field(1024, ge=1, description="rows per Arrow batch handed to the explainer")
    faithfulness_rows: int = Field(
        1000, ge=0, description="rows (spread over the tasks) that get deletion curves"
    )
    deletion_fractions: list[float] = Field(
        default_factory=lambda: [0.0, 0.02, 0.05, 0.1, 0.2, 0.3],
        min_length=2,
        description="shares of the pixels removed, the deletion curve's x values",
    )
    error_examples: int = Field(
        16, ge=0, le=100, description="most confident errors drawn in _errors.png"
    )
    seed: int = Field(0, description="seed of the random pixels of the deletion baseline")

    @field_validator("deletion_fractions")
    @classmethod
    def _fractions_rise_within_one(cls, fractions: list[float]) -> list[float]:
        if any(not 0 <= f <= 1 for f in fractions) or fractions != sorted(set(fractions)):
            raise ValueError("must be distinct shares in [0, 1], in increasing order")
        return fractions


class GenerateSettings(_Section):
    """Scale data made by augmenting the embedded sample (jobs/generate.py)."""

    layout: Literal["image", "array", "columns"] = "image"
    seed: int = 0
    rows_per_file: int = Field(250_000, ge=1, description="rows per output Parquet file")
    min_rows_per_task: int = Field(
        10_000, ge=1, description="below this many rows per task, use fewer tasks"
    )
    max_shift: float = Field(3.0, ge=0, le=10, description="pixels, each direction")
    max_rotation: float = Field(12.0, ge=0, le=90, description="degrees, either way")
    max_scale_change: float = Field(0.1, ge=0, lt=0.5, description="scale in [1 - s, 1 + s]")
    thicker_probability: float = Field(0.2, ge=0, le=1)
    thinner_probability: float = Field(0.1, ge=0, le=1)
    noise_probability: float = Field(0.5, ge=0, le=1)
    max_noise: float = Field(20.0, ge=0, le=255, description="grey levels, uniform +-level")

    @model_validator(mode="after")
    def _stroke_probabilities(self) -> GenerateSettings:
        if self.thicker_probability + self.thinner_probability > 1:
            raise ValueError("thicker_probability + thinner_probability must be at most 1")
        return self


# Train settings a search may not vary: each trial is one worker judged on a validation
# split that the tune section itself sets, and train.seed also picks the validation rows.
_UNTUNABLE = {
    "workers",
    "validation_fraction",
    "validation_path",
    "include_validation_split",
    "early_stopping",
    "seed",
}


def _default_space() -> dict[str, Any]:
    """Wide MLPs with dropout, augmentation and a decaying learning rate, the family that
    does best on a few thousand 784-pixel digits; documented entry by entry in
    ``conf/search-space.yaml`` (the same space)."""
    return {
        "hidden_units": [[256], [512], [1024], [512, 256]],
        "activation": ["relu", "gelu"],
        "dropout": {"low": 0.1, "high": 0.5},
        "learning_rate": {"low": 0.01, "high": 0.1, "log": True},
        "decay": {"low": 1e-5, "high": 1e-3, "log": True},
        "batch_size": [32, 64, 128],
        "augment.enabled": [True],
        "augment.max_rotation": {"low": 6.0, "high": 18.0},
        "augment.max_shear": [0.0, 15.0],
    }


class SearchRange(_Section):
    """Numbers from `low` to `high` (inclusive) for the tpe and random strategies: whole
    numbers for an integer setting, on a log scale with `log`, in steps of `step` if set."""

    low: float
    high: float
    log: bool = False
    step: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> SearchRange:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low:g}) must be below high ({self.high:g})")
        if self.log and self.low <= 0:
            raise ValueError("a log range needs low > 0")
        if self.log and self.step is not None:
            raise ValueError("give log or step, not both")
        return self


def train_setting(key: str) -> Any:
    """The type annotation (with its constraints) of the train setting `key`, which may
    name a field of a nested section with dots (``augment.rotation``); None if unknown."""
    model: type[BaseModel] = TrainSettings
    parts = key.split(".")
    for i, part in enumerate(parts):
        info = model.model_fields.get(part)
        if info is None:
            return None
        annotation = info.annotation
        if i == len(parts) - 1:
            return Annotated[(annotation, *info.metadata)] if info.metadata else annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return None


class TuneSettings(_Section):
    """Structure search (jobs/tune.py): an Optuna study, its winner confirmed with seeds.

    Each trial trains one point of `space` as its own one-task Spark job; the best
    `confirm_top` trials and the reference are then retrained with `confirm_seeds` seeds.
    """

    strategy: Literal["tpe", "random", "grid"] = Field(
        "tpe", description="tpe: Optuna's TPE; random; grid: every combination of the lists"
    )
    trials: int = Field(60, ge=1, description="most trials in the study (resumed runs count)")
    budget_minutes: float | None = Field(
        18.0,
        gt=0,
        description="wall clock for search and confirmation; new trials stop when the rest "
        "is needed to confirm",
    )
    seed: int = Field(0, description="seed of the sampler")
    parallelism: int | None = Field(
        None, ge=1, description="trials at once; default: the free task slots, capped by trials"
    )
    epochs: int = Field(40, ge=1, description="per trial, unless the space varies epochs")
    validation_fraction: float = Field(0.2, gt=0, lt=1)
    early_stopping: EarlyStoppingSettings = EarlyStoppingSettings(
        enabled=True, monitor="val_accuracy", patience=8
    )
    pruner: Literal["median", "halving", "none"] = Field(
        "median", description="stop trials whose validation accuracy trails the others"
    )
    prune_warmup_epochs: int = Field(
        10,
        ge=0,
        description="epochs a trial runs before pruning (wide, regularised networks start "
        "slower and overtake later)",
    )
    prune_startup_trials: int = Field(4, ge=0, description="finished trials before any pruning")
    confirm_top: int = Field(2, ge=1, description="best trials retrained with confirm_seeds seeds")
    confirm_seeds: int = Field(3, ge=2, description="seeds per confirmed trial and the reference")
    final_epochs: int | None = Field(
        60,
        ge=1,
        description="epochs of the winner's final model in best.yaml; null: the median epoch "
        "its confirmation runs kept (early stopping on the search's small validation split "
        "stops augmented, regularised networks long before they stop improving)",
    )
    space: dict[str, list[Any] | SearchRange] = Field(
        default_factory=_default_space,
        description="train setting -> candidate list, or {low, high, log, step}",
    )

    @field_validator("space")
    @classmethod
    def _space_holds_train_settings(
        cls, space: dict[str, list[Any] | SearchRange]
    ) -> dict[str, list[Any] | SearchRange]:
        """Candidates validated (and coerced) one by one, duplicates dropped, order kept;
        a range's ends validated as values of the setting."""
        checked: dict[str, list[Any] | SearchRange] = {}
        for key, candidates in space.items():
            annotation = train_setting(key)
            if annotation is None or key.split(".")[0] in _UNTUNABLE:
                allowed = sorted(set(TrainSettings.model_fields) - _UNTUNABLE)
                raise ValueError(
                    f"tune.space.{key} is not a train setting a search can vary; "
                    f"allowed: {', '.join(allowed)} (fields of a section as section.field)"
                )
            adapter = TypeAdapter(annotation)
            if isinstance(candidates, SearchRange):
                for end in (candidates.low, candidates.high):
                    _candidate(adapter, key, end, "range end")
                if not _numeric(adapter):
                    raise ValueError(f"tune.space.{key} is not numeric: list its candidates")
                checked[key] = candidates
                continue
            if not candidates:
                raise ValueError(f"tune.space.{key} lists no candidate values")
            values: list[Any] = []
            for candidate in candidates:
                value = _candidate(adapter, key, candidate, "candidate")
                if value not in values:
                    values.append(value)
            checked[key] = values
        return checked

    @model_validator(mode="after")
    def _grid_needs_lists(self) -> TuneSettings:
        if self.strategy == "grid":
            ranges = [key for key, spec in self.space.items() if isinstance(spec, SearchRange)]
            if ranges:
                raise ValueError(
                    f"tune.strategy grid needs candidate lists; {', '.join(ranges)} "
                    "given as ranges: list their candidates, or use strategy tpe or random"
                )
        return self


def _candidate(adapter: TypeAdapter, key: str, candidate: Any, what: str) -> Any:
    try:
        return adapter.validate_python(candidate)
    except ValidationError as exc:
        reason = exc.errors()[0]["msg"]
        raise ValueError(
            f"tune.space.{key}: {what} {candidate!r} is not a valid train.{key}: {reason}"
        ) from None


def _numeric(adapter: TypeAdapter) -> bool:
    return adapter.json_schema().get("type") in ("integer", "number")


class TrackingSettings(_Section):
    """Experiment tracking in MLflow (optional: pip install 'digits-pipeline[tracking]')."""

    enabled: bool = False
    uri: str = Field(
        "sqlite:///mlflow.db",
        description="MLflow tracking URI; a relative sqlite: or file: path is taken from the "
        "working directory (mlflow ui there opens the default store)",
    )
    experiment: str = Field("digits-pipeline", min_length=1)
    register_as: str | None = Field(
        None,
        min_length=1,
        description="register each trained model as a new version of this name in the "
        "store's model registry",
    )

    @field_validator("enabled")
    @classmethod
    def _mlflow_installed(cls, enabled: bool) -> bool:
        if enabled and importlib.util.find_spec("mlflow") is None:
            # A missing package is an environment problem (exit 3), as in pipeline.tracking;
            # pydantic passes exceptions other than ValueError through unchanged.
            raise EnvironmentProblem(
                "tracking.enabled is true but MLflow is not installed: "
                "pip install 'digits-pipeline[tracking]', or set tracking.enabled=false"
            )
        return enabled


class Config(_Section):
    """The whole configuration shared by every job."""

    spark: SparkSettings = SparkSettings()
    ingest: IngestSettings = IngestSettings()
    train: TrainSettings = TrainSettings()
    score: ScoreSettings = ScoreSettings()
    generate: GenerateSettings = GenerateSettings()
    tune: TuneSettings = TuneSettings()
    explain: ExplainSettings = ExplainSettings()
    tracking: TrackingSettings = TrackingSettings()

    def with_overrides(self, overrides: Mapping[str, Any]) -> Config:
        """A copy with nested overrides applied and validated again."""
        return _validate(
            _deep_merge(self.model_dump(), _renamed_layer(overrides)), source="overrides"
        )


def load_config(
    conf_dir: str | Path | None = None,
    files: Sequence[str | Path] = (),
    overrides: Iterable[str] = (),
) -> Config:
    """Build the validated config from the layers described in the module docstring."""
    layers: list[tuple[str, dict[str, Any]]] = []
    if conf_dir is not None:
        for name in (BASE_FILE, LOCAL_FILE):
            path = Path(conf_dir) / name
            if path.is_file():
                layers.append((str(path), _read_yaml(path)))
    for file in files:
        path = Path(file)
        if not path.is_file():
            raise ConfigError(f"--conf {file}: no such file")
        layers.append((str(path), _read_yaml(path)))
    for item in overrides:
        layers.append((f"--set {item}", parse_override(item)))

    merged: dict[str, Any] = {}
    for _source, layer in layers:
        merged = _deep_merge(merged, _renamed_layer(layer))
    sources = ", ".join(source for source, _ in layers) or "defaults"
    return _validate(merged, source=sources)


def parse_override(item: str) -> dict[str, Any]:
    """Turn ``a.b.c=value`` into ``{"a": {"b": {"c": value}}}``, the value parsed as YAML."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item!r}: expected key.path=value, e.g. train.epochs=5")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {item!r}: the value is not valid YAML ({exc})") from exc
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, found {type(data).__name__}")
    return data


def _deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(dict(base))
    for key, value in update.items():
        nested = isinstance(value, Mapping) and isinstance(merged.get(key), Mapping)
        if nested and key not in _REPLACED:
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _validate(data: Mapping[str, Any], source: str) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None


def _describe(exc: ValidationError, source: str) -> str:
    problems = []
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"]) or "(top level)"
        if error["type"] == "extra_forbidden":
            allowed = _allowed_keys(error["loc"][:-1])
            problems.append(f"unknown key '{key}'; allowed here: {', '.join(allowed)}")
        else:
            message = error["msg"].removeprefix("Value error, ")
            problems.append(f"'{key}': {message} (got {error.get('input')!r})")
    return f"invalid configuration from {source}: " + "; ".join(problems)


def _allowed_keys(path: Sequence[Any]) -> list[str]:
    model: type[BaseModel] = Config
    for part in path:
        annotation = model.model_fields[str(part)].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return sorted(model.model_fields)


def render_defaults() -> str:
    """The defaults as commented YAML: the text of ``conf/base.yaml``."""
    lines = [
        "# Defaults of every job's configuration, generated from pipeline/config.py",
        "# (`python -m pipeline.config > conf/base.yaml`). Override them in conf/local.yaml",
        "# (ignored by git), with --conf FILE, or with --set key.path=value.",
    ]
    _render(Config(), Config, 0, lines)
    return "\n".join(lines) + "\n"


def _render(values: BaseModel, model: type[BaseModel], depth: int, lines: list[str]) -> None:
    indent = "  " * depth
    for name, info in model.model_fields.items():
        value = getattr(values, name)
        if isinstance(value, BaseModel):
            if depth == 0:
                lines.append("")
            doc = (type(value).__doc__ or "").strip().splitlines()
            if doc:
                lines.append(f"{indent}# {doc[0]}")
            lines.append(f"{indent}{name}:")
            _render(value, type(value), depth + 1, lines)
            continue
        dumped = yaml.safe_dump(
            {name: values.model_dump(mode="json")[name]}, default_flow_style=True, width=1000
        ).strip()
        if dumped.startswith("{") and dumped.endswith("}"):
            dumped = dumped[1:-1]
        comment = f"  # {info.description}" if info.description else ""
        lines.append(f"{indent}{dumped}{comment}")


if __name__ == "__main__":
    print(render_defaults(), end="")
