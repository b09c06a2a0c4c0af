"""The explain job: integrated gradients for every row, their checks and pictures.

``EXPL/`` holds Parquet with the pass-through ids, `prediction`, `confidence`,
`explained_class`, `completeness_error`, `attribution` (FEATURE_DIM floats; with
``explain.store_attributions: false`` only `top_pixels`) and `label` when the input has
one; ``EXPL/_rejected/`` the rows that failed validation; ``EXPL/_report.json`` the
counts, the completeness errors and the deletion curves; and the pictures
``_class_attributions.png``, ``_errors.png`` and ``_first_layer.png``.

The input is read and checked as scoring reads it (an ingest output, or a raw layout
preprocessed with the model's recorded settings) and the model is verified the same
way. Attributions are computed in the executors (`pipeline.explain.executor`); only
per-class sums, the deletion sums and a bounded set of error examples reach the driver.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from dataclasses import dataclass

import numpy as np
from pyspark import StorageLevel
from pyspark.sql import SparkSession
from pyspark.sql import types as T
from pyspark.sql.pandas.types import to_arrow_schema

from pipeline.artifact import Metadata
from pipeline.config import Config
from pipeline.contract import CONFIDENCE, FEATURES, LABEL, PREDICTION, Layout
from pipeline.errors import ConfigError, DataQualityError, InputDataError
from pipeline.evaluation import PartitionSums
from pipeline.explain.executor import (
    ATTRIBUTION,
    COMPLETENESS,
    EXPLAINED,
    TOP_PIXELS,
    ExplainTask,
    TaskSums,
    explain_batches,
)
from pipeline.explain.faithfulness import DeletionCurves, curves_from_sums
from pipeline.explain.weights import first_layer_weights
from pipeline.outputs import EXPLAIN, REPORT_FILE, check_output, staged_output
from pipeline.plots import class_attributions_png, errors_png, first_layer_png
from pipeline.quarantine import (
    RejectLimit,
    StageResult,
    stage_report,
)
from pipeline.scoring import (
    broadcast_model,
    read_source,
    read_verified_model,
    task_cpus,
    write_model_outputs,
)
from pipeline.storage import Storage

log = logging.getLogger(__name__)

CLASS_PLOT = "_class_attributions.png"
ERRORS_PLOT = "_errors.png"
FIRST_LAYER_PLOT = "_first_layer.png"


@dataclass(frozen=True)
class ExplainResult(StageResult):
    """The published explanations, their counts, checks and report."""

    completeness_mean: float = 0.0
    completeness_max: float = 0.0
    deletion: DeletionCurves | None = None
    pictures: tuple[str, ...] = ()


def run_explain(
    spark: SparkSession, config: Config, input_path: str, model_dir: str, output_path: str
) -> ExplainResult:
    """Explain every row of `input_path` with the model in `model_dir` into `output_path`."""
    started = time.monotonic()
    settings = config.explain
    limit = RejectLimit(
        "score.max_reject_fraction", config.score.max_reject_fraction, "explanations"
    )
    storage = Storage(spark)
    output = check_output(
        storage, output_path, EXPLAIN, {"--input": input_path, "--model-dir": model_dir}
    )
    metadata, model_bytes = read_verified_model(storage, model_dir)
    source = read_source(spark, input_path, metadata.preprocessing, config.ingest)
    if settings.target == "label" and not source.has_label:
        raise ConfigError(
            f"explain.target=label needs labelled input, and {input_path} has no label "
            f"column: set explain.target=predicted"
        )
    validated = source.validated
    if source.layout == Layout.IMAGE.value:
        validated = validated.persist(StorageLevel.MEMORY_AND_DISK)
    partitions = max(1, validated.rdd.getNumPartitions())
    good_schema = validated.select(*source.columns).schema
    schema = explanation_schema(good_schema, settings.store_attributions)
    model = broadcast_model(spark, metadata, model_bytes)
    task = ExplainTask(
        broadcast=model.handle,
        key=model.key,
        threads=task_cpus(spark),
        ids=tuple(f.name for f in good_schema.fields if f.name not in (FEATURES, LABEL)),
        label=LABEL if source.has_label else None,
        target=settings.target,
        steps=settings.steps,
        baseline=settings.baseline,
        store_attributions=settings.store_attributions,
        top_pixels=settings.top_pixels,
        faithfulness_rows=math.ceil(settings.faithfulness_rows / partitions),
        fractions=tuple(settings.deletion_fractions),
        error_examples=settings.error_examples,
        seed=settings.seed,
        names=tuple(schema.names),
        arrow_types=tuple(field.type for field in to_arrow_schema(schema)),
    )
    sums = spark.sparkContext.accumulator({}, PartitionSums())
    body = functools.partial(explain_batches, task=task, sums=sums)
    log.info(
        "input %s: %s, %s; model %s (sha256 %s...); %d partitions, %d steps a row",
        input_path,
        source.layout,
        "labelled" if source.has_label else "unlabelled",
        model_dir,
        metadata.model_sha256[:12],
        partitions,
        settings.steps,
    )
    try:
        with staged_output(storage, output, EXPLAIN) as staging:
            counts = write_model_outputs(
                validated,
                lambda good: good.select(*source.columns).mapInArrow(body, schema),
                source.raw_columns,
                staging,
                input_path,
                settings.batch_size,
                config.score.max_rows_per_file,
            )
            totals = _total(sums.value, settings.error_examples)
            if totals.rows != counts.rows_out:
                raise DataQualityError(
                    f"{counts.rows_out} rows were written but {totals.rows} explained; "
                    f"the input changed while it was read, rerun on stable input"
                )
            deletion = curves_from_sums(
                settings.deletion_fractions,
                _or_zeros(totals.deletion_attribution, settings.deletion_fractions),
                _or_zeros(totals.deletion_random, settings.deletion_fractions),
                totals.deletion_rows,
            )
            completeness_mean = totals.completeness_sum / totals.rows if totals.rows else 0.0
            seconds = time.monotonic() - started
            report = stage_report(
                "explain",
                input_path,
                output,
                source.layout,
                counts,
                seconds,
                label_column=LABEL if source.has_label else None,
                id_columns=list(task.ids),
                model_dir=model_dir,
                model_sha256=metadata.model_sha256,
                completeness={
                    "rows": totals.rows,
                    "mean_error": round(completeness_mean, 6),
                    "max_error": round(totals.completeness_max, 6),
                },
                faithfulness=deletion.as_dict(),
                preprocessing=source.preprocessing,
                explain=settings.model_dump(mode="json"),
            )
            pictures: tuple[str, ...] = ()
            if not limit.apply(storage, staging, counts, report):
                files = pictures_of(totals, metadata, model_bytes, settings.target)
                for name, data in files.items():
                    storage.write_bytes(f"{staging}/{name}", data)
                pictures = tuple(files)
            storage.write_json(f"{staging}/{REPORT_FILE}", report)
    finally:
        validated.unpersist()
        model.handle.unpersist()
    limit.check(counts, output)
    return ExplainResult(
        output,
        source.layout,
        counts,
        seconds,
        report,
        completeness_mean=completeness_mean,
        completeness_max=totals.completeness_max,
        deletion=deletion,
        pictures=pictures,
    )


def explanation_schema(features: T.StructType, store_attributions: bool) -> T.StructType:
    """Ids, `prediction`, `confidence`, `explained_class`, `completeness_error`, then
    `attribution` (or `top_pixels`), and `label` last when the input has one."""
    fields = {f.name: f for f in features.fields}
    if FEATURES not in fields:
        raise InputDataError(f"no '{FEATURES}' column to explain; columns: {list(fields)}")
    ids = [f for name, f in fields.items() if name not in (FEATURES, LABEL)]
    if store_attributions:
        detail = T.StructField(ATTRIBUTION, T.ArrayType(T.FloatType(), False), False)
    else:
        pixel = T.StructType(
            [
                T.StructField("pixel", T.IntegerType(), False),
                T.StructField("value", T.FloatType(), False),
            ]
        )
        detail = T.StructField(TOP_PIXELS, T.ArrayType(pixel, False), False)
    return T.StructType(
        [
            *ids,
            T.StructField(PREDICTION, T.IntegerType(), False),
            T.StructField(CONFIDENCE, T.FloatType(), False),
            T.StructField(EXPLAINED, T.IntegerType(), False),
            T.StructField(COMPLETENESS, T.FloatType(), False),
            detail,
            *([fields[LABEL]] if LABEL in fields else []),
        ]
    )


def pictures_of(
    totals: TaskSums, metadata: Metadata, model_bytes: bytes, target: str
) -> dict[str, bytes]:
    """The explain job's PNGs by file name, drawn from the aggregated sums."""
    counts = totals.counts
    safe = np.maximum(counts, 1)[:, None]
    files = {
        CLASS_PLOT: class_attributions_png(
            totals.inputs / safe,
            totals.attributions / safe,
            counts.astype(int).tolist(),
            by="true class" if target == "label" else "predicted class",
        ),
        FIRST_LAYER_PLOT: first_layer_png(first_layer_weights(metadata, model_bytes)),
    }
    if totals.errors:
        files[ERRORS_PLOT] = errors_png(
            [
                (pixels, attribution, label, prediction, confidence)
                for confidence, _, label, prediction, pixels, attribution in totals.errors
            ]
        )
    return files


def _total(by_partition: dict, error_examples: int) -> TaskSums:
    total = TaskSums()
    for partition in sorted(by_partition):
        total = total.merge(by_partition[partition], error_examples)
    return total


def _or_zeros(values, fractions) -> np.ndarray:
    return np.zeros(len(fractions)) if values is None else values
