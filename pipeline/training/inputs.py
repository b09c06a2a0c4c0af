"""The training input on the driver: which rows, contract columns, validation rows, checks.

`resolve_input` says where the training and validation rows come from: for an ingest
output written with ``ingest.split.enabled``, its ``split=train`` rows, validated on its
``split=validation`` rows unless the user chose other validation (or trains on them too,
``train.include_validation_split``); its ``split=test`` rows are never read unless the user
names that folder. `prepare_training_data` turns features
into the stream a barrier task receives (float features, one-hot labels and the
validation flag). `describe_input` says what was read
(rows, rows per class, schema, files and their fingerprint, recorded in ``metadata.json``
and in every checkpoint); `check_classes` refuses data a classifier cannot learn from.
A profile of the input (per-feature statistics for drift checks) belongs beside
`describe_input`: it runs on the same DataFrame, once, before training starts.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from pipeline.artifact import sha256_bytes
from pipeline.config import TrainSettings
from pipeline.contract import FEATURES, LABEL, LABEL_ONEHOT, NUM_CLASSES, SPLIT
from pipeline.errors import InputDataError
from pipeline.features import onehot as one_hot
from pipeline.storage import Storage
from pipeline.training.data import VALIDATION_FLAG

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingInput:
    """Where the training rows and the validation rows come from."""

    train_path: str
    validation_path: str | None  # None: a fraction of the training rows, or no validation
    split_output: str | None = None  # the split ingest output the paths were taken from
    more_train_paths: tuple[str, ...] = ()  # further folders trained on (split=validation)

    @property
    def train_paths(self) -> tuple[str, ...]:
        return (self.train_path, *self.more_train_paths)

    def splits(self) -> dict[str, str]:
        """The splits used, by name (empty unless a split output was resolved)."""
        if self.split_output is None:
            return {}
        prefix = f"{self.split_output}/{SPLIT}="
        named = [*self.train_paths, *([self.validation_path] if self.validation_path else [])]
        return {p[len(prefix) :]: p for p in named if p.startswith(prefix)}

    def trained_splits(self) -> list[str]:
        """The names of the splits trained on."""
        return [name for name, p in self.splits().items() if p in self.train_paths]


def resolve_input(
    storage: Storage, input_path: str, settings: TrainSettings, report: dict | None
) -> TrainingInput:
    """The training input for `input_path`, whose ingest report is `report` (or None).

    A split ingest output (its report's ``preprocessing.split.enabled``, given as the
    output itself rather than one of its ``split=…`` folders) trains on ``split=train`` and
    validates on ``split=validation``, unless ``train.validation_path`` or
    ``train.validation_fraction`` says otherwise; ``split=test`` is left alone. With
    ``train.include_validation_split`` it trains on ``split=validation`` as well, and
    validates only on what those two settings give.
    """
    root = input_path.rstrip("/")
    split = ((report or {}).get("preprocessing") or {}).get("split") or {}
    if not split.get("enabled") or root.rpartition("/")[2].startswith(f"{SPLIT}="):
        return TrainingInput(input_path, settings.validation_path)
    validation = settings.validation_path
    if settings.include_validation_split:
        candidate = f"{root}/{SPLIT}=validation"
        more = (candidate,) if storage.exists(candidate) else ()
        return TrainingInput(f"{root}/{SPLIT}=train", validation, root, more)
    if not validation and not settings.validation_fraction:
        candidate = f"{root}/{SPLIT}=validation"
        validation = candidate if storage.exists(candidate) else None
    return TrainingInput(f"{root}/{SPLIT}=train", validation, split_output=root)


def prepare_training_data(
    features: DataFrame, settings: TrainSettings, validation: DataFrame | None = None
) -> DataFrame:
    """`features` and one-hot `label_onehot` as float arrays, plus the validation flag.

    Validation rows are the separate `validation` dataset when given, else a deterministic
    ``validation_fraction`` of the rows chosen by a hash of their features and label.
    """
    train = _contract_columns(features, "input")
    if validation is not None:
        return train.withColumn(VALIDATION_FLAG, F.lit(False)).unionByName(
            _contract_columns(validation, "validation data").withColumn(
                VALIDATION_FLAG, F.lit(True)
            )
        )
    if settings.validation_fraction > 0:
        bucket = F.pmod(
            F.xxhash64(F.lit(settings.seed), F.col(FEATURES), F.col(LABEL_ONEHOT)),
            F.lit(1_000_000),
        )
        return train.withColumn(
            VALIDATION_FLAG, bucket < F.lit(int(settings.validation_fraction * 1_000_000))
        )
    return train.withColumn(VALIDATION_FLAG, F.lit(False))


def _contract_columns(df: DataFrame, what: str) -> DataFrame:
    names = set(df.columns)
    if FEATURES not in names or not ({LABEL_ONEHOT, LABEL} & names):
        raise InputDataError(
            f"the {what} needs a '{FEATURES}' column and a '{LABEL_ONEHOT}' or '{LABEL}' "
            f"column; it has {sorted(names)}. Train on the output of jobs/ingest.py"
        )
    floats = T.ArrayType(T.FloatType())
    if LABEL_ONEHOT in names:
        onehot: Column = F.col(LABEL_ONEHOT).cast(floats)
    else:
        onehot = one_hot(F.col(LABEL))
    return df.select(F.col(FEATURES).cast(floats).alias(FEATURES), onehot.alias(LABEL_ONEHOT))


def describe_input(storage: Storage, df: DataFrame, path: str, *more: str) -> dict[str, Any]:
    """Row count, rows per class, schema and files (name, size) of the training data read
    from `path` (and the folders `more`), and the data fingerprint (their sha256).
    Counting reads only the label column."""
    files = [{"path": p, "bytes": size} for d in (path, *more) for p, size in storage.list_files(d)]
    counts = class_counts(df)
    described = {
        "path": ", ".join(storage.qualify(p) for p in (path, *more)),
        "rows": sum(counts.values()),
        "class_counts": counts,
        "schema": df.schema.simpleString(),
        "files": files,
    }
    described["sha256"] = sha256_bytes(
        json.dumps({k: described[k] for k in ("rows", "schema", "files")}, sort_keys=True).encode()
    )
    return described


def class_counts(df: DataFrame) -> dict[str, int]:
    """Rows per class (at most NUM_CLASSES aggregated rows reach the driver)."""
    if LABEL in df.columns:
        label = F.col(LABEL)
    else:
        label = F.array_position(F.col(LABEL_ONEHOT), F.lit(1.0)) - 1
    rows = df.groupBy(label.alias("class")).count().collect()
    return {str(row["class"]): int(row["count"]) for row in sorted(rows, key=lambda r: str(r[0]))}


def check_classes(counts: dict[str, int], path: str) -> None:
    """Refuse training data without rows of at least two classes."""
    present = [label for label, n in counts.items() if n > 0]
    if not present:
        raise InputDataError(f"{path} holds no rows: nothing to train on")
    if len(present) < 2:
        raise InputDataError(
            f"{path} holds rows of one class only (label {present[0]}, "
            f"{counts[present[0]]} rows): a classifier needs at least two classes. "
            f"Check the input, its filter or the ingest split"
        )
    missing = NUM_CLASSES - len(present)
    if missing:
        log.warning("%s has no rows of %d of the %d classes", path, missing, NUM_CLASSES)
