"""Reading input datasets, with Spark's read failures turned into errors that name the file."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

from pyspark.sql import DataFrame, SparkSession

from pipeline.errors import InputDataError

_UNREADABLE_FILE = re.compile(r"\[FAILED_READ_FILE[\w.]*\][^\n]*?reading file (\S+?)\.?(?:\s|$)")
_MISSING_PATH = re.compile(r"\[PATH_NOT_FOUND\] Path does not exist: (\S+?)\.?(?:\s|$)")


def read_parquet(spark: SparkSession, path: str) -> DataFrame:
    """The Parquet file or directory at `path` (any URI Spark reads)."""
    with translate_read_errors(path):
        return spark.read.parquet(path)


@contextmanager
def translate_read_errors(path: str) -> Iterator[None]:
    """Re-raise Spark's failures to read `path` as `InputDataError` naming the bad file.

    Wrap every action that reads the input: a corrupt file only shows when it is read.
    """
    try:
        yield
    except Exception as exc:
        message = str(exc)
        missing = _MISSING_PATH.search(message)
        if missing:
            raise InputDataError(f"input not found: {missing.group(1)}") from None
        unreadable = _UNREADABLE_FILE.search(message)
        if unreadable:
            cause = _root_cause(message)
            raise InputDataError(
                f"cannot read {unreadable.group(1)}: not a valid Parquet file or corrupt"
                f"{f' ({cause})' if cause else ''}. Remove or replace that file and rerun"
            ) from None
        if "Unable to infer schema for Parquet" in message:
            raise InputDataError(
                f"no Parquet files under {path} (an empty directory, or only hidden files)"
            ) from None
        raise


def _root_cause(message: str) -> str:
    causes = re.findall(r"Caused by: ([^\n]+)", message)
    return causes[-1].strip() if causes else ""
