"""A worker's rows: from Arrow record batches to the NumPy blocks its tensor store holds.

A barrier task receives its rows as a stream of Arrow record batches: its Spark
partition, or, for an ingest output, its share of the Parquet row groups read with
pyarrow (`read_share`, planned on the driver by `pipeline.training.inputs.plan_files`).
It spools them, batch by batch, as raw float32 matrices into local files, features and
one-hot labels, training and validation rows apart (`spool_partition`), counting the rows
of each class as they pass: the task never holds more than one record batch, and the
rows are checked there, once. The worker process opens the files with `LocalData`: when
the partition fits the memory budget it maps them, and the trainer's tensor store holds
the mapped rows as they are (no read, no copy; epochs 2..n read no disk); otherwise it
reads one chunk after another, one shuffle window at a time, so a worker's memory stays
bounded whatever the data's size. This module never touches TensorFlow: the trainer
makes its tensor store from these arrays (`pipeline.training.loop`).

No batch is assembled in Python: `epoch_segments` plans an epoch as row positions only.
Each `Segment` names the rows to place in the store (none when the whole partition is
resident) and a ``(steps, batch_size)`` matrix of row positions; the training loop
gathers every batch from the store inside its compiled function. The order (chunks of
``SPOOL_BATCH_ROWS`` rows in a seeded random order, rows shuffled within windows of at least
``shuffle_buffer`` rows, exactly ``steps`` batches, wrapping around when the worker has
fewer rows than its share) is a function of (seed, worker, epoch) alone, the same in
memory and from disk: it is what a checkpoint records as the data position.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import rowgroups
from pipeline.contract import FEATURE_DIM, FEATURES, LABEL, LABEL_ONEHOT, NUM_CLASSES
from pipeline.errors import InputDataError

# Boolean column marking validation rows in the stream a barrier task receives.
VALIDATION_FLAG = "is_validation"

# A split's spool: its rows as raw float32 matrices, features and one-hot labels, in two
# files named from the split's path prefix (`spool_paths`).
TRAIN_SPOOL = "train"
VALIDATION_SPOOL = "validation"
# Rows of a chunk: what a worker streaming from disk reads at once, and the unit of shuffling.
SPOOL_BATCH_ROWS = 2048
# Threads that read and spool an ingest output's share (`spool_share`). On 2 cores, a job
# of 1,000,000 rows read them in 11.7 s against 13.8 s with one reader (README,
# Performance), sharing the cores with TensorFlow's import.
SPOOL_THREADS = 2

_ROW_BYTES = 4 * (FEATURE_DIM + NUM_CLASSES)


def spool_paths(prefix: str) -> tuple[str, str]:
    """The features file (rows of FEATURE_DIM float32) and the labels file (rows of
    NUM_CLASSES float32) of the spool at `prefix`."""
    return f"{prefix}.features.f32", f"{prefix}.labels.f32"


@dataclass(frozen=True)
class SpoolCounts:
    train_rows: int
    validation_rows: int
    # Rows per class ("-1": a one-hot row without a 1), of the training and validation rows.
    train_classes: dict[str, int] = field(default_factory=dict)
    validation_classes: dict[str, int] = field(default_factory=dict)
    # `pipeline.monitoring.drift.profile_sums` of the training rows, when asked for.
    profile: np.ndarray | None = None


def spool_partition(
    batches: Iterable[pa.RecordBatch], directory: str, profile_bins: int | None = None
) -> SpoolCounts:
    """Write a partition's record batches to the spools `TRAIN_SPOOL` and
    `VALIDATION_SPOOL` in `directory`; with `profile_bins`, add up the training rows'
    profile sums as they pass (training records the profile for drift checks without
    reading its rows again). Raises `InputDataError` for rows that are not FEATURE_DIM
    features and NUM_CLASSES label values, all non-null."""
    from pipeline.monitoring.drift import profile_size

    profile = np.zeros(profile_size(profile_bins)) if profile_bins else None
    names = (TRAIN_SPOOL, VALIDATION_SPOOL)
    counts = dict.fromkeys(names, 0)
    classes = {name: np.zeros(NUM_CLASSES + 1, np.int64) for name in names}
    with contextlib.ExitStack() as stack:
        files = {
            name: [
                stack.enter_context(open(path, "wb"))
                for path in spool_paths(os.path.join(directory, name))
            ]
            for name in names
        }
        for batch in batches:
            if batch.num_rows == 0:
                continue
            for name, part in _split_by_flag(batch).items():
                if not part.num_rows:
                    continue
                x, y = to_numpy(part)
                files[name][0].write(np.ascontiguousarray(x))
                files[name][1].write(np.ascontiguousarray(y))
                counts[name] += part.num_rows
                classes[name] += _class_counts(y)
                if profile is not None and name == TRAIN_SPOOL:
                    profile += _profile_sums(x, y, profile_bins)
    return _spool_counts(counts, classes, profile)


def spool_share(
    filesystem: str,
    share: Sequence[Sequence],
    label_column: str,
    directory: str,
    profile_bins: int | None = None,
    batch_rows: int = 10_000,
) -> SpoolCounts:
    """`spool_partition` of `read_share`'s batches, with SPOOL_THREADS threads reading and
    spooling the share's row ranges at once (Parquet decoding takes most of a read).

    The plan gives each range's rows, hence its place in its split's spool: every thread
    writes its rows where they belong, so the spool, the counts and the profile are the
    ones `spool_partition(read_share(...))` makes, whatever order the threads finish in.
    The task holds one record batch per thread. A failed range raises its error (the
    first in the share's order when several fail); the others stop at their next batch.
    A share of one range is read by one thread, decoding ahead of the spooling.
    """
    if len(share) < 2:  # one reader, decoding ahead on a thread of its own
        return spool_partition(
            read_share(filesystem, share, label_column, batch_rows), directory, profile_bins
        )
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.monitoring.drift import profile_size

    names = (TRAIN_SPOOL, VALIDATION_SPOOL)
    places, ends = [], dict.fromkeys(names, 0)
    for item in share:
        name = VALIDATION_SPOOL if item[6] else TRAIN_SPOOL
        places.append((name, ends[name]))
        ends[name] += int(item[5]) - int(item[4])
    widths = (FEATURE_DIM, NUM_CLASSES)
    stop = threading.Event()

    def spool_range(index: int, fds: Sequence[int]) -> tuple[np.ndarray, np.ndarray | None]:
        # `read_share` yields the range's planned rows or raises (rowgroups checks the plan).
        name, at = places[index]
        classes = np.zeros(NUM_CLASSES + 1, np.int64)
        wanted = profile_bins if name == TRAIN_SPOOL else None
        profile = np.zeros(profile_size(wanted)) if wanted else None
        for batch in _read_share(filesystem, [share[index]], label_column, batch_rows):
            if stop.is_set():
                break
            x, y = to_numpy(batch)
            for fd, matrix, width in zip(fds, (x, y), widths, strict=True):
                _write_at(fd, matrix, 4 * width * at)
            at += batch.num_rows
            classes += _class_counts(y)
            if profile is not None:
                profile += _profile_sums(x, y, wanted)
        return classes, profile

    with contextlib.ExitStack() as stack:
        fds = {}
        for name in names:
            fds[name] = []
            for path, width in zip(spool_paths(os.path.join(directory, name)), widths, strict=True):
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                stack.callback(os.close, fd)
                os.ftruncate(fd, 4 * width * ends[name])
                fds[name].append(fd)
        pool = stack.enter_context(ThreadPoolExecutor(SPOOL_THREADS, "spool"))
        futures = [pool.submit(spool_range, i, fds[places[i][0]]) for i in range(len(share))]
        try:
            done = [future.result() for future in futures]
        except BaseException:
            stop.set()
            for future in futures:
                future.cancel()
            raise
    classes = {name: np.zeros(NUM_CLASSES + 1, np.int64) for name in names}
    profile = np.zeros(profile_size(profile_bins)) if profile_bins else None
    for (name, _), (counted, summed) in zip(places, done, strict=True):
        classes[name] += counted
        if profile is not None and summed is not None:
            profile += summed
    return _spool_counts(ends, classes, profile)


def _spool_counts(
    rows: dict[str, int], classes: dict[str, np.ndarray], profile: np.ndarray | None
) -> SpoolCounts:
    """The counts of a spool from its rows and class counts by split name."""
    return SpoolCounts(
        rows[TRAIN_SPOOL],
        rows[VALIDATION_SPOOL],
        _named_counts(classes[TRAIN_SPOOL]),
        _named_counts(classes[VALIDATION_SPOOL]),
        profile,
    )


def _write_at(fd: int, matrix: np.ndarray, offset: int) -> None:
    """All of `matrix`'s bytes into file `fd` at `offset` (one call may write fewer)."""
    view = memoryview(np.ascontiguousarray(matrix)).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _split_by_flag(batch: pa.RecordBatch) -> dict[str, pa.RecordBatch]:
    """A batch's training and validation rows. A batch of an ingest output's share is all
    one or all the other (its flag is per row range): it is passed on whole, not copied."""
    flag = batch.column(VALIDATION_FLAG)
    if not flag.null_count:  # (a null flag is neither: `filter` leaves such rows out)
        validation = pc.sum(flag).as_py() or 0
        if validation == 0:
            return {TRAIN_SPOOL: batch, VALIDATION_SPOOL: batch.slice(0, 0)}
        if validation == batch.num_rows:
            return {TRAIN_SPOOL: batch.slice(0, 0), VALIDATION_SPOOL: batch}
    return {TRAIN_SPOOL: batch.filter(pc.invert(flag)), VALIDATION_SPOOL: batch.filter(flag)}


def _profile_sums(x: np.ndarray, y: np.ndarray, bins: int) -> np.ndarray:
    """`profile_sums` of rows `x` with one-hot labels `y`, a slice at a time (its
    temporaries stay small)."""
    from pipeline.monitoring.drift import profile_size, profile_sums

    total = np.zeros(profile_size(bins))
    for offset in range(0, len(x), SPOOL_BATCH_ROWS):
        piece = slice(offset, offset + SPOOL_BATCH_ROWS)
        total += profile_sums(x[piece], _classes(y[piece], missing=-1), bins)
    return total


def _class_counts(y: np.ndarray) -> np.ndarray:
    """Rows per class of one-hot labels `y`, the last entry counting rows without a 1."""
    return np.bincount(_classes(y, missing=NUM_CLASSES), minlength=NUM_CLASSES + 1)


def _classes(y: np.ndarray, missing: int) -> np.ndarray:
    """The class of each one-hot row of `y`: where its first 1 is, else `missing`."""
    hot = y == 1.0
    return np.where(hot.any(axis=1), hot.argmax(axis=1), missing)


def _named_counts(counts: np.ndarray) -> dict[str, int]:
    named = {str(c): int(n) for c, n in enumerate(counts[:NUM_CLASSES]) if n}
    if counts[NUM_CLASSES]:
        named["-1"] = int(counts[NUM_CLASSES])
    return named


def add_counts(*counts: dict[str, int]) -> dict[str, int]:
    """Rows per class of several counts together, classes sorted as text (as Spark's)."""
    total: dict[str, int] = {}
    for each in counts:
        for label, n in each.items():
            total[label] = total.get(label, 0) + int(n)
    return {label: total[label] for label in sorted(total)}


# -- an ingest output's row groups, read by the task itself -------------------------------
def read_share(
    filesystem: str,
    share: Sequence[Sequence],
    label_column: str,
    batch_rows: int = 10_000,
) -> Iterator[pa.RecordBatch]:
    """A worker's share of an ingest output as the record batches `spool_partition` takes.

    `share` lists row ranges, each ``(path, group, rows, file_size, start, stop,
    validation)``: rows ``start:stop`` of row group `group` of the file at `path` (in the
    plan's `filesystem`), as the footer described it when the job planned the reads.
    `label_column` is `label_onehot`, read as it is, or `label`, one-hot encoded here.
    Raises `InputDataError` when a file changed since then or its data cannot be read.
    """
    # Parquet decoding releases the GIL: the next batches are read on a thread while the
    # caller spools this one (on two cores, about a third of the read's time).
    return read_ahead(_read_share(filesystem, share, label_column, batch_rows), depth=2)


def _read_share(
    filesystem: str, share: Sequence[Sequence], label_column: str, batch_rows: int
) -> Iterator[pa.RecordBatch]:
    fs = rowgroups.filesystem(filesystem)
    for path, group, rows, size, start, stop, validation in share:
        item = rowgroups.RowGroup(path, int(group), int(rows), int(size), None)
        offset = 0
        try:
            for batch in rowgroups.read_row_group(fs, item, [FEATURES, label_column], batch_rows):
                lo, hi = max(start - offset, 0), min(stop - offset, batch.num_rows)
                offset += batch.num_rows
                if lo < hi:
                    yield _spool_batch(batch.slice(lo, hi - lo), label_column, validation)
                if offset >= stop:
                    break
        except rowgroups.InputChanged as exc:
            raise InputDataError(
                f"the training input changed while the job ran: {exc}; rerun on stable input"
            ) from None
        except rowgroups.UnreadableRowGroup as exc:
            raise InputDataError(str(exc)) from None


def read_ahead(items: Iterator, depth: int) -> Iterator:
    """`items`, produced on a thread up to `depth` ahead of the consumer; an exception
    of the producer is raised to the consumer at its place in the sequence."""
    import queue
    import threading

    ahead: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def offer(entry) -> bool:
        """Queue `entry` once there is room; False when the consumer has stopped."""
        while not stop.is_set():
            with contextlib.suppress(queue.Full):
                ahead.put(entry, timeout=0.1)
                return True
        return False

    def produce() -> None:
        try:
            for item in items:
                if not offer((item, None)):
                    return
            offer((end, None))
        except BaseException as exc:  # handed to the consumer, raised there
            offer((end, exc))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, daemon=True, name="read-ahead")
    thread.start()
    try:
        while True:
            item, error = ahead.get()
            if error is not None:
                raise error
            if item is end:
                return
            yield item
    finally:
        stop.set()  # the consumer stopped early or failed: let the producer go
        while thread.is_alive():
            with contextlib.suppress(queue.Empty):
                ahead.get(timeout=0.1)


def _spool_batch(batch: pa.RecordBatch, label_column: str, validation: bool) -> pa.RecordBatch:
    float_lists = pa.list_(pa.float32())
    labels = batch.column(label_column)
    if label_column == LABEL:
        codes = labels.to_numpy(zero_copy_only=False)
        known = (codes >= 0) & (codes < NUM_CLASSES)
        onehot = np.zeros((len(codes), NUM_CLASSES), np.float32)
        onehot[np.flatnonzero(known), codes[known].astype(np.int64)] = 1.0
        labels = pa.FixedSizeListArray.from_arrays(pa.array(onehot.ravel()), NUM_CLASSES)
    return pa.record_batch(
        [
            batch.column(FEATURES).cast(float_lists),
            labels.cast(float_lists),
            pa.array(np.full(batch.num_rows, validation)),
        ],
        names=[FEATURES, LABEL_ONEHOT, VALIDATION_FLAG],
    )


def to_numpy(batch: pa.RecordBatch) -> tuple[np.ndarray, np.ndarray]:
    """(features (n, 784) float32, one-hot labels (n, 10) float32) of a record batch."""
    return (
        _matrix(batch.column(FEATURES), FEATURE_DIM, FEATURES),
        _matrix(batch.column(LABEL_ONEHOT), NUM_CLASSES, LABEL_ONEHOT),
    )


def _matrix(column: pa.Array, width: int, name: str) -> np.ndarray:
    if column.null_count:
        raise InputDataError(f"{column.null_count} rows have a null {name}")
    if len(column):
        lengths = pc.min_max(pc.list_value_length(column)).as_py()
        if lengths["min"] != width or lengths["max"] != width:
            raise InputDataError(
                f"{name} must hold exactly {width} values per row; found rows of "
                f"{lengths['min']} to {lengths['max']}"
            )
    values = column.flatten()  # honours the array's slice offset, unlike `.values`
    if values.null_count:
        raise InputDataError(f"{name} holds {values.null_count} null values")
    return values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, width)


class LocalData:
    """A worker's rows in one spool (`spool_paths` of `prefix`), in chunks of
    SPOOL_BATCH_ROWS rows.

    `in_memory` says whether the rows fit `budget_bytes`: then the files are mapped, and
    `arrays` gives all the rows at once without reading or copying them (the trainer's
    tensor store holds them as they are); otherwise each chunk is read when asked for,
    and the trainer streams them back window by window.
    """

    def __init__(self, prefix: str, budget_bytes: int) -> None:
        self.paths = spool_paths(prefix)
        sizes = [os.path.getsize(p) if os.path.exists(p) else 0 for p in self.paths]
        self.rows = sizes[0] // (4 * FEATURE_DIM)
        if sizes != [4 * FEATURE_DIM * self.rows, 4 * NUM_CLASSES * self.rows]:
            raise InputDataError(f"the spool at {prefix} is damaged: files of {sizes} bytes")
        step = SPOOL_BATCH_ROWS
        self.sizes = [min(step, self.rows - at) for at in range(0, self.rows, step)]
        self.num_chunks = len(self.sizes)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes, dtype=np.int64)])
        self.nbytes = self.rows * _ROW_BYTES
        self.in_memory = self.nbytes <= budget_bytes
        # Mapped only when resident anyway: mapped pages a worker has touched count in its
        # resident memory for as long as the mapping lives, which would then grow with the
        # data. Copy-on-write, so that they are writable arrays to hand on, never written.
        self._mapped = self._map() if self.in_memory else None

    def _map(self) -> tuple[np.ndarray, np.ndarray]:
        if not self.rows:
            return np.empty((0, FEATURE_DIM), np.float32), np.empty((0, NUM_CLASSES), np.float32)
        return tuple(
            np.memmap(path, np.float32, "c", shape=(self.rows, width))
            for path, width in zip(self.paths, (FEATURE_DIM, NUM_CLASSES), strict=True)
        )

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """All the rows, (features, labels), mapped from the files: only when `in_memory`."""
        if self._mapped is None:
            raise ValueError("the rows exceed the memory budget: read them chunk by chunk")
        return self._mapped

    def chunk(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        start, stop = int(self.offsets[i]), int(self.offsets[i + 1])
        if self._mapped is not None:
            return self._mapped[0][start:stop], self._mapped[1][start:stop]
        return tuple(
            np.fromfile(path, np.float32, (stop - start) * width, offset=4 * width * start).reshape(
                -1, width
            )
            for path, width in zip(self.paths, (FEATURE_DIM, NUM_CLASSES), strict=True)
        )

    def chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for i in range(self.num_chunks):
            yield self.chunk(i)


def epoch_seed(seed: int, worker: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([seed, worker, epoch])


def epoch_windows(
    sizes: list[int], rng: np.random.Generator, shuffle_buffer: int
) -> Iterator[tuple[list[int], np.ndarray]]:
    """Endless shuffle windows: (chunk indices, the window's rows in training order).

    Rows are positions in the concatenation of the window's chunks, in the listed order.
    Passes over the data follow each other; each pass takes the chunks in a random order,
    grouped into windows of at least `shuffle_buffer` rows, each window shuffled.
    """
    if not sum(sizes):
        raise InputDataError("this worker received no training rows")
    while True:
        if not shuffle_buffer:
            for i, size in enumerate(sizes):
                if size:
                    yield [i], np.arange(size)
            continue
        window: list[int] = []
        rows = 0
        for i in rng.permutation(len(sizes)):
            window.append(int(i))
            rows += sizes[i]
            if rows >= shuffle_buffer:
                yield window, rng.permutation(rows)
                window, rows = [], 0
        if rows:
            yield window, rng.permutation(rows)


@dataclass(frozen=True)
class Segment:
    """Batches drawn from the worker's tensor store.

    `rows` are (features, labels) blocks to place one after another at the start of the
    store before the batches run; None means that the store already holds the whole
    partition in file order. `batches` holds, for each step, its rows' store positions.
    """

    rows: list[tuple[np.ndarray, np.ndarray]] | None
    batches: np.ndarray  # (steps, batch_size) int32


def store_rows(data: LocalData, shuffle_buffer: int, batch_size: int) -> int:
    """How many rows the tensor store needs for `data` (all of them when resident)."""
    if data.in_memory:
        return data.rows
    largest = max(data.sizes, default=0)
    window = shuffle_buffer + largest if shuffle_buffer else largest
    return min(data.rows, window) + batch_size


def epoch_segments(
    data: LocalData,
    *,
    epoch: int,
    worker: int,
    seed: int,
    steps: int,
    batch_size: int,
    shuffle_buffer: int,
) -> Iterator[Segment]:
    """The worker's `steps` training batches of `epoch`, as store segments."""
    windows = epoch_windows(data.sizes, epoch_seed(seed, worker, epoch), shuffle_buffer)
    total = steps * batch_size
    if data.in_memory:
        order = np.empty(total, np.int64)
        filled = 0
        while filled < total:
            chunks, positions = next(windows)
            ids = np.concatenate([np.arange(data.offsets[c], data.offsets[c + 1]) for c in chunks])
            take = min(len(positions), total - filled)
            order[filled : filled + take] = ids[positions[:take]]
            filled += take
        yield Segment(None, order.astype(np.int32).reshape(steps, batch_size))
        return
    # Streaming: a window's chunks are read from disk; a batch that straddles two windows
    # carries its first rows (fewer than a batch) over, as the next segment's first block.
    carry = (np.empty((0, FEATURE_DIM), np.float32), np.empty((0, NUM_CLASSES), np.float32))
    remaining = total
    while remaining:
        chunks, positions = next(windows)
        blocks = [carry, *(data.chunk(c) for c in chunks)]
        starts = np.cumsum([0] + [len(b[0]) for b in blocks])
        take = min(len(positions), remaining)
        order = np.concatenate([np.arange(starts[1]), starts[1] + positions[:take]])
        full = len(order) // batch_size * batch_size
        carry = _pick(blocks, starts, order[full:])
        remaining -= take
        if full:
            yield Segment(blocks, order[:full].astype(np.int32).reshape(-1, batch_size))
        blocks = None  # let the window go before the next one is read


def _pick(blocks, starts: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rows at `positions` of the concatenated `blocks`, in that order (a few rows)."""
    which = np.searchsorted(starts, positions, side="right") - 1
    rows = [
        (blocks[b][0][p - starts[b]], blocks[b][1][p - starts[b]])
        for b, p in zip(which, positions, strict=True)
    ]
    if not rows:
        return blocks[0][0][:0], blocks[0][1][:0]
    return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])
