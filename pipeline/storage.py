"""Driver-side file operations on any URI Spark can write (local, HDFS, S3A, ...).

Outputs are written into a hidden staging directory beside their destination and
renamed into place only when complete, so a crashed job never leaves a directory that
looks finished. Everything goes through Hadoop's FileSystem API, the same one Spark's
writers use.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from typing import Any

log = logging.getLogger(__name__)

SUCCESS_MARKER = "_SUCCESS"


class Storage:
    """Hadoop FileSystem access bound to a SparkSession's configuration."""

    def __init__(self, spark) -> None:
        self._jvm = spark.sparkContext._jvm
        self._hadoop_conf = spark.sparkContext._jsc.hadoopConfiguration()

    def _path(self, path: str):
        return self._jvm.org.apache.hadoop.fs.Path(path)

    def _fs(self, path: str):
        fs = self._path(path).getFileSystem(self._hadoop_conf)
        fs.setWriteChecksum(False)  # no .crc side files beside the local files we write
        return fs

    def qualify(self, path: str) -> str:
        """The absolute, scheme-qualified form of `path` (``/x`` -> ``file:/x``)."""
        p = self._path(path)
        return str(p.getFileSystem(self._hadoop_conf).makeQualified(p).toString())

    def exists(self, path: str) -> bool:
        return bool(self._fs(path).exists(self._path(path)))

    def is_dir(self, path: str) -> bool:
        return bool(self._fs(path).isDirectory(self._path(path)))

    def is_file(self, path: str) -> bool:
        return bool(self._fs(path).isFile(self._path(path)))

    def entries(self, path: str) -> list[tuple[str, bool]]:
        """(name, is a directory) of what directory `path` holds, one level, sorted."""
        statuses = self._fs(path).listStatus(self._path(path))
        return sorted((str(s.getPath().getName()), bool(s.isDirectory())) for s in statuses)

    def is_root(self, path: str) -> bool:
        """Whether `path` is the root of its file system (``/``, ``hdfs://nn/``, ``s3a://b/``)."""
        return bool(self._path(self.qualify(path)).isRoot())

    def home_and_working_dirs(self, path: str) -> tuple[str, str]:
        """The home and working directories of the file system `path` lives on, qualified."""
        fs = self._fs(path)
        return (
            str(fs.getHomeDirectory().toString()),
            str(fs.getWorkingDirectory().toString()),
        )

    def delete(self, path: str) -> None:
        self._fs(path).delete(self._path(path), True)

    def rename(self, src: str, dst: str) -> None:
        if not self._fs(src).rename(self._path(src), self._path(dst)):
            raise OSError(f"could not move {src} to {dst}")

    def list_files(self, path: str, limit: int | None = None) -> list[tuple[str, int]]:
        """(path, size in bytes) of the data files under `path`, recursively, sorted.

        With `limit`, the first `limit` files the listing meets, whichever they are.
        """
        fs = self._fs(path)
        root = self.qualify(path).rstrip("/")
        files = []
        iterator = fs.listFiles(self._path(path), True)
        while iterator.hasNext() and (limit is None or len(files) < limit):
            status = iterator.next()
            full = str(status.getPath().toString())
            relative = full[len(root) :].lstrip("/") if full.startswith(root) else full
            if not any(part.startswith(("_", ".")) for part in relative.split("/")):
                files.append((full, int(status.getLen())))
        return sorted(files)

    def write_bytes(self, path: str, data: bytes) -> None:
        """Write `data` to `path`, replacing it, through a temporary file and a rename."""
        fs = self._fs(path)
        target = self._path(path)
        tmp = self._path(f"{path}.tmp-{uuid.uuid4().hex}")
        stream = fs.create(tmp, True)
        try:
            stream.write(bytearray(data))
        finally:
            stream.close()
        if fs.exists(target):
            fs.delete(target, False)
        if not fs.rename(tmp, target):
            raise OSError(f"could not move {tmp} to {path}")

    def read_bytes(self, path: str) -> bytes:
        stream = self._fs(path).open(self._path(path))
        try:
            return bytes(self._jvm.org.apache.commons.io.IOUtils.toByteArray(stream))
        finally:
            stream.close()

    def write_text(self, path: str, text: str) -> None:
        self.write_bytes(path, text.encode("utf-8"))

    def read_text(self, path: str) -> str:
        return self.read_bytes(path).decode("utf-8")

    def write_json(self, path: str, data: Any) -> None:
        self.write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")

    def read_json(self, path: str) -> Any:
        return json.loads(self.read_text(path))

    def staging_dir(self, final: str) -> str:
        """A fresh hidden directory beside `final`, for writing it in one piece."""
        parent, _, name = final.rstrip("/").rpartition("/")
        return (
            f"{parent}/.{name}.staging-{uuid.uuid4().hex[:12]}"
            if parent
            else (f".{name}.staging-{uuid.uuid4().hex[:12]}")
        )

    def clear_stale_staging(self, final: str) -> list[str]:
        """Delete staging directories that earlier, killed runs left beside `final`.

        One job writes one output at a time: call this when starting to write `final`.
        """
        parent, _, name = final.rstrip("/").rpartition("/")
        if not parent or not self.exists(parent):
            return []
        removed = []
        # One glob, not a listing: the parent may hold thousands of entries.
        pattern = self._path(f"{parent}/.{_glob_escape(name)}.staging-*")
        for status in self._fs(parent).globStatus(pattern) or []:
            child = status.getPath()
            self._fs(parent).delete(child, True)
            removed.append(str(child.toString()))
        if removed:
            log.warning("removed %d staging directories of an interrupted run", len(removed))
        return removed

    def publish(self, staging: str, final: str) -> None:
        """Move a finished `staging` directory to `final`, replacing what was there.

        Jobs publish through `pipeline.outputs.staged_output`, which first checks that
        what is there is an earlier output of the same job.

        On HDFS and local disks each rename is atomic: readers see the old complete
        output or the new one. Object stores copy on rename; see the README.
        """
        fs = self._fs(final)
        target = self._path(final)
        old = None
        if fs.exists(target):
            old = self._path(self.staging_dir(final) + ".old")
            if not fs.rename(target, old):
                raise OSError(f"could not move the previous {final} aside")
        if not fs.rename(self._path(staging), target):
            if old is not None:
                fs.rename(old, target)
            raise OSError(f"could not move {staging} to {final}")
        if old is not None:
            fs.delete(old, True)
        log.info("published %s", final)


def _glob_escape(name: str) -> str:
    """`name` matched literally in a Hadoop glob pattern."""
    return re.sub(r"([\\*?\[\]{}])", r"\\\1", name)
