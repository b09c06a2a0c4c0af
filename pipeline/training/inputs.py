"""The training input on the driver: which rows, contract columns, validation rows, checks.

`resolve_input` says where the training and validation rows come from: for an ingest
output written with ``ingest.split.enabled``, its ``split=train`` rows, validated on its
``split=validation`` rows unless the user chose other validation (or trains on them too,
``train.include_validation_split``); its ``split=test`` rows are never read unless the user
names that folder. `prepare_training_data` turns features
into the stream a barrier task receives (float features, one-hot labels and the
validation flag) when Spark reads the rows; for an ingest output, `plan_files` plans
instead, from the Parquet footers alone, which rows of which row groups each barrier task
reads itself with pyarrow, so the features never pass through the JVM and are never
shuffled. `describe_input` says what is read (rows, schema, files and their fingerprint,
recorded in ``metadata.json`` and in every checkpoint) without reading it: the rows per
class are counted by the tasks as they spool their rows, and `check_classes` refuses, in
the tasks before training starts, data a classifier cannot learn from.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from pipeline import rowgroups
from pipeline.artifact import sha256_bytes
from pipeline.config import TrainSettings
from pipeline.contract import FEATURES, LABEL, LABEL_ONEHOT, NUM_CLASSES, SPLIT
from pipeline.errors import InputDataError
from pipeline.features import onehot as one_hot
from pipeline.storage import Storage
from pipeline.training.data import VALIDATION_FLAG

log = logging.getLogger(__name__)

# Where Spark keeps, in a Parquet file's footer, the schema of the DataFrame it wrote.
_SPARK_SCHEMA_KEY = b"org.apache.spark.sql.parquet.row.metadata"


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


@dataclass(frozen=True)
class FilePlan:
    """The rows each barrier task reads itself from an ingest output's Parquet files.

    Made on the driver from the footers alone. ``shares[k]`` lists worker k's row ranges,
    each ``(path, group, rows, file_size, start, stop, validation)`` (see
    `pipeline.training.data.read_share`): its training rows, then its validation rows,
    each a contiguous run of the files' rows in sorted file order, balanced by rows across
    the workers (they differ by one row at most).
    """

    filesystem: str  # a `rowgroups.locate` root
    label_column: str  # `label_onehot` when every file has it, else `label`
    shares: tuple[tuple[tuple, ...], ...]
    train_rows: int
    validation_rows: int
    rows_by_path: dict[str, int]  # rows of each folder read
    schema: str  # the training files' schema as Spark reads it (the first file's)

    def spec(self) -> dict[str, Any]:
        """The plan as plain values, for the barrier tasks."""
        return {
            "filesystem": self.filesystem,
            "label_column": self.label_column,
            "shares": [[list(r) for r in share] for share in self.shares],
        }


def plan_files(storage: Storage, source: TrainingInput, settings: TrainSettings) -> FilePlan | None:
    """Plan the barrier tasks' own reads of the ingest output(s) of `source`.

    None, with a log line, when Spark must read the rows: input that is not an ingest
    output (its own or its validation data), validation rows chosen by
    ``train.validation_fraction`` (a hash Spark computes), storage pyarrow cannot reach,
    partition folders, files without the contract's columns or unreadable footers.
    """
    from pipeline.ingest import ingest_report

    if settings.validation_fraction and not source.validation_path:
        log.info("train.validation_fraction picks the validation rows: Spark reads the rows")
        return None
    validating = [source.validation_path] if source.validation_path else []
    runs: list[list[tuple[rowgroups.RowGroup, bool]]] = [[], []]  # training, validation
    rows_by_path: dict[str, int] = {}
    root, common, schema = None, {LABEL, LABEL_ONEHOT}, None
    for path in (*source.train_paths, *validating):
        if ingest_report(storage, path) is None:
            log.info("%s is not an ingest output: Spark reads the training rows", path)
            return None
        found = _row_groups(storage, path)
        if found is None:
            return None
        fs_root, groups, labels, path_schema = found
        if root not in (None, fs_root):
            return None
        schema = schema or path_schema
        root, common = fs_root, common & labels
        validation = path in validating
        runs[validation] += [(g, validation) for g in groups]
        rows_by_path[path] = sum(g.rows for g in groups)
    if not common:
        return None  # training and validation files label their rows differently
    shares: list[list[tuple]] = [[] for _ in range(settings.workers)]
    for run in runs:
        for worker, share in enumerate(balanced_shares([g.rows for g, _ in run], settings.workers)):
            for index, start, stop in share:
                group, validation = run[index]
                shares[worker].append((*group[:4], start, stop, validation))
    rows = [sum(g.rows for g, _ in run) for run in runs]
    return FilePlan(
        filesystem=root,
        label_column=LABEL_ONEHOT if LABEL_ONEHOT in common else LABEL,
        shares=tuple(tuple(s) for s in shares),
        train_rows=rows[0],
        validation_rows=rows[1],
        rows_by_path=rows_by_path,
        schema=schema,
    )


def _row_groups(
    storage: Storage, path: str
) -> tuple[str, list[rowgroups.RowGroup], set[str], str] | None:
    """(filesystem root, non-empty row groups in file order, label columns every file has,
    the first file's schema as Spark reads it) of the Parquet files at `path`, or None when
    the tasks cannot read them with pyarrow."""
    try:
        files = rowgroups.list_parquet(storage, path)
    except rowgroups.UNREACHABLE as exc:
        log.info("pyarrow cannot open %s (%s): Spark reads the training rows", path, exc)
        return None
    if any(files.partitions):
        log.info("%s has partition folders: Spark reads the training rows", path)
        return None
    try:
        footers = rowgroups.read_footers(rowgroups.filesystem(files.filesystem), files.paths)
    except rowgroups.UnreadableFooter as exc:
        log.info("cannot read the footer of %s (%s): Spark reads the training rows", exc.path, exc)
        return None
    groups: list[rowgroups.RowGroup] = []
    labels = {LABEL, LABEL_ONEHOT}
    for size, file, footer in zip(files.sizes, files.paths, footers, strict=True):
        schema = footer.schema.to_arrow_schema()
        feature = schema.field(FEATURES).type if FEATURES in schema.names else None
        if not (pa.types.is_list(feature) and pa.types.is_floating(feature.value_type)):
            log.info("%s has no float array '%s': Spark reads the training rows", file, FEATURES)
            return None
        labels &= set(schema.names)
        groups += rowgroups.row_groups(file, size, footer)
    if not labels:
        log.info("%s has no '%s' or '%s' column: Spark reads the rows", path, LABEL, LABEL_ONEHOT)
        return None
    return files.filesystem, groups, labels, spark_schema(footers[0]) if footers else "struct<>"


def spark_schema(footer) -> str:
    """A Parquet file's schema as Spark reads it (``StructType.simpleString``): the one
    Spark stored when it wrote the file, else the one it derives from the Arrow schema."""
    from pyspark.sql.pandas.types import from_arrow_schema

    stored = (footer.metadata or {}).get(_SPARK_SCHEMA_KEY)
    if stored:
        return T.StructType.fromJson(json.loads(stored)).simpleString()
    return from_arrow_schema(footer.schema.to_arrow_schema()).simpleString()


def balanced_shares(rows: list[int], workers: int) -> list[list[tuple[int, int, int]]]:
    """Split the concatenated rows of consecutive items into `workers` contiguous shares
    whose sizes differ by one row at most: for each worker, ``(item, start, stop)``."""
    total = sum(rows)
    bounds = [total * k // workers for k in range(workers + 1)]
    shares: list[list[tuple[int, int, int]]] = [[] for _ in range(workers)]
    offset = 0
    for index, n in enumerate(rows):
        for worker in range(workers):
            start, stop = max(bounds[worker], offset), min(bounds[worker + 1], offset + n)
            if start < stop:
                shares[worker].append((index, start - offset, stop - offset))
        offset += n
    return shares


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


def describe_input(
    storage: Storage, path: str, *more: str, rows: int, schema: str
) -> dict[str, Any]:
    """Row count, schema and files (name, size) of the training data read from `path` (and
    the folders `more`), and the data fingerprint (their sha256). `rows` and `schema` (as
    Spark writes it: ``struct<features:array<float>,…>``) come from the Parquet footers
    (`plan_files`) or from Spark; the rows per class are added once the tasks have counted
    them."""
    files = [{"path": p, "bytes": size} for d in (path, *more) for p, size in storage.list_files(d)]
    described = {
        "path": ", ".join(storage.qualify(p) for p in (path, *more)),
        "rows": rows,
        "schema": schema,
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
