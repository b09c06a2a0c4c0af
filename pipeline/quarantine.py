"""Writing good rows and quarantined rows from one validated DataFrame, with counts that add up.

The counts come from the write itself (`DataFrame.observe`), not from extra passes over
the data. The rejected rows are written in a second pass only when there are any, so
clean data is read once and its output has no `_rejected/` directory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pyspark.sql import DataFrame, Observation
from pyspark.sql import functions as F

from pipeline import __version__
from pipeline.contract import REJECT_REASON, RejectReason
from pipeline.errors import DataQualityError

REJECTED_DIR = "_rejected"


@dataclass(frozen=True)
class Counts:
    """What happened to the rows of one run. `rows_in == rows_out + rows_rejected`."""

    rows_in: int
    rows_out: int
    rows_rejected: int
    rejected_by_reason: dict[str, int] = field(default_factory=dict)

    @property
    def rejected_fraction(self) -> float:
        return self.rows_rejected / self.rows_in if self.rows_in else 0.0

    def as_dict(self) -> dict:
        return {
            "rows_in": self.rows_in,
            "rows_out": self.rows_out,
            "rows_rejected": self.rows_rejected,
            "rejected_by_reason": dict(self.rejected_by_reason),
        }


@dataclass(frozen=True)
class StageResult:
    """What a stage that writes rows with a quarantine (ingest, scoring) hands its job."""

    output: str
    layout: str
    counts: Counts
    seconds: float
    report: dict

    @property
    def rows_per_second(self) -> float:
        return self.counts.rows_in / self.seconds if self.seconds else 0.0


def stage_report(
    job: str,
    input_path: str,
    output: str,
    layout: str,
    counts: Counts,
    seconds: float,
    **details: Any,
) -> dict:
    """The ``_report.json`` of a stage that writes rows with a quarantine (ingest, score).

    `job` names the stage: the output check recognises an earlier output by it. `details`
    (label and id columns, model, settings) come after the counts.
    """
    return {
        "status": "ok",
        "job": job,
        "input": input_path,
        "output": output,
        "layout": layout,
        **counts.as_dict(),
        "rejected_fraction": round(counts.rejected_fraction, 6),
        "seconds": round(seconds, 3),
        "rows_per_second": round(counts.rows_in / seconds, 1) if seconds else None,
        **details,
        "version": __version__,
    }


@dataclass(frozen=True)
class RejectLimit:
    """When a stage that writes with a quarantine fails rather than publishes.

    It fails when no row passes validation (an empty success would hide it, whatever
    the limit) or when the rejected share is above `limit`, the value of the config key
    `key`. A failed run publishes its report and rejected rows, and no `what`.
    """

    key: str  # e.g. "ingest.max_reject_fraction": the setting named in the error
    limit: float
    what: str  # what a failed run does not publish: "features", "predictions"

    def exceeded(self, counts: Counts) -> bool:
        return counts.rows_out == 0 or counts.rejected_fraction > self.limit

    def apply(self, storage, staging: str, counts: Counts, report: dict) -> bool:
        """Whether the run failed; if so, mark `report` failed and drop the good rows from
        `staging`, keeping ``_rejected/`` for the report to point at."""
        failed = self.exceeded(counts)
        if failed:
            report["status"] = "failed"
            drop_accepted(storage, staging)
        return failed

    def check(self, counts: Counts, output: str, advice: str = "") -> None:
        """Raise `DataQualityError` for a failed run, saying what to change.

        `advice` says what to change when the rejected rows point at a setting; by
        default the message suggests fixing the input or raising `key`.
        """
        if counts.rows_out == 0:
            raise DataQualityError(
                f"none of the {counts.rows_in} rows passed validation: "
                f"{describe_reasons(counts)}. The rejected rows and the report are in "
                f"{output}; no {self.what} were published. {advice or 'Fix the input'}"
            )
        if counts.rejected_fraction > self.limit:
            raise DataQualityError(
                f"{counts.rows_rejected} of {counts.rows_in} rows rejected "
                f"({counts.rejected_fraction:.1%}, above {self.key} = {self.limit:.1%}): "
                f"{describe_reasons(counts)}. The rejected rows and the report are in "
                f"{output}; no {self.what} were published. "
                f"{advice or f'Fix the input, or raise {self.key} to accept them'}"
            )


def drop_accepted(storage, staging: str) -> None:
    """Delete the good rows from a staging directory, keeping `_rejected/` and the report.

    For a run above its reject threshold: what is published must not look complete.
    """
    from pipeline.storage import SUCCESS_MARKER

    for data_file, _ in storage.list_files(staging):
        storage.delete(data_file)
    storage.delete(f"{staging}/{SUCCESS_MARKER}")


def describe_reasons(counts: Counts) -> str:
    """'label_null 2, not_finite 1': the rejected counts for a message."""
    return ", ".join(f"{reason} {n}" for reason, n in sorted(counts.rejected_by_reason.items()))


def write_with_quarantine(
    validated: DataFrame,
    to_output: Callable[[DataFrame], DataFrame],
    rejected_columns: Sequence[str],
    output_path: str,
    rejected_path: str,
    max_rows_per_file: int,
    partition_by: Sequence[str] = (),
) -> Counts:
    """Write the good rows of `validated` through `to_output`, and the bad ones with reasons.

    `validated` must carry a ``reject_reason`` column (null for a good row). Raises
    `DataQualityError` if the counts do not reconcile, which would mean the data
    changed between the two passes.
    """
    reason = F.col(REJECT_REASON)
    reasons = [r.value for r in RejectReason]
    seen = Observation("rows")
    observed = validated.observe(
        seen,
        F.count(F.lit(1)).alias("rows_in"),
        F.count(F.when(reason.isNull(), 1)).alias("rows_out"),
        *[F.count(F.when(reason == r, 1)).alias(r) for r in reasons],
    )
    _write(
        to_output(observed.filter(reason.isNull())), output_path, max_rows_per_file, partition_by
    )
    metrics = seen.get
    by_reason = {r: int(metrics[r]) for r in reasons if metrics[r]}
    counts = Counts(
        rows_in=int(metrics["rows_in"]),
        rows_out=int(metrics["rows_out"]),
        rows_rejected=sum(by_reason.values()),
        rejected_by_reason=by_reason,
    )
    if counts.rows_in != counts.rows_out + counts.rows_rejected:
        raise DataQualityError(
            f"counts do not reconcile: {counts.rows_in} rows in, {counts.rows_out} written, "
            f"{counts.rows_rejected} rejected with a known reason"
        )

    if counts.rows_rejected == 0:
        return counts  # no empty `_rejected/` for other engines' ``**/*.parquet`` to pick up
    rejected = validated.filter(reason.isNotNull()).select(*rejected_columns, REJECT_REASON)
    written = Observation("rejected")
    _write(
        rejected.observe(written, F.count(F.lit(1)).alias("n")),
        rejected_path,
        max_rows_per_file,
        (),
    )
    if int(written.get["n"]) != counts.rows_rejected:
        raise DataQualityError(
            f"the input changed while it was read: {counts.rows_rejected} rows were rejected "
            f"on the first pass, {written.get['n']} on the second; rerun on stable input"
        )
    return counts


def _write(df: DataFrame, path: str, max_rows_per_file: int, partition_by: Sequence[str]) -> None:
    writer = df.write.mode("errorifexists").option("maxRecordsPerFile", max_rows_per_file)
    if partition_by:
        writer = writer.partitionBy(*partition_by)
    writer.parquet(path)
