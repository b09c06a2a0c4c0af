"""Reading input datasets (Parquet or CSV), with Spark's read failures turned into errors
that name the file.

Spark's failures are recognised by their error condition (``PATH_NOT_FOUND``,
``FAILED_READ_FILE.*``, ``UNABLE_TO_INFER_SCHEMA``), found on the Python exception or on
the Java exceptions behind it, never by matching message text.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import types as T

from pipeline.config import IngestSettings
from pipeline.errors import InputDataError

# The formats the jobs read, as `ingest.format` names them.
INPUT_FORMATS = ("parquet", "csv")
_PARQUET_MAGIC = b"PAR1"
_CSV_SUFFIX = ".csv"
# Where Spark's Parquet writer records the schema of the rows, in every file's footer.
_SPARK_SCHEMA_KEY = b"org.apache.spark.sql.parquet.row.metadata"


def read_input(spark: SparkSession, path: str, settings: IngestSettings) -> DataFrame:
    """The raw dataset at `path`: Parquet, or CSV with a header (the Kaggle digit files).

    ``settings.format`` picks the reader; ``auto`` reads CSV when `path` is a ``.csv`` file
    or a directory of them, Parquet otherwise. A file that is neither is refused with
    `InputDataError` before Spark reads it.
    """
    input_format = settings.format
    if input_format == "auto":
        input_format = "csv" if _is_csv(spark, path) else "parquet"
    if input_format == "csv":
        return read_csv(spark, path, settings)
    _refuse_non_parquet(spark, path)
    return read_parquet(spark, path)


def read_parquet(spark: SparkSession, path: str) -> DataFrame:
    """The Parquet file or directory at `path` (any URI Spark reads)."""
    with translate_read_errors(path):
        return spark.read.parquet(path)


def read_spark_parquet(spark: SparkSession, storage: Any, path: str) -> DataFrame:
    """Parquet that Spark wrote (an ingest output), read with the schema Spark recorded.

    Spark keeps its schema in every file's footer; read from one footer with pyarrow, it
    spares the job that infers a schema (about 0.6 s of a cold job's start, more on
    object stores). Partition folders (``split=...``) are still found by Spark. Any
    doubt (no such footer entry, a file pyarrow cannot open) falls back to `read_parquet`,
    which also gives a damaged input its error. `storage` is a `pipeline.storage.Storage`.
    """
    schema = _recorded_schema(storage, path)
    if schema is None:
        return read_parquet(spark, path)
    with translate_read_errors(path):
        return spark.read.schema(schema).parquet(path)


def spark_parquet_schema(storage: Any, path: str) -> T.StructType | None:
    """The schema Spark reads the Parquet it wrote at `path` with (an ingest output),
    found without Spark: the schema recorded in a footer, every column nullable as Spark
    reads files, then the ``split`` folders' column. None when in doubt (no recorded
    schema, other partition folders): ask Spark then."""
    from pipeline.contract import SPLIT

    found = _recorded_schema_and_folders(storage, path)
    if found is None:
        return None
    schema, partitions = found
    value = partitions.get(SPLIT)
    if set(partitions) - {SPLIT} or SPLIT in schema.fieldNames() or _numeric(value):
        return None  # Spark would find another column, or could type the split as a number
    fields = list(_nullable(schema).fields)
    if SPLIT in partitions:
        fields.append(T.StructField(SPLIT, T.StringType(), True))
    return T.StructType(fields)


def _numeric(value: str | None) -> bool:
    try:
        float(value or "")
    except ValueError:
        return False
    return True


def _nullable(kind: T.DataType) -> T.DataType:
    """`kind` with every nested element nullable (Spark's ``asNullable``)."""
    if isinstance(kind, T.StructType):
        return T.StructType(
            [T.StructField(f.name, _nullable(f.dataType), True, f.metadata) for f in kind]
        )
    if isinstance(kind, T.ArrayType):
        return T.ArrayType(_nullable(kind.elementType), True)
    if isinstance(kind, T.MapType):
        return T.MapType(_nullable(kind.keyType), _nullable(kind.valueType), True)
    return kind


def _recorded_schema(storage: Any, path: str) -> T.StructType | None:
    """The Spark schema in the footer of the first Parquet file under `path`, or None."""
    found = _recorded_schema_and_folders(storage, path)
    return None if found is None else found[0]


def _recorded_schema_and_folders(
    storage: Any, path: str
) -> tuple[T.StructType, dict[str, str | None]] | None:
    """The Spark schema in the footer of the first Parquet file under `path` and that
    file's ``key=value`` folders, from one listing; None when there is no such schema."""
    import json

    import pyarrow as pa

    from pipeline import rowgroups

    try:
        files = rowgroups.list_parquet(storage, path, limit=1)
        if not files.paths:
            return None
        fs = rowgroups.filesystem(files.filesystem)
        [footer] = rowgroups.read_footers(fs, files.paths)
        recorded = (footer.metadata or {}).get(_SPARK_SCHEMA_KEY)
        if not recorded:
            return None
        return T.StructType.fromJson(json.loads(recorded)), files.partitions[0]
    except (pa.ArrowException, OSError, ValueError, KeyError, TypeError):
        return None


def read_csv(spark: SparkSession, path: str, settings: IngestSettings) -> DataFrame:
    """A CSV file or directory with a header line, as the ``columns`` layout reads it.

    The label and the ``pixel…`` columns are read as integers (a cell that is not one
    becomes null, and validation quarantines its row); any other column stays text.
    """
    with translate_read_errors(path):
        names = spark.read.option("header", True).csv(path).columns
    if not names:
        raise InputDataError(f"{path}: no CSV header line (expected label,pixel0,...,pixel783)")
    integers = {settings.label_column}
    schema = T.StructType(
        [
            T.StructField(
                name,
                T.IntegerType()
                if name in integers or name.startswith(settings.pixel_column_prefix)
                else T.StringType(),
            )
            for name in names
        ]
    )
    with translate_read_errors(path):
        return spark.read.csv(path, header=True, schema=schema, mode="PERMISSIVE")


@contextmanager
def translate_read_errors(path: str) -> Iterator[None]:
    """Re-raise Spark's failures to read `path` as `InputDataError` naming the bad file.

    Wrap every action that reads the input: a corrupt file only shows when it is read.
    """
    try:
        yield
    except Exception as exc:
        problem = _read_problem(exc, path)
        if problem is None:
            raise
        raise InputDataError(problem) from None


def spark_conditions(exc: BaseException) -> Iterator[tuple[str, dict[str, Any], str]]:
    """(error condition, message parameters, Java class) of `exc` and the exceptions behind it.

    Covers PySpark's own exceptions and the Java exceptions of a ``Py4JJavaError``, cause
    by cause; a Java exception without an error condition yields an empty condition.
    """
    from pyspark.errors import PySparkException

    if isinstance(exc, PySparkException) and exc.getCondition():
        yield exc.getCondition() or "", exc.getMessageParameters() or {}, type(exc).__name__
    java = getattr(exc, "java_exception", None) or getattr(exc, "_origin", None)
    for _ in range(20):  # a cause chain is short; guard against a cycle
        if java is None:
            return
        condition, parameters = "", {}
        if _is_spark_throwable(java):
            condition = java.getCondition() or ""
            parameters = dict(java.getMessageParameters())
        yield condition, parameters, java.getClass().getName()
        java = java.getCause()


def root_cause(exc: BaseException) -> str:
    """The message of the innermost Java exception behind `exc`, or ''."""
    java = getattr(exc, "java_exception", None) or getattr(exc, "_origin", None)
    message = ""
    for _ in range(20):
        if java is None:
            break
        message = f"{java.getClass().getSimpleName()}: {java.getMessage()}"
        java = java.getCause()
    return message


def _read_problem(exc: BaseException, path: str) -> str | None:
    for condition, parameters, _ in spark_conditions(exc):
        if condition == "PATH_NOT_FOUND":
            return f"input not found: {parameters.get('path', path)}"
        if condition.startswith("FAILED_READ_FILE"):
            cause = root_cause(exc)
            return (
                f"cannot read {parameters.get('path', path)}: not a valid Parquet file or "
                f"corrupt{f' ({cause})' if cause else ''}. Remove or replace that file and rerun"
            )
        if condition == "UNABLE_TO_INFER_SCHEMA":
            kind = parameters.get("format", "Parquet")
            return f"no {kind} files under {path} (an empty directory, or only hidden files)"
    return None


def _is_spark_throwable(java: Any) -> bool:
    from py4j.java_gateway import is_instance_of
    from pyspark import SparkContext

    gateway = SparkContext._gateway
    return gateway is not None and is_instance_of(gateway, java, "org.apache.spark.SparkThrowable")


def _data_files(spark: SparkSession, path: str) -> list[str]:
    """The data files Spark would read at `path` (hidden and ``_`` files excluded)."""
    from pipeline.storage import Storage

    storage = Storage(spark)
    if not storage.exists(path):
        return []  # Spark's own PATH_NOT_FOUND says it
    return [name for name, _ in storage.list_files(path)]


def _is_csv(spark: SparkSession, path: str) -> bool:
    if path.rstrip("/").lower().endswith(_CSV_SUFFIX):
        return True
    files = _data_files(spark, path)
    return bool(files) and all(name.lower().endswith(_CSV_SUFFIX) for name in files)


def _refuse_non_parquet(spark: SparkSession, path: str) -> None:
    """`InputDataError` naming the first file under `path` that does not start as Parquet."""
    jvm = spark.sparkContext._jvm
    hadoop_conf = spark.sparkContext._jsc.hadoopConfiguration()
    for name in _data_files(spark, path):
        file = jvm.org.apache.hadoop.fs.Path(name)
        stream = file.getFileSystem(hadoop_conf).open(file)
        try:
            head = bytes(stream.readNBytes(len(_PARQUET_MAGIC)))
        finally:
            stream.close()
        if head != _PARQUET_MAGIC:
            raise InputDataError(
                f"{name} is not a Parquet file; the jobs read Parquet and CSV with a header "
                "line (a .csv file or directory, or --set ingest.format=csv): convert it to "
                "one of those"
            )
