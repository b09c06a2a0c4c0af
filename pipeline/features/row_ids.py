"""A deterministic `row_id` for inputs without an id column.

``row_id = file_number * 2**32 + row_number``: the input's Parquet files are numbered
0, 1, ... in the order of their paths, and ``row_number`` is the row's position in its
file (from 0). Rerunning on the same files gives the same ids, however Spark splits the
work, and an id names its row exactly: for a one-file input it is the row's position.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from urllib.parse import urlsplit

from pyspark.errors import AnalysisException
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from pipeline.contract import DEFAULT_ID_COLUMNS, ROW_ID

log = logging.getLogger(__name__)

ROWS_PER_FILE_ID = 1 << 32
_FILE_PATH = "_row_id_file"
_FILE_NUMBER = "_row_id_file_number"


def with_ids(raw: DataFrame, id_columns: Sequence[str] | None) -> DataFrame:
    """`raw` as it is when `id_columns` are set or it has a default id column
    (``id``, ``row_id``); otherwise `raw` with a `row_id` (`with_row_id`)."""
    if id_columns is not None or any(c in raw.columns for c in DEFAULT_ID_COLUMNS):
        return raw
    return with_row_id(raw)


def with_row_id(raw: DataFrame) -> DataFrame:
    """`raw` with a `row_id` column; `raw` must be a Parquet read, not derived from one.

    Returns `raw` unchanged, with a warning, when Spark does not know the rows' files
    and positions (a DataFrame not read from files).
    """
    try:
        located = raw.withColumn(
            _FILE_PATH, F.parse_url(F.col("_metadata.file_path"), F.lit("PATH"))
        ).withColumn(ROW_ID, F.col("_metadata.row_index"))
    except AnalysisException:
        log.warning("the input has no id column and no file positions: rows get no %s", ROW_ID)
        return raw
    files = sorted({urlsplit(uri).path for uri in raw.inputFiles()})
    numbers = raw.sparkSession.createDataFrame(
        list(enumerate(files)), f"{_FILE_NUMBER} long, {_FILE_PATH} string"
    )
    return (
        located.join(F.broadcast(numbers), _FILE_PATH, "left")
        .withColumn(ROW_ID, F.col(_FILE_NUMBER) * F.lit(ROWS_PER_FILE_ID) + F.col(ROW_ID))
        .select(*raw.columns, ROW_ID)
    )
