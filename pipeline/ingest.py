"""The ingest stage: raw Parquet in, the features dataset and its quarantine out.

``OUT/`` holds Parquet with `features`, `label`, `label_onehot` and the id columns,
``OUT/_rejected/`` the bad rows with their original columns and `reject_reason`, and
``OUT/_report.json`` the counts. The whole directory appears at once, when complete.
"""

from __future__ import annotations

import logging
import time

from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from pipeline.config import Config, SplitSettings
from pipeline.contract import SPLIT, Layout
from pipeline.errors import InputDataError
from pipeline.features import FEATURES_TMP, LABEL_TMP, Preprocessed, accepted_columns, preprocess
from pipeline.outputs import INGEST, REPORT_FILE, check_output, staged_output
from pipeline.quarantine import (
    REJECTED_DIR,
    Counts,
    StageResult,
    drop_accepted,
    stage_report,
    too_many_rejected,
    write_with_quarantine,
)
from pipeline.sources import read_parquet, translate_read_errors
from pipeline.storage import SUCCESS_MARKER, Storage

log = logging.getLogger(__name__)


class IngestResult(StageResult):
    """The published features dataset, its counts and report."""


def run_ingest(
    spark: SparkSession, config: Config, input_path: str, output_path: str
) -> IngestResult:
    """Validate `input_path` and publish the features dataset at `output_path`."""
    started = time.monotonic()
    storage = Storage(spark)
    output = check_output(storage, output_path, INGEST, {"--input": input_path})
    raw = read_parquet(spark, input_path)
    prepared = preprocess(raw, config.ingest, require_label=True)
    log.info("input %s: %s layout", input_path, prepared.layout.layout.value)

    validated = prepared.df
    if prepared.layout.layout is Layout.IMAGE:
        # Decoding is the costly part: keep the decoded rows for the two writes.
        validated = validated.persist(StorageLevel.MEMORY_AND_DISK)

    try:
        with staged_output(storage, output, INGEST) as staging:
            with translate_read_errors(input_path):
                counts = write_with_quarantine(
                    validated,
                    to_output=lambda good: good.select(
                        *features_columns(prepared, config.ingest.split)
                    ),
                    rejected_columns=prepared.raw_columns,
                    output_path=staging,
                    rejected_path=f"{staging}/{REJECTED_DIR}",
                    max_rows_per_file=config.ingest.max_rows_per_file,
                    partition_by=(SPLIT,) if config.ingest.split.enabled else (),
                )
            seconds = time.monotonic() - started
            report = _report(config, input_path, output, prepared, counts, seconds)
            if counts.rows_in == 0:
                raise InputDataError(f"{input_path} holds no rows: nothing to ingest")
            failed = counts.rejected_fraction > config.ingest.max_reject_fraction
            if failed:
                report["status"] = "failed"
                drop_accepted(storage, staging)
            storage.write_json(f"{staging}/{REPORT_FILE}", report)
    finally:
        validated.unpersist()

    if failed:
        raise too_many_rejected(
            counts,
            "ingest.max_reject_fraction",
            config.ingest.max_reject_fraction,
            output,
            "features",
        )
    return IngestResult(output, prepared.layout.layout.value, counts, seconds, report)


def features_columns(prepared: Preprocessed, split: SplitSettings) -> list[Column]:
    """The output columns, with the deterministic split when it is enabled."""
    columns = accepted_columns(prepared)
    if split.enabled:
        columns.append(split_column(prepared, split).alias(SPLIT))
    return columns


def split_column(prepared: Preprocessed, split: SplitSettings) -> Column:
    """'train', 'validation' or 'test' from a hash of the ids or the row: stable across reruns."""
    if split.by == "id":
        if not prepared.layout.id_columns:
            raise InputDataError(
                "ingest.split.by is 'id' but the input has no id columns; "
                "set ingest.id_columns, or ingest.split.by: row"
            )
        keys = [F.col(c) for c in prepared.layout.id_columns]
    else:
        keys = [F.col(FEATURES_TMP), F.col(LABEL_TMP)]
    bucket = F.pmod(F.xxhash64(F.lit(split.seed), *keys), F.lit(1_000_000)) / 1_000_000.0
    return (
        F.when(bucket < split.train, F.lit("train"))
        .when(bucket < split.train + split.validation, F.lit("validation"))
        .otherwise(F.lit("test"))
    )


def read_features(spark: SparkSession, path: str) -> DataFrame:
    """An ingest output (or any Parquet with the features contract), refusing incomplete ones."""
    ingest_report(Storage(spark), path)
    return read_parquet(spark, path)


def ingest_report(storage: Storage, path: str) -> dict | None:
    """The report of the ingest output at `path`, or of the one whose ``split=…`` folder it is.

    None for Parquet that no ingest run wrote. Raises `InputDataError` for an ingest
    output that failed or was interrupted.
    """
    path = path.rstrip("/")
    parent, _, name = path.rpartition("/")
    for directory in (path, parent) if name.startswith(f"{SPLIT}=") and parent else (path,):
        if not storage.exists(f"{directory}/{REPORT_FILE}"):
            continue
        report = storage.read_json(f"{directory}/{REPORT_FILE}")
        if report.get("status") != "ok" or not storage.exists(f"{directory}/{SUCCESS_MARKER}"):
            raise InputDataError(
                f"{directory} is not a complete ingest output (status "
                f"{report.get('status')!r}); rerun the ingest job for it"
            )
        return report
    return None


def _report(config, input_path, output, prepared, counts: Counts, seconds: float) -> dict:
    return stage_report(
        "ingest",
        input_path,
        output,
        prepared.layout.layout.value,
        counts,
        seconds,
        pixel_max=prepared.layout.pixel_max,
        label_column=prepared.layout.label_column,
        id_columns=list(prepared.layout.id_columns),
        preprocessing=config.ingest.model_dump(mode="json"),
    )
