"""What a scoring run reads: raw rows preprocessed as the model was trained, or an ingest output.

`read_source` reads either, for every job that runs a model on rows (scoring,
explanations): `raw_source` runs the shared preprocessing (`pipeline.features`) with the
model's recorded settings, located in this input (`scoring_preprocessing`);
`ingested_source` takes an ingest output's validated features as they are (the executors
check every batch). Both give a `Source`: the rows, the columns of a good row and what a
rejected row keeps.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from pipeline.config import IngestSettings
from pipeline.contract import FEATURES, LABEL, LABEL_ONEHOT, REJECT_REASON, SPLIT
from pipeline.features import Preprocessed, accepted_columns, preprocess, with_ids
from pipeline.ingest import ingest_report
from pipeline.sources import read_input, read_parquet, read_spark_parquet, spark_parquet_schema
from pipeline.storage import Storage

log = logging.getLogger(__name__)

INGESTED = "ingested"  # the layout a `Source` of an ingest output reports

# Keys of IngestSettings that say where this input keeps its pixels, label and ids,
# rather than how pixels become features. A value changed from the default in the job's
# config overrides the model's recorded preprocessing.
_INPUT_KEYS = (
    "layout",
    "label_column",
    "image_column",
    "array_column",
    "pixel_column_prefix",
    "pixel_max",
    "id_columns",
)


@dataclass(frozen=True)
class Source:
    """Validated rows to score and how to turn a good row into the model's input.

    The rows are a Spark DataFrame built on first use (`validated`, `columns`): a job
    whose executors read an ingest output's files themselves needs only `good_schema`,
    and plans no Spark query (the first costs a cold JVM seconds).
    """

    frame: Callable[[], tuple[DataFrame, list[Column]]]  # (`validated`, `columns`)
    ids: tuple[str, ...]
    has_label: bool
    raw_columns: tuple[str, ...]  # what a rejected row keeps
    layout: str
    preprocessing: dict
    # The schema of a good row's columns, when known without Spark (an ingest output).
    good_schema: T.StructType | None = None

    @cached_property
    def _frame(self) -> tuple[DataFrame, list[Column]]:
        return self.frame()

    @property
    def validated(self) -> DataFrame:
        """Every input row, with `reject_reason`."""
        return self._frame[0]

    @property
    def columns(self) -> list[Column]:
        """Ids, `features`, `label` of a good row."""
        return self._frame[1]

    @property
    def ingested(self) -> bool:
        """Rows of an ingest output, which the executors check batch by batch."""
        return self.layout == INGESTED


def read_source(
    spark: SparkSession, input_path: str, trained: IngestSettings, current: IngestSettings
) -> Source:
    """The rows of `input_path` to run a model on, whether an ingest output or raw input.

    Raw input is read as `current` (the job's ``ingest`` settings) says and preprocessed
    as the model was trained (`trained`, located in this input by `scoring_preprocessing`),
    with the `row_id` ingest would give it when it has no id column. An ingest output's
    schema comes from its footers when Spark recorded it there; Spark reads it only when
    the rows are asked for.
    """
    storage = Storage(spark)
    report = ingest_report(storage, input_path)
    if report is not None:
        schema = spark_parquet_schema(storage, input_path)
        if schema is None:  # not recorded by Spark, or in doubt: Spark reads the schema
            raw = read_parquet(spark, input_path)
            return ingested_source(raw.schema, lambda: raw, report)
        return ingested_source(
            schema, lambda: read_spark_parquet(spark, storage, input_path), report
        )
    settings = scoring_preprocessing(trained, current)
    raw = with_ids(read_input(spark, input_path, current), settings.id_columns)
    return raw_source(preprocess(raw, settings, require_label=False))


def scoring_preprocessing(trained: IngestSettings, current: IngestSettings) -> IngestSettings:
    """The preprocessing to score raw input with: the model's own, located in this input.

    Keys that locate pixels, label and ids (`_INPUT_KEYS`) and that the job's config
    changed from their defaults win over the model's recorded ones.
    """
    defaults = IngestSettings()
    update = {
        key: getattr(current, key)
        for key in _INPUT_KEYS
        if getattr(current, key) != getattr(defaults, key)
    }
    return trained.model_copy(update=update)


def raw_source(prepared: Preprocessed) -> Source:
    """Raw input: the shared preprocessing validates and scales every row."""
    columns = accepted_columns(prepared, with_onehot=False)
    return Source(
        frame=lambda: (prepared.df, columns),
        ids=prepared.layout.id_columns,
        has_label=prepared.layout.label_column is not None,
        raw_columns=prepared.raw_columns,
        layout=prepared.layout.layout.value,
        preprocessing=prepared_settings(prepared),
    )


def ingested_source(schema: T.StructType, read: Callable[[], DataFrame], report: dict) -> Source:
    """An ingest output of `schema` (as Spark reads it), its rows from `read()` when needed:
    rows the shared preprocessing already validated and scaled.

    Running it again would give back the same features at the cost of two passes over
    784 values a row in the JVM; the executors instead check every batch (lengths,
    nulls, values in [0, 1]) and fail the job if this is not a genuine ingest output.
    """
    reserved = {FEATURES, LABEL, LABEL_ONEHOT, SPLIT}
    names = schema.fieldNames()
    ids = tuple(c for c in report.get("id_columns") or () if c in names)
    passthrough = ids + ((SPLIT,) if SPLIT in names and SPLIT not in ids else ())
    has_label = LABEL in names
    unknown = [c for c in names if c not in reserved and c not in ids]
    if unknown:
        log.info("ingest output columns not passed through: %s", ", ".join(unknown))
    good = [schema[c] for c in (*passthrough, FEATURES)]
    if has_label:  # read as the int the model's label is
        good.append(T.StructField(LABEL, T.IntegerType(), schema[LABEL].nullable))

    def frame() -> tuple[DataFrame, list[Column]]:
        columns = [F.col(c) for c in passthrough] + [F.col(FEATURES)]
        if has_label:
            columns.append(F.col(LABEL).cast("int").alias(LABEL))
        return read().withColumn(REJECT_REASON, F.lit(None).cast("string")), columns

    return Source(
        frame=frame,
        ids=passthrough,
        has_label=has_label,
        raw_columns=tuple(names),
        layout=INGESTED,
        preprocessing=report["preprocessing"],
        good_schema=T.StructType(good),
    )


def prepared_settings(prepared: Preprocessed) -> dict:
    """What the preprocessing decided for this input, for the report."""
    layout = prepared.layout
    return {
        "layout": layout.layout.value,
        "pixel_source": list(layout.pixel_source)[:1],
        "pixel_max": layout.pixel_max,
        "label_column": layout.label_column,
        "id_columns": list(layout.id_columns),
    }
