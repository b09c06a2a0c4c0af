"""The scoring job's orchestration: read, score, write with a quarantine, evaluate, publish.

``PRED/`` holds Parquet with the pass-through id columns, `prediction`, `probabilities`,
`confidence` and, when the input has one, `label`; ``PRED/_rejected/`` the rows that
failed validation with their reason; ``PRED/_report.json`` the counts and the
evaluation (see `pipeline.evaluation`) and the plots beside it. The directory appears
at once, when complete, replacing any previous one.

Two routes reach the model (`pipeline.scoring.executor`, in the Python workers):

- raw input, or ``score.ingested_reader: spark``: Spark reads and (for raw input)
  preprocesses the rows, and `predict_digits` hands them to Python over Arrow. Moving
  784 floats a row out of the JVM is the cost of this route.
- an ingest output (the default, ``score.ingested_reader: files``): the driver plans the
  reads from the Parquet footers (`pipeline.scoring.plan`), and each task reads its row
  groups with pyarrow straight into the model and writes its predictions' Parquet files
  itself, so no row passes through the JVM: Spark sees one count a task, and the
  evaluation comes back in accumulators. (When pyarrow cannot reach the input or the
  output storage, Spark reads and writes.)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from py4j.protocol import Py4JJavaError
from pyspark import StorageLevel
from pyspark.errors import PythonException
from pyspark.sql import DataFrame, Observation, SparkSession

from pipeline import rowgroups
from pipeline.artifact import Metadata
from pipeline.config import Config
from pipeline.contract import LABEL, SPLIT, Layout
from pipeline.errors import DataQualityError, InputDataError
from pipeline.evaluation import (
    Evaluation,
    PartitionSums,
    evaluation_files,
    evaluations_by_split,
    metric_columns,
    metric_inputs,
    metric_names,
    metric_values,
    partition_total,
    summarize,
)
from pipeline.ingest import REPORT_FILE
from pipeline.monitoring.documents import REPORT_MD, scoring_report_md
from pipeline.monitoring.drift import DataProfile
from pipeline.monitoring.watch import Watch, WatchShape, watch_from_sums
from pipeline.outputs import SCORE, check_output, staged_output
from pipeline.plots import import_in_background
from pipeline.quarantine import (
    REJECTED_DIR,
    Counts,
    RejectLimit,
    StageResult,
    stage_report,
    write_with_quarantine,
)
from pipeline.rowgroups import InputChanged, UnreadableRowGroup
from pipeline.scoring.executor import InvalidFeatures
from pipeline.scoring.inference import (
    arrow_batch_rows,
    broadcast_model,
    predict_digits,
    read_scoring_model,
    start_workers,
    task_cpus,
    write_row_groups,
)
from pipeline.scoring.inputs import Source, read_source
from pipeline.scoring.plan import plan_row_groups
from pipeline.session import start_seconds
from pipeline.sources import read_parquet, translate_read_errors
from pipeline.storage import SUCCESS_MARKER, Storage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoreResult(StageResult):
    """The published predictions, their counts, report and evaluation."""

    evaluation: Evaluation | None = None
    watch: Watch | None = None  # calibration and drift
    # The evaluation of each split, when the input is a split ingest output.
    by_split: dict[str, Evaluation] = field(default_factory=dict)


def run_scoring(
    spark: SparkSession, config: Config, input_path: str, model_dir: str, output_path: str
) -> ScoreResult:
    """Score `input_path` (raw or ingested) with the model in `model_dir` into `output_path`."""
    started = time.monotonic()
    waited = start_seconds()
    storage = Storage(spark)
    output = check_output(
        storage, output_path, SCORE, {"--input": input_path, "--model-dir": model_dir}
    )
    metadata, onnx_bytes = read_scoring_model(storage, model_dir)
    score = config.score
    limit = RejectLimit("score.max_reject_fraction", score.max_reject_fraction, "predictions")
    source = read_source(spark, input_path, metadata.preprocessing, config.ingest)
    model = broadcast_model(spark, metadata, onnx_bytes)
    validated = None  # a persisted DataFrame of the Spark route
    try:  # the broadcast and the cache go when the job ends, however it ends
        threads = task_cpus(spark)
        plan = None
        if source.ingested and score.ingested_reader == "files" and _pyarrow_reaches(output):
            start_workers(spark, model, threads)  # while the plan reads the footers
            with translate_read_errors(input_path):
                plan = plan_row_groups(
                    storage,
                    input_path,
                    source.good_schema or source.validated.select(*source.columns).schema,
                    spark.sparkContext.defaultParallelism,
                    score.max_rows_per_file,
                )
        log.info(
            "input %s: %s, %s; model %s (sha256 %s...); %s",
            input_path,
            source.layout,
            "labelled" if source.has_label else "unlabelled",
            model_dir,
            metadata.model_sha256[:12],
            f"{plan.rows} rows in {len(plan.items)} row groups of {plan.files} files read by the "
            f"executors in {len(plan.tasks)} tasks"
            if plan is not None
            else "rows read by Spark",
        )
        training_profile = DataProfile.from_dict(metadata.profile) if metadata.profile else None
        shape = WatchShape.of(score, training_profile)
        watched = spark.sparkContext.accumulator({}, PartitionSums())
        watch = (watched, shape)
        if plan is None:
            observation = Observation("evaluation")
            metrics = metric_columns(
                source.has_label, score.confidence_threshold, score.confidence_bins
            )
            validated = source.validated
            if source.layout == Layout.IMAGE.value:
                validated = validated.persist(StorageLevel.MEMORY_AND_DISK)

            def to_output(good: DataFrame) -> DataFrame:
                scored = predict_digits(good.select(*source.columns), model, threads, watch)
                return scored.observe(observation, *metrics)

            def write(staging: str) -> Counts:
                return write_model_outputs(
                    validated,
                    to_output,
                    source.raw_columns,
                    staging,
                    input_path,
                    score.batch_size,
                    score.max_rows_per_file,
                )

            def metric_results() -> dict:
                return observation.get

        else:
            # Rows of an ingest output are never rejected (the executors refuse a bad batch
            # instead), so the quarantine contract holds with the scored rows themselves; the
            # tasks write them, and Spark sees one count a task.
            names = metric_names(source.has_label, score.confidence_bins)
            sums = spark.sparkContext.accumulator({}, PartitionSums())

            def write(staging: str) -> Counts:
                # No Arrow batch setting: the tasks read their row groups in batch_size rows.
                with translate_read_errors(input_path), translate_task_errors(input_path):
                    rows = write_row_groups(
                        spark,
                        plan,
                        model,
                        threads,
                        score.batch_size,
                        rowgroups.locate(storage.qualify(staging)),
                        score.max_rows_per_file,
                        (sums, score.confidence_threshold, score.confidence_bins),
                        watch,
                    )
                require_rows(rows, input_path)
                storage.write_bytes(f"{staging}/{SUCCESS_MARKER}", b"")
                return Counts(rows_in=rows, rows_out=rows, rows_rejected=0)

            def metric_results() -> dict:
                total = partition_total(sums.value, len(names))
                return metric_values(total, source.has_label, score.confidence_bins)

        phases = {"start": waited} if waited is not None else {}
        phases["prepare"] = time.monotonic() - started
        import_in_background()  # for the evaluation and monitoring pictures after the job
        by_split: dict[str, Evaluation] = {}
        with staged_output(storage, output, SCORE) as staging:
            counts = write(staging)
            phases["score_and_write"] = time.monotonic() - started - phases["prepare"]
            if plan is not None and counts.rows_in != plan.rows:
                raise DataQualityError(
                    f"the file footers of {input_path} list {plan.rows} rows but "
                    f"{counts.rows_in} were scored; the input changed while it was read, "
                    f"rerun on stable input"
                )
            evaluation = summarize(
                metric_results(),
                source.has_label,
                score.confidence_threshold,
                score.confidence_bins,
            )
            if evaluation.rows != counts.rows_out:
                raise DataQualityError(
                    f"{counts.rows_out} rows were validated but {evaluation.rows} scored; "
                    f"the input changed while it was read, rerun on stable input"
                )
            seconds = time.monotonic() - started
            report = _report(
                input_path, output, model_dir, metadata, source, counts, config, seconds
            )
            report["evaluation"] = evaluation.as_dict()
            watched_result = watch_from_sums(
                partition_total(watched.value, shape.size),
                shape,
                score,
                training_profile,
                source.has_label,
                metadata.temperature,
            )
            report.update(watched_result.as_dict())
            if not limit.apply(storage, staging, counts, report):
                plotted = time.monotonic()
                files = {**evaluation_files(evaluation), **watched_result.files(training_profile)}
                for name, data in files.items():
                    storage.write_bytes(f"{staging}/{name}", data)
                phases["plots"] = time.monotonic() - plotted
                if SPLIT in source.ids:
                    by_split = _evaluations_by_split(spark, staging, source, config)
                    report["evaluation_by_split"] = {n: e.as_dict() for n, e in by_split.items()}
                    phases["evaluation_by_split"] = time.monotonic() - plotted - phases["plots"]
                storage.write_text(f"{staging}/{REPORT_MD}", scoring_report_md(report, list(files)))
            # start: the process's start until the job began (Spark's start-up included;
            # the first job of a process only);
            # prepare: model, input, plan; score_and_write: the Spark job(s) that read,
            # score and write; plots: drawing and writing them; evaluation_by_split: one
            # aggregation of the written predictions. `seconds` excludes the last two.
            report["seconds_by_phase"] = {name: round(t, 3) for name, t in phases.items()}
            storage.write_json(f"{staging}/{REPORT_FILE}", report)
    finally:
        if validated is not None:
            validated.unpersist()
        model.handle.unpersist()

    limit.check(counts, output)
    return ScoreResult(
        output, source.layout, counts, seconds, report, evaluation, watched_result, by_split
    )


def _evaluations_by_split(
    spark: SparkSession, staging: str, source: Source, config: Config
) -> dict[str, Evaluation]:
    """The evaluation of each split of the predictions just written to `staging`."""
    written = read_parquet(spark, staging)
    return evaluations_by_split(
        written.select(*metric_inputs(written.columns)),
        source.has_label,
        config.score.confidence_threshold,
        config.score.confidence_bins,
    )


def write_model_outputs(
    validated: DataFrame,
    to_output: Callable[[DataFrame], DataFrame],
    rejected_columns: Sequence[str],
    staging: str,
    input_path: str,
    batch_rows: int,
    max_rows_per_file: int,
) -> Counts:
    """`write_with_quarantine` for a job that runs the model on `input_path`'s rows.

    The model sees `batch_rows` rows an Arrow batch; an unreadable input or a task's
    refusal of it becomes the pipeline's error for it. Raises `InputDataError` when the
    input holds no rows.
    """
    with model_job_errors(validated.sparkSession, input_path, batch_rows):
        counts = write_with_quarantine(
            validated,
            to_output=to_output,
            rejected_columns=rejected_columns,
            output_path=staging,
            rejected_path=f"{staging}/{REJECTED_DIR}",
            max_rows_per_file=max_rows_per_file,
        )
    require_rows(counts.rows_in, input_path)
    return counts


def require_rows(rows: int, input_path: str) -> None:
    """Raise `InputDataError` when `input_path` gave the model no row."""
    if rows == 0:
        raise InputDataError(f"{input_path} holds no rows: nothing to run the model on")


@contextmanager
def model_job_errors(spark: SparkSession, input_path: str, batch_rows: int) -> Iterator[None]:
    """Spark jobs inside run the model on `input_path` in `batch_rows`-row Arrow batches;
    an unreadable input or a task's refusal of it becomes the pipeline's error for it."""
    with (
        translate_read_errors(input_path),
        translate_task_errors(input_path),
        arrow_batch_rows(spark, batch_rows),
    ):
        yield


def _pyarrow_reaches(output: str) -> bool:
    """Whether the executors can write `output` with pyarrow (else Spark reads and writes)."""
    try:
        rowgroups.locate(output)
    except rowgroups.UNREACHABLE as exc:
        log.info("pyarrow cannot open %s (%s): rows are read and written by Spark", output, exc)
        return False
    return True


@contextmanager
def translate_task_errors(input_path: str) -> Iterator[None]:
    """Re-raise an executor's refusal of its input as the pipeline's error for it.

    Spark hands the driver a `PythonException` (a DataFrame job) or a `Py4JJavaError`
    (an RDD job) carrying the task's Python traceback; the refusal is recognised by the
    type of the exception the task raised.
    """
    try:
        yield
    except (PythonException, Py4JJavaError) as exc:
        changed = task_exception(exc, InputChanged)
        if changed is not None:
            raise DataQualityError(
                f"input changed: {changed}: the input changed while it was read, rerun on "
                f"stable input"
            ) from None
        unreadable = task_exception(exc, UnreadableRowGroup)
        if unreadable is not None:
            raise InputDataError(unreadable) from None
        invalid = task_exception(exc, InvalidFeatures)
        if invalid is not None:
            raise InputDataError(
                f"{input_path}: invalid features: {invalid}. It is marked as an ingest output "
                f"but holds rows the ingest job would have rejected: rerun the ingest job on "
                f"its raw data"
            ) from None
        raise


def task_exception(exc: PythonException | Py4JJavaError, kind: type[BaseException]) -> str | None:
    """The message of the `kind` exception a Python task raised, or None if it raised another.

    A Python traceback ends with the line ``module.Type: message`` of the exception raised.
    """
    parameters = exc.getMessageParameters() or {} if isinstance(exc, PythonException) else {}
    traceback = parameters.get("traceback") or str(exc)
    name = f"{kind.__module__}.{kind.__qualname__}: "
    for line in reversed(traceback.splitlines()):
        if line.startswith(name):
            return line[len(name) :].strip()
    return None


def _report(
    input_path: str,
    output: str,
    model_dir: str,
    metadata: Metadata,
    source: Source,
    counts: Counts,
    config: Config,
    seconds: float,
) -> dict:
    return stage_report(
        SCORE.job,
        input_path,
        output,
        source.layout,
        counts,
        seconds,
        model_dir=model_dir,
        model_sha256=metadata.model_sha256,
        onnx_sha256=metadata.onnx_sha256,
        label_column=LABEL if source.has_label else None,
        id_columns=list(source.ids),
        preprocessing=source.preprocessing,
        score=config.score.model_dump(mode="json"),
    )
