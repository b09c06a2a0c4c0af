"""Where a batch enters TensorFlow: a worker's partition, from Arrow record batches to tf.data.

A barrier task receives its Spark partition as a stream of Arrow record batches and
spools them, batch by batch, into local Arrow IPC files (`spool_partition`): the task
never holds more than one record batch. The worker's TensorFlow process then opens the
files with `LocalData`, which keeps the partition in memory when it fits the memory
budget (epochs 2..n read no disk) and otherwise streams it back from the local file one
record batch at a time, so a worker's memory stays bounded whatever the data's size.

`epoch_dataset` turns one epoch of a worker's rows into a ``tf.data.Dataset`` of
batches: record batches in a seeded random order, rows shuffled within a window of
``shuffle_buffer`` rows, exactly ``steps`` batches (wrapping around when the worker has
fewer rows than its share). The order is a function of (seed, worker, epoch) alone, which
is what a checkpoint records as the data position.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.contract import FEATURE_DIM, FEATURES, LABEL_ONEHOT, NUM_CLASSES
from pipeline.errors import InputDataError

# Boolean column marking validation rows in the stream a barrier task receives.
VALIDATION_FLAG = "is_validation"

TRAIN_FILE = "train.arrow"
SPOOL_BATCH_ROWS = 2048
VALIDATION_FILE = "validation.arrow"

_SPOOL_SCHEMA = pa.schema(
    [pa.field(FEATURES, pa.list_(pa.float32())), pa.field(LABEL_ONEHOT, pa.list_(pa.float32()))]
)


@dataclass(frozen=True)
class SpoolCounts:
    train_rows: int
    validation_rows: int


def spool_partition(batches: Iterable[pa.RecordBatch], directory: str) -> SpoolCounts:
    """Write a partition's record batches to ``train.arrow`` and ``validation.arrow``."""
    counts = {TRAIN_FILE: 0, VALIDATION_FILE: 0}
    writers = {
        name: pa.ipc.new_file(os.path.join(directory, name), _SPOOL_SCHEMA) for name in counts
    }
    try:
        for batch in batches:
            if batch.num_rows == 0:
                continue
            flag = batch.column(VALIDATION_FLAG)
            parts = {
                TRAIN_FILE: batch.filter(pc.invert(flag)),
                VALIDATION_FILE: batch.filter(flag),
            }
            for name, part in parts.items():
                # Small record batches bound what a worker streaming from disk holds at once.
                for offset in range(0, part.num_rows, SPOOL_BATCH_ROWS):
                    piece = part.slice(offset, SPOOL_BATCH_ROWS)
                    writers[name].write_batch(
                        pa.record_batch(
                            [piece.column(FEATURES), piece.column(LABEL_ONEHOT)],
                            schema=_SPOOL_SCHEMA,
                        )
                    )
                counts[name] += part.num_rows
    finally:
        for writer in writers.values():
            writer.close()
    return SpoolCounts(counts[TRAIN_FILE], counts[VALIDATION_FILE])


def to_numpy(batch: pa.RecordBatch) -> tuple[np.ndarray, np.ndarray]:
    """(features (n, 784) float32, one-hot labels (n, 10) float32) of a record batch."""
    return (
        _matrix(batch.column(0), FEATURE_DIM, FEATURES),
        _matrix(batch.column(1), NUM_CLASSES, LABEL_ONEHOT),
    )


def _matrix(column: pa.Array, width: int, name: str) -> np.ndarray:
    if column.null_count:
        raise InputDataError(f"{column.null_count} rows have a null {name}")
    values = column.flatten()
    if len(values) != len(column) * width or values.null_count:
        raise InputDataError(
            f"{name} must hold exactly {width} non-null values per row; "
            f"found {len(values)} values in {len(column)} rows"
        )
    return values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, width)


class LocalData:
    """A worker's rows from one spooled file: in memory when within budget, else on disk."""

    def __init__(self, path: str, budget_bytes: int) -> None:
        self.path = path
        self.size_bytes = os.path.getsize(path) if os.path.exists(path) else 0
        self._reader = pa.ipc.open_file(pa.OSFile(path)) if self.size_bytes else None
        self.num_chunks = self._reader.num_record_batches if self._reader else 0
        self.in_memory = self.size_bytes <= budget_bytes
        self._chunks: list[tuple[np.ndarray, np.ndarray]] | None = None
        if self.in_memory and self._reader is not None:
            self._chunks = [to_numpy(self._reader.get_batch(i)) for i in range(self.num_chunks)]
        self.rows = (
            sum(len(x) for x, _ in self._chunks)
            if self._chunks is not None
            else sum(self._reader.get_batch(i).num_rows for i in range(self.num_chunks))
        )

    def chunk(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if self._chunks is not None:
            return self._chunks[i]
        return to_numpy(self._reader.get_batch(i))

    def chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for i in range(self.num_chunks):
            yield self.chunk(i)


def epoch_seed(seed: int, worker: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([seed, worker, epoch])


def row_stream(
    data: LocalData, rng: np.random.Generator, shuffle_buffer: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Endless blocks of rows: passes over the data, shuffled within windows of rows."""
    if data.rows == 0:
        raise InputDataError("this worker received no training rows")
    while True:
        if not shuffle_buffer:
            yield from data.chunks()
            continue
        window: list[tuple[np.ndarray, np.ndarray]] = []
        rows = 0
        for i in rng.permutation(data.num_chunks):
            window.append(data.chunk(int(i)))
            rows += len(window[-1][0])
            if rows >= shuffle_buffer:
                yield _shuffled(window, rng)
                window, rows = [], 0
        if window:
            yield _shuffled(window, rng)


def _shuffled(window, rng) -> tuple[np.ndarray, np.ndarray]:
    x = np.concatenate([c[0] for c in window]) if len(window) > 1 else window[0][0]
    y = np.concatenate([c[1] for c in window]) if len(window) > 1 else window[0][1]
    order = rng.permutation(len(x))
    return x[order], y[order]


def batch_blocks(
    rows: Iterator[tuple[np.ndarray, np.ndarray]], steps: int, batch_size: int, block_batches: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Exactly `steps` batches from `rows`, as arrays of shape (k, batch_size, ...)."""
    remaining = steps * batch_size
    pending_x: list[np.ndarray] = []
    pending_y: list[np.ndarray] = []
    pending = 0
    while remaining:
        want = min(block_batches * batch_size, remaining)
        while pending < want:
            x, y = next(rows)
            pending_x.append(x)
            pending_y.append(y)
            pending += len(x)
        x = np.concatenate(pending_x) if len(pending_x) > 1 else pending_x[0]
        y = np.concatenate(pending_y) if len(pending_y) > 1 else pending_y[0]
        yield (
            x[:want].reshape(-1, batch_size, FEATURE_DIM),
            y[:want].reshape(-1, batch_size, NUM_CLASSES),
        )
        pending_x, pending_y = [x[want:]], [y[want:]]
        pending -= want
        remaining -= want


def epoch_dataset(
    data: LocalData,
    *,
    epoch: int,
    worker: int,
    seed: int,
    steps: int,
    batch_size: int,
    shuffle_buffer: int,
    block_batches: int = 100,
):
    """The worker's `steps` training batches of `epoch`, as a prefetching tf.data pipeline."""
    import tensorflow as tf

    def blocks():
        rng = epoch_seed(seed, worker, epoch)
        yield from batch_blocks(
            row_stream(data, rng, shuffle_buffer), steps, batch_size, block_batches
        )

    dataset = tf.data.Dataset.from_generator(
        blocks,
        output_signature=(
            tf.TensorSpec((None, batch_size, FEATURE_DIM), tf.float32),
            tf.TensorSpec((None, batch_size, NUM_CLASSES), tf.float32),
        ),
    )
    return dataset.unbatch().prefetch(2 * block_batches)


def evaluation_batches(data: LocalData):
    """The rows of `data` once, in order, one record batch (up to ~10,000 rows) at a time."""
    import tensorflow as tf

    return tf.data.Dataset.from_generator(
        data.chunks,
        output_signature=(
            tf.TensorSpec((None, FEATURE_DIM), tf.float32),
            tf.TensorSpec((None, NUM_CLASSES), tf.float32),
        ),
    ).prefetch(1)
