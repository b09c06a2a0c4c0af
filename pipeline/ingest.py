"""The ingest stage: raw Parquet or CSV in, the features dataset and its quarantine out.

``OUT/`` holds Parquet with `features`, `label`, `label_onehot` and the id columns (a
`row_id` when the input has none: see `pipeline.features.row_ids`), ``OUT/_rejected/``
the bad rows with their original columns and `reject_reason` (only when there are any),
and ``OUT/_report.json`` the counts. The whole directory appears at once, when complete.
"""

from __future__ import annotations

import logging
import time

from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from pipeline.config import Config, IngestSettings, SplitSettings
from pipeline.contract import (
    IMAGE_SIDE,
    REJECT_REASON,
    SPLIT,
    Layout,
    RejectReason,
)
from pipeline.errors import InputDataError
from pipeline.features import (
    FEATURES_TMP,
    IMAGE_SIZE_TMP,
    LABEL_TMP,
    Preprocessed,
    accepted_columns,
    pixel_values,
    preprocess,
    with_ids,
)
from pipeline.outputs import INGEST, REPORT_FILE, check_output, staged_output
from pipeline.quarantine import (
    REJECTED_DIR,
    Counts,
    RejectLimit,
    StageResult,
    stage_report,
    write_with_quarantine,
)
from pipeline.sources import read_input, read_parquet, translate_read_errors
from pipeline.storage import SUCCESS_MARKER, Storage

log = logging.getLogger(__name__)

# Pixel scales data comes in: a hint names the one that fits rejected values.
_PIXEL_SCALES = (1.0, 255.0, 65535.0)


class IngestResult(StageResult):
    """The published features dataset, its counts and report."""


def run_ingest(
    spark: SparkSession, config: Config, input_path: str, output_path: str
) -> IngestResult:
    """Validate `input_path` and publish the features dataset at `output_path`.

    Fails with `DataQualityError`, publishing only the report and the rejected rows,
    when no row passes validation or more than ``ingest.max_reject_fraction`` are rejected.
    """
    started = time.monotonic()
    settings = config.ingest
    storage = Storage(spark)
    output = check_output(storage, output_path, INGEST, {"--input": input_path})
    limit = RejectLimit("ingest.max_reject_fraction", settings.max_reject_fraction, "features")
    raw = with_ids(read_input(spark, input_path, settings), settings.id_columns)
    prepared = preprocess(raw, settings, require_label=True)
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
                    to_output=lambda good: good.select(*features_columns(prepared, settings.split)),
                    rejected_columns=prepared.raw_columns,
                    output_path=staging,
                    rejected_path=f"{staging}/{REJECTED_DIR}",
                    max_rows_per_file=settings.max_rows_per_file,
                    partition_by=(SPLIT,) if settings.split.enabled else (),
                )
            seconds = time.monotonic() - started
            if counts.rows_in == 0:
                raise InputDataError(f"{input_path} holds no rows: nothing to ingest")
            report = _report(config, input_path, output, prepared, counts, seconds)
            with translate_read_errors(input_path):
                advice = _advice(
                    validated, prepared, settings, counts, report, limit.exceeded(counts)
                )
            limit.apply(storage, staging, counts, report)
            storage.write_json(f"{staging}/{REPORT_FILE}", report)
    finally:
        validated.unpersist()

    limit.check(counts, output, advice)
    return IngestResult(output, prepared.layout.layout.value, counts, seconds, report)


def _advice(
    validated: DataFrame,
    prepared: Preprocessed,
    settings: IngestSettings,
    counts: Counts,
    report: dict,
    failed: bool,
) -> str:
    """What to change when the rejected rows point at a setting; adds what was found to
    `report`. Looks at the data again only for rows rejected for their size or scale."""
    advice = []
    rejected = counts.rejected_by_reason
    if rejected.get(RejectReason.IMAGE_WRONG_SIZE.value):
        sizes = {
            row[IMAGE_SIZE_TMP]: int(row["count"])
            for row in validated.filter(F.col(IMAGE_SIZE_TMP).isNotNull())
            .groupBy(IMAGE_SIZE_TMP)
            .count()
            .orderBy(F.desc("count"), IMAGE_SIZE_TMP)
            .collect()
        }
        report["rejected_image_sizes"] = sizes
        found = ", ".join(
            f"{n} {'rows are' if n > 1 else 'row is'} {size.replace('x', '×')}"
            for size, n in sizes.items()
        )
        advice.append(
            f"image_wrong_size: {found}; set ingest.resize (e.g. ingest.resize=lanczos) to "
            f"resize them to {IMAGE_SIDE}×{IMAGE_SIDE}"
        )
        log.warning("images of the wrong size: %s", found)
    out_of_range = rejected.get(RejectReason.PIXEL_OUT_OF_RANGE.value, 0)
    pixels = pixel_values(prepared.layout)
    if failed and pixels is not None and out_of_range * 2 > counts.rows_rejected:
        low, high = (
            validated.filter(F.col(REJECT_REASON) == RejectReason.PIXEL_OUT_OF_RANGE.value)
            .agg(F.min(F.array_min(pixels)), F.max(F.array_max(pixels)))
            .first()
        )
        report["rejected_pixel_range"] = [float(low), float(high)]
        scale = prepared.layout.pixel_max
        fits = next((s for s in _PIXEL_SCALES if scale < s and high <= s), None)
        if low >= 0 and fits is not None:
            set_by = "as set" if settings.pixel_max is not None else "the default for this type"
            advice.insert(
                0,
                f"{out_of_range} rows are pixel_out_of_range with values up to {high:g}, above "
                f"ingest.pixel_max = {scale:g} ({set_by}): if the pixels are on a 0-{fits:g} "
                f"scale, set ingest.pixel_max={fits:g}",
            )
    return ". ".join(advice)


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


def read_features(
    spark: SparkSession, path: str, settings: IngestSettings | None = None
) -> DataFrame:
    """An ingest output (refusing incomplete ones), or raw input read as `settings` say."""
    if ingest_report(Storage(spark), path) is not None:
        return read_parquet(spark, path)
    return read_input(spark, path, settings or IngestSettings())


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
