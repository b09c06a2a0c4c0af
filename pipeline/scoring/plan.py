"""The row-group plan: scoring an ingest output from its files, planned from footers alone.

The driver lists the output's Parquet files, reads their footers (no data) and groups
their row groups into tasks of about equal rows. The plan is plain values, shipped to
the executors, where task *i* reads exactly ``plan.tasks[i]`` (`executor.score_files`):
a task is a pure function of its work items, so Spark's retries are safe.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa
from pyspark.sql import types as T
from pyspark.sql.pandas.types import to_arrow_schema

from pipeline import rowgroups
from pipeline.contract import FEATURES, SPLIT
from pipeline.errors import InputDataError
from pipeline.rowgroups import RowGroup
from pipeline.scoring.inference import prediction_schema
from pipeline.storage import Storage

log = logging.getLogger(__name__)

# Tasks per core for an ingest output read by the executors: a few, so that a core slowed
# by other work hands its share to the others, without many small output files.
TASKS_PER_CORE = 2


@dataclass(frozen=True)
class RowGroupPlan:
    """The work of scoring an ingest output from its files: row groups grouped into tasks.

    Made on the driver from the Parquet footers alone; no data is read. Every value is
    plain (strings, ints, Arrow types), so the plan can be shipped to the executors.
    """

    filesystem: str  # a `rowgroups.locate` root the executors open their filesystem from
    items: tuple[RowGroup, ...]
    tasks: tuple[tuple[int, ...], ...]  # indices into `items`, contiguous, one tuple per task
    schema: T.StructType  # the predictions' Spark schema (as `predict_digits` would give)
    arrow_types: tuple[tuple[str, pa.DataType], ...]  # pass-through columns and label
    partition_column: str | None  # `split` when it comes from ``split=...`` folders
    label: str | None
    rows: int
    files: int


def plan_row_groups(
    storage: Storage,
    input_path: str,
    features: T.StructType,
    parallelism: int,
    max_rows_per_task: int = 500_000,
) -> RowGroupPlan | None:
    """Plan to score the ingest output at `input_path` by reading its files in the executors,
    in a few tasks for each of the `parallelism` the cluster runs at once.

    `features` is the schema of the columns to score as Spark reads them (ids, `split`,
    `features`, `label`): it fixes the output. Returns None, with a log line, when
    pyarrow cannot reach the storage or the directory has partition columns other than
    `split`: Spark then reads the rows itself.
    """
    schema, ids, label = prediction_schema(features)
    try:
        files = rowgroups.list_parquet(storage, input_path)
    except rowgroups.UNREACHABLE as exc:
        log.info("pyarrow cannot open %s (%s): rows are read by Spark", input_path, exc)
        return None
    keys = {key for values in files.partitions for key in values}
    if keys - {SPLIT} or (keys and features[SPLIT].dataType != T.StringType()):
        log.info("%s is partitioned by %s: rows are read by Spark", input_path, sorted(keys))
        return None
    partition_column = SPLIT if SPLIT in keys else None
    try:
        footers = rowgroups.read_footers(rowgroups.filesystem(files.filesystem), files.paths)
    except rowgroups.UnreadableFooter as exc:
        raise InputDataError(
            f"cannot read {exc.path} with pyarrow ({exc.cause}): a corrupt or non-Parquet "
            f"file, or storage that pyarrow cannot reach with this environment's credentials. "
            f"Remove or replace that file, or set score.ingested_reader=spark to read through "
            f"Spark"
        ) from None

    needed = [FEATURES, *(c for c in ids if c != partition_column)]
    needed += [label] if label else []
    items: list[RowGroup] = []
    listed = zip(files.uris, files.sizes, files.paths, footers, files.partitions, strict=True)
    for uri, size, path, footer, values in listed:
        names = set(footer.schema.to_arrow_schema().names)
        missing = [c for c in needed if c not in names]
        if missing:
            raise InputDataError(
                f"{uri} has no {', '.join(missing)} column: every file of an ingest output "
                f"holds {', '.join(needed)}; rerun the ingest job"
            )
        items += rowgroups.row_groups(path, size, footer, values.get(SPLIT))
    arrow = to_arrow_schema(schema)
    return RowGroupPlan(
        filesystem=files.filesystem,
        items=tuple(items),
        tasks=group_tasks(
            [item.rows for item in items],
            TASKS_PER_CORE * max(1, parallelism),
            max_rows_per_task,
        ),
        schema=schema,
        arrow_types=tuple(
            (name, arrow.field(name).type) for name in (*ids, *([label] if label else []))
        ),
        partition_column=partition_column,
        label=label,
        rows=sum(item.rows for item in items),
        files=len(files.uris),
    )


def group_tasks(
    rows: Sequence[int], parallelism: int, max_rows_per_task: int
) -> tuple[tuple[int, ...], ...]:
    """Contiguous runs of items with about equal rows: `parallelism` of them, more when a
    task would exceed `max_rows_per_task`, never more than the items."""
    total = sum(rows)
    if not rows:
        return ()
    tasks = min(len(rows), max(parallelism, math.ceil(total / max_rows_per_task)))
    groups: list[tuple[int, ...]] = []
    current: list[int] = []
    done = 0
    for index, n in enumerate(rows):
        current.append(index)
        done += n
        left = len(rows) - index - 1
        boundary = total * (len(groups) + 1) / tasks
        if done >= boundary or left == tasks - len(groups) - 1:
            groups.append(tuple(current))
            current = []
    if current:
        groups.append(tuple(current))
    return tuple(groups)
