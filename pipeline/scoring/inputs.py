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
from dataclasses import dataclass

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from pipeline.config import IngestSettings
from pipeline.contract import FEATURES, LABEL, LABEL_ONEHOT, REJECT_REASON, SPLIT
from pipeline.features import Preprocessed, accepted_columns, preprocess, with_ids
from pipeline.ingest import ingest_report
from pipeline.sources import read_input, read_spark_parquet
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
    """Validated rows to score and how to turn a good row into the model's input."""

    validated: DataFrame  # every input row, with `reject_reason`
    columns: list[Column]  # ids, `features`, `label` of a good row
    ids: tuple[str, ...]
    has_label: bool
    raw_columns: tuple[str, ...]  # what a rejected row keeps
    layout: str
    preprocessing: dict

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
    with the `row_id` ingest would give it when it has no id column.
    """
    storage = Storage(spark)
    report = ingest_report(storage, input_path)
    if report is not None:
        return ingested_source(read_spark_parquet(spark, storage, input_path), report)
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
    return Source(
        validated=prepared.df,
        columns=accepted_columns(prepared, with_onehot=False),
        ids=prepared.layout.id_columns,
        has_label=prepared.layout.label_column is not None,
        raw_columns=prepared.raw_columns,
        layout=prepared.layout.layout.value,
        preprocessing=prepared_settings(prepared),
    )


def ingested_source(raw: DataFrame, report: dict) -> Source:
    """An ingest output: rows the shared preprocessing already validated and scaled.

    Running it again would give back the same features at the cost of two passes over
    784 values a row in the JVM; the executors instead check every batch (lengths,
    nulls, values in [0, 1]) and fail the job if this is not a genuine ingest output.
    """
    reserved = {FEATURES, LABEL, LABEL_ONEHOT, SPLIT}
    ids = tuple(c for c in report.get("id_columns") or () if c in raw.columns)
    passthrough = ids + ((SPLIT,) if SPLIT in raw.columns and SPLIT not in ids else ())
    has_label = LABEL in raw.columns
    columns = [F.col(c) for c in passthrough] + [F.col(FEATURES)]
    if has_label:
        columns.append(F.col(LABEL).cast("int").alias(LABEL))
    unknown = [c for c in raw.columns if c not in reserved and c not in ids]
    if unknown:
        log.info("ingest output columns not passed through: %s", ", ".join(unknown))
    return Source(
        validated=raw.withColumn(REJECT_REASON, F.lit(None).cast("string")),
        columns=columns,
        ids=passthrough,
        has_label=has_label,
        raw_columns=tuple(raw.columns),
        layout=INGESTED,
        preprocessing=report["preprocessing"],
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
