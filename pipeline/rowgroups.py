"""Reading Parquet row groups with pyarrow, from the URIs Spark and Hadoop use.

Executors that read an ingest output's files themselves (scoring and training)
share this: the listing of a dataset's Parquet files (`list_parquet`), the one
conversion of a Hadoop URI (``file:/x``, ``s3a://b/x``, ``hdfs://nn/x``)
into what ``pyarrow.fs`` opens, a pyarrow filesystem made once per Python worker,
``key=value`` partition folders as Spark reads them, the Parquet footers, and the row
groups themselves, refused when a file changed after its footer was read.

Everything a plan holds (`RowGroup`, filesystem roots) is plain values, so a plan made on
the driver from the footers alone can be shipped to the executors.
"""

from __future__ import annotations

import functools
import re
import urllib.parse
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

LOCAL = "file"  # the filesystem root of local paths

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):(.*)$", re.DOTALL)
# Hadoop's S3 connectors name the same buckets pyarrow opens as s3://.
_PYARROW_SCHEMES = {"s3a": "s3", "s3n": "s3"}

# What `locate`, and so `list_parquet`, raises when pyarrow cannot reach a storage.
UNREACHABLE = (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError)

# pyarrow filesystems made in this Python worker, by root: one per worker, not per task.
_FILESYSTEMS: dict[str, pafs.FileSystem] = {}


class InputChanged(OSError):
    """A file differs from its footer read when the job planned its reads."""


class UnreadableFooter(OSError):
    """A file whose Parquet footer pyarrow cannot read (corrupt, not Parquet, no access)."""

    def __init__(self, path: str, cause: Exception) -> None:
        super().__init__(f"{path}: {cause}")
        self.path = path
        self.cause = cause


class UnreadableRowGroup(OSError):
    """A planned row group whose data pyarrow cannot read, though its footer could be."""


class RowGroup(NamedTuple):
    """One row group of one file, as its footer described it when the reads were planned."""

    path: str  # within the filesystem of the plan
    group: int
    rows: int
    file_size: int  # bytes, to notice a rewritten file
    partition: str | None  # the value of the plan's partition column, from the folder name


class ParquetFiles(NamedTuple):
    """The Parquet files of a dataset folder, as the planning driver found them."""

    filesystem: str  # the `locate` root every path below is in
    uris: list[str]  # the files' URIs, as the storage listed them
    sizes: list[int]
    paths: list[str]  # within `filesystem`
    partitions: list[dict[str, str | None]]  # each file's ``key=value`` folders


def list_parquet(storage, path: str, limit: int | None = None) -> ParquetFiles:
    """The Parquet files under `path` (a `pipeline.storage.Storage` lists them); with
    `limit`, the first `limit` the listing meets.

    Raises what `locate` raises (``pa.ArrowInvalid``, ``pa.ArrowNotImplementedError``,
    ``OSError``) when pyarrow cannot open the storage.
    """
    root = storage.qualify(path).rstrip("/")
    filesystem_root, _ = locate(root)
    files = storage.list_files(path, limit)
    return ParquetFiles(
        filesystem=filesystem_root,
        uris=[uri for uri, _ in files],
        sizes=[size for _, size in files],
        paths=[locate(uri)[1] for uri, _ in files],
        partitions=[partition_values(root, uri) for uri, _ in files],
    )


def arrow_uri(uri: str) -> str:
    """A Hadoop-style URI as ``pyarrow.fs.FileSystem.from_uri`` wants it.

    ``file:/x`` and ``/x`` become ``file:///x``, ``s3a://`` and ``s3n://`` become
    ``s3://``; other schemes pass unchanged, as does a relative path.
    """
    match = _SCHEME.match(uri)
    if match is None:
        return "file://" + uri if uri.startswith("/") else uri
    scheme, rest = match.groups()
    if scheme == "file":
        return "file:///" + rest.lstrip("/")
    return f"{_PYARROW_SCHEMES.get(scheme, scheme)}:{rest}"


def locate(uri: str) -> tuple[str, str]:
    """(filesystem root, path within it) of a Hadoop-style URI.

    The root is `LOCAL` or ``scheme://authority/``: a plain string to ship to executors,
    which open it with `filesystem`. Raises ``pyarrow.ArrowInvalid``,
    ``ArrowNotImplementedError`` or ``OSError`` when pyarrow cannot reach the storage.
    """
    target = arrow_uri(uri)
    if target.startswith("file://"):  # parsed here: a local path need not be a valid URI
        return LOCAL, "/" + target[len("file://") :].lstrip("/")
    fs, path = pafs.FileSystem.from_uri(target)
    if isinstance(fs, pafs.LocalFileSystem):
        return LOCAL, path
    scheme, _, rest = target.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}/", path


def filesystem(root: str) -> pafs.FileSystem:
    """The pyarrow filesystem of a root from `locate`, made once per Python worker."""
    fs = _FILESYSTEMS.get(root)
    if fs is None:
        fs = pafs.LocalFileSystem() if root == LOCAL else pafs.FileSystem.from_uri(root)[0]
        _FILESYSTEMS[root] = fs
    return fs


def partition_values(root: str, path: str) -> dict[str, str | None]:
    """``key=value`` folders between `root` and the file `path`, as Spark reads them."""
    relative = path[len(root) :].lstrip("/") if path.startswith(root) else ""
    values: dict[str, str | None] = {}
    for part in relative.split("/")[:-1]:
        key, sep, value = part.partition("=")
        if sep:
            value = urllib.parse.unquote(value)
            values[key] = None if value == "__HIVE_DEFAULT_PARTITION__" else value
    return values


def read_footers(fs: pafs.FileSystem, paths: Sequence[str]) -> list[pq.FileMetaData]:
    """The Parquet footers of `paths`, read concurrently (one small read each).

    Raises `UnreadableFooter` naming the first file pyarrow cannot read.
    """
    with ThreadPoolExecutor(max_workers=max(1, min(16, len(paths)))) as pool:
        return list(pool.map(functools.partial(_footer, fs), paths))


def _footer(fs: pafs.FileSystem, path: str) -> pq.FileMetaData:
    try:
        return pq.read_metadata(path, filesystem=fs)
    except (pa.ArrowInvalid, OSError) as exc:
        raise UnreadableFooter(path, exc) from None


def row_groups(
    path: str, file_size: int, footer: pq.FileMetaData, partition: str | None = None
) -> list[RowGroup]:
    """The non-empty row groups of one file, from its footer."""
    return [
        RowGroup(path, group, footer.row_group(group).num_rows, file_size, partition)
        for group in range(footer.num_row_groups)
        if footer.row_group(group).num_rows
    ]


def read_row_group(
    fs: pafs.FileSystem, item: RowGroup, columns: Sequence[str], batch_rows: int
) -> Iterator[pa.RecordBatch]:
    """`columns` of one planned row group in batches of at most `batch_rows` rows.

    Raises `InputChanged` when the file's size or the group's row count differ from the
    plan: a task then never reads rows other than the ones planned; `UnreadableRowGroup`
    when its pages cannot be read (a damaged file).
    """
    path, group, rows, size, _ = item
    with fs.open_input_file(path) as file:
        parquet = pq.ParquetFile(file) if file.size() == size else None
        found = (
            parquet.metadata.row_group(group).num_rows
            if parquet is not None and group < parquet.num_row_groups
            else None
        )
        if parquet is None or found != rows:
            raise InputChanged(
                f"{path} was {size} bytes with {rows} rows in row group {group} "
                f"when the job started, now {file.size()} bytes and {found}"
            )
        batches = parquet.iter_batches(
            batch_size=batch_rows, row_groups=[group], columns=list(columns), use_threads=False
        )
        try:
            yield from batches
        except (OSError, pa.ArrowException) as exc:
            cause = " ".join(str(exc).split())  # one line: the driver reads the last line
            raise UnreadableRowGroup(
                f"cannot read row group {group} of {path}: {cause} (a damaged Parquet file); "
                f"replace the file or rerun the job that wrote it"
            ) from None
