"""Pieces of the training stage that need no Spark job: batching, shuffling, checkpoints."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipeline.config import EarlyStoppingSettings
from pipeline.contract import FEATURE_DIM, FEATURES, LABEL_ONEHOT, NUM_CLASSES
from pipeline.errors import InputDataError, TrainingError
from pipeline.training import data, format_epoch
from pipeline.training.checkpoints import CheckpointDir, arrow_uri, decode, encode
from pipeline.training.data import (
    TRAIN_SPOOL,
    VALIDATION_FLAG,
    VALIDATION_SPOOL,
    LocalData,
    epoch_seed,
    epoch_segments,
    epoch_windows,
    spool_partition,
)
from pipeline.training.progress import STOP, ProgressListener, ProgressSender
from pipeline.training.stopping import EarlyStopping


def _record_batch(ids: np.ndarray, validation: np.ndarray) -> pa.RecordBatch:
    """Rows whose features are all equal to their id, so order can be read back."""
    x = np.repeat(ids.astype(np.float32)[:, None], FEATURE_DIM, axis=1)
    y = np.eye(NUM_CLASSES, dtype=np.float32)[ids % NUM_CLASSES]
    lists = [
        pa.FixedSizeListArray.from_arrays(pa.array(a.ravel()), a.shape[1]).cast(
            pa.list_(pa.float32())
        )
        for a in (x, y)
    ]
    return pa.record_batch(
        [*lists, pa.array(validation)], names=[FEATURES, LABEL_ONEHOT, VALIDATION_FLAG]
    )


@pytest.fixture
def spooled(tmp_path, monkeypatch):
    # Chunks of 256 rows: a few of them, and shuffle windows across them.
    monkeypatch.setattr(data, "SPOOL_BATCH_ROWS", 256)
    ids = np.arange(1000)
    batches = [
        _record_batch(ids[i : i + 300], ids[i : i + 300] % 10 == 0) for i in range(0, 1000, 300)
    ]
    counts = spool_partition(iter(batches), str(tmp_path))
    return tmp_path, counts


def test_spool_adds_up_the_profile_of_the_training_rows_only(tmp_path):
    from pipeline.monitoring.drift import profile_from_sums, profile_sums

    rng = np.random.default_rng(0)
    ids = np.arange(5000)
    validation = ids % 7 == 0
    batch = _record_batch(ids, validation)
    x = rng.random((5000, FEATURE_DIM), dtype=np.float32) * (rng.random((5000, 1)) < 0.8)
    features = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), FEATURE_DIM)
    batch = batch.set_column(0, FEATURES, features.cast(pa.list_(pa.float32())))
    halves = [batch.slice(0, 2500), batch.slice(2500)]
    counts = spool_partition(iter(halves), str(tmp_path), profile_bins=8)
    train = ~validation
    expected = profile_sums(x[train], ids[train] % NUM_CLASSES, 8)
    np.testing.assert_allclose(counts.profile, expected, rtol=1e-9)
    profile = profile_from_sums(counts.profile, 8)
    assert profile.rows == counts.train_rows == int(train.sum())
    assert sum(profile.class_counts) == profile.rows
    assert spool_partition(iter(halves), str(tmp_path)).profile is None  # not asked for


def test_spool_splits_training_and_validation_rows(spooled):
    directory, counts = spooled
    assert (counts.train_rows, counts.validation_rows) == (900, 100)
    train = LocalData(str(directory / TRAIN_SPOOL), budget_bytes=1 << 30)
    validation = LocalData(str(directory / VALIDATION_SPOOL), budget_bytes=1 << 30)
    assert (train.rows, validation.rows) == (900, 100)
    ids = np.concatenate([x[:, 0] for x, _ in validation.chunks()])
    assert set(ids.astype(int) % 10) == {0}


def test_spool_passes_batches_of_one_kind_whole_and_splits_mixed_ones(tmp_path):
    ids = np.arange(600)
    batches = [
        _record_batch(ids[:200], np.zeros(200, bool)),  # training rows only
        _record_batch(ids[200:400], np.ones(200, bool)),  # validation rows only
        _record_batch(ids[400:], ids[400:] % 2 == 0),  # both
    ]
    counts = spool_partition(iter(batches), str(tmp_path))
    assert (counts.train_rows, counts.validation_rows) == (300, 300)
    read = {}
    for name in (TRAIN_SPOOL, VALIDATION_SPOOL):
        data = LocalData(str(tmp_path / name), budget_bytes=1 << 30)
        read[name] = np.concatenate([x[:, 0] for x, _ in data.chunks()]).astype(int)
    assert read[TRAIN_SPOOL].tolist() == [*range(200), *range(401, 600, 2)]
    assert read[VALIDATION_SPOOL].tolist() == [*range(200, 400), *range(400, 600, 2)]


def test_spool_refuses_rows_of_another_width_even_when_the_values_add_up(tmp_path):
    batch = _record_batch(np.arange(4), np.zeros(4, bool))
    values = np.zeros(4 * FEATURE_DIM, np.float32)
    offsets = np.array([0, FEATURE_DIM - 1, 2 * FEATURE_DIM, 3 * FEATURE_DIM, 4 * FEATURE_DIM])
    uneven = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values))
    with pytest.raises(InputDataError, match=f"exactly {FEATURE_DIM} values per row.*783 to 785"):
        spool_partition(iter([batch.set_column(0, FEATURES, uneven)]), str(tmp_path))
    nulls = pa.array(
        [[0.0] * NUM_CLASSES, None, *[[0.0] * NUM_CLASSES] * 2], pa.list_(pa.float32())
    )
    with pytest.raises(InputDataError, match="1 rows have a null label_onehot"):
        spool_partition(iter([batch.set_column(1, LABEL_ONEHOT, nulls)]), str(tmp_path))


def test_a_spool_whose_files_disagree_is_refused(spooled):
    from pipeline.training.data import spool_paths

    directory, _ = spooled
    labels = spool_paths(str(directory / TRAIN_SPOOL))[1]
    with open(labels, "ab") as f:
        f.write(b"\0" * 40)  # one label row more than feature rows
    with pytest.raises(InputDataError, match="damaged"):
        LocalData(str(directory / TRAIN_SPOOL), budget_bytes=1 << 30)


def test_resident_rows_are_mapped_and_the_store_holds_them_without_a_copy(spooled):
    from pipeline.training.loop import _tensor_of

    directory, _ = spooled
    data = LocalData(str(directory / TRAIN_SPOOL), budget_bytes=1 << 30)
    x, y = data.arrays()
    assert isinstance(x, np.memmap) and x.shape == (900, FEATURE_DIM) and y.shape == (900, 10)
    tensor = _tensor_of(x)
    before = x[5, 3]
    x[5, 3] = -1.0  # the mapping is copy-on-write: the spool file is never written
    assert tensor.numpy()[5, 3] == -1.0  # the tensor is that memory, not a copy of it
    on_disk = np.fromfile(data.paths[0], np.float32, FEATURE_DIM, offset=5 * 4 * FEATURE_DIM)
    assert on_disk[3] == before != -1.0
    # Memory not aligned as TensorFlow assumes is copied rather than handed over.
    raw = np.zeros(65 * FEATURE_DIM + 1, np.float32)
    odd = raw[1:].reshape(65, FEATURE_DIM)
    assert odd.ctypes.data % 64
    copied = _tensor_of(odd)
    odd[0, 0] = 7.0
    assert copied.numpy()[0, 0] == 0.0
    with pytest.raises(ValueError, match="memory budget"):
        LocalData(str(directory / TRAIN_SPOOL), budget_bytes=1024).arrays()


def test_read_ahead_keeps_order_raises_in_place_and_lets_an_early_stop_go():
    import threading

    from pipeline.training.data import read_ahead

    assert list(read_ahead(iter(range(50)), depth=2)) == list(range(50))

    def failing():
        yield 1
        yield 2
        raise InputDataError("row group 3 is damaged")

    seen = []
    with pytest.raises(InputDataError, match="row group 3"):
        for item in read_ahead(failing(), depth=2):
            seen.append(item)
    assert seen == [1, 2]

    closed = threading.Event()

    def endless():
        try:
            n = 0
            while True:
                yield n
                n += 1
        finally:
            closed.set()

    items = read_ahead(endless(), depth=2)
    assert [next(items) for _ in range(3)] == [0, 1, 2]
    items.close()  # the consumer stops: the producer ends and closes its source
    assert closed.wait(5)
    assert not [t for t in threading.enumerate() if t.name == "read-ahead"]


def test_small_budget_streams_from_disk_with_the_same_rows(spooled):
    directory, _ = spooled
    memory = LocalData(str(directory / TRAIN_SPOOL), budget_bytes=1 << 30)
    disk = LocalData(str(directory / TRAIN_SPOOL), budget_bytes=1024)
    assert memory.in_memory and not disk.in_memory
    assert memory.rows == disk.rows == 900 and memory.sizes == [256, 256, 256, 132]
    for (a, ay), (b, by) in zip(memory.chunks(), disk.chunks(), strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(ay, by)


def _epoch_ids(data: LocalData, epoch: int, steps: int, shuffle_buffer: int, seed: int = 7):
    """The row ids (features equal the id) of an epoch's batches, as the trainer gathers them:
    from the whole partition in file order when resident, else from each segment's blocks."""
    resident = np.concatenate([x[:, 0] for x, _ in data.chunks()]) if data.in_memory else None
    batches = []
    for segment in epoch_segments(
        data, epoch=epoch, worker=0, seed=seed, steps=steps, batch_size=32,
        shuffle_buffer=shuffle_buffer,
    ):  # fmt: skip
        store = (
            resident if segment.rows is None else np.concatenate([x[:, 0] for x, _ in segment.rows])
        )
        batches.append(store[segment.batches])
    return np.concatenate(batches).astype(int)


def test_epoch_batches_cover_the_data_and_depend_only_on_seed_worker_epoch(spooled):
    directory, _ = spooled
    data = LocalData(str(directory / TRAIN_SPOOL), budget_bytes=1 << 30)
    first = _epoch_ids(data, 1, 28, 10_000)
    assert first.shape == (28, 32)
    assert len(set(first.ravel())) == 28 * 32  # one pass without repeats while rows last
    assert not np.array_equal(first.ravel(), np.sort(first.ravel()))  # shuffled
    np.testing.assert_array_equal(first, _epoch_ids(data, 1, 28, 10_000))  # (seed, epoch)
    assert not np.array_equal(first, _epoch_ids(data, 2, 28, 10_000))
    disk = LocalData(str(directory / TRAIN_SPOOL), budget_bytes=0)
    np.testing.assert_array_equal(first, _epoch_ids(disk, 1, 28, 10_000))


def test_streamed_windows_give_the_resident_order_across_window_boundaries(spooled):
    """Windows of ~300 rows, batches straddling them, and more steps than rows (a wrap)."""
    directory, _ = spooled
    memory = LocalData(str(directory / TRAIN_SPOOL), budget_bytes=1 << 30)
    disk = LocalData(str(directory / TRAIN_SPOOL), budget_bytes=0)
    resident = _epoch_ids(memory, 3, 40, 300)
    streamed = _epoch_ids(disk, 3, 40, 300)
    np.testing.assert_array_equal(resident, streamed)
    assert len(set(resident.ravel()[:900])) == 900  # a whole pass before any row repeats
    windows = epoch_windows(memory.sizes, epoch_seed(7, 0, 3), 300)
    sizes = [len(next(windows)[1]) for _ in range(3)]
    assert all(size >= 300 for size in sizes[:2])


def test_without_shuffle_batches_keep_order_and_wrap_around(spooled):
    directory, _ = spooled
    for budget in (1 << 30, 0):
        data = LocalData(str(directory / TRAIN_SPOOL), budget_bytes=budget)
        ids = _epoch_ids(data, 1, 30, 0).ravel()
        expected = np.array([i for i in range(1000) if i % 10])
        np.testing.assert_array_equal(ids[:900], expected)
        np.testing.assert_array_equal(ids[900:], expected[:60])  # the next pass fills the epoch


def test_a_worker_without_rows_is_an_input_error(tmp_path):
    spool_partition(iter([]), str(tmp_path))
    data = LocalData(str(tmp_path / TRAIN_SPOOL), budget_bytes=1 << 30)
    with pytest.raises(InputDataError, match="no training rows"):
        next(epoch_windows(data.sizes, epoch_seed(1, 0, 1), 0))


def test_checkpoints_round_trip_and_keep_the_newest(tmp_path):
    store = CheckpointDir(str(tmp_path / "checkpoints"))
    assert store.latest() is None
    for epoch in (1, 2, 3):
        store.write(epoch, {"epoch": epoch, "history": []}, {"w000": np.full(3, epoch)})
    assert store.epochs() == [2, 3]
    state, arrays = store.read(3)
    assert state["epoch"] == 3
    np.testing.assert_array_equal(arrays["w000"], [3, 3, 3])
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp")]


def test_a_removed_checkpoint_directory_is_not_written_again(tmp_path):
    """A search deletes a pruned trial's directory while its worker may still be
    finishing an epoch (`TrainingStopped` comes with the stage's cancellation)."""
    import shutil

    trial = tmp_path / "trial"
    store = CheckpointDir(str(trial / "checkpoints"))
    store.write(1, {"epoch": 1, "history": []}, {"w000": np.zeros(2)})
    shutil.rmtree(trial)
    with pytest.raises(TrainingError, match="was removed"):
        store.write(2, {"epoch": 2, "history": []}, {"w000": np.zeros(2)})
    assert not trial.exists()


def test_a_damaged_checkpoint_says_to_start_fresh():
    data = encode({"epoch": 1}, {"w000": np.zeros(2)})
    with pytest.raises(TrainingError, match="--fresh"):
        decode(data[: len(data) // 2], "epoch-0001.npz")


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("file:/tmp/m", "file:///tmp/m"),
        ("file:///tmp/m", "file:///tmp/m"),
        ("/tmp/m", "file:///tmp/m"),
        ("s3a://bucket/m", "s3://bucket/m"),
        ("hdfs://nn:8020/m", "hdfs://nn:8020/m"),
    ],
)
def test_hadoop_uris_become_pyarrow_uris(uri, expected):
    assert arrow_uri(uri) == expected


def test_epoch_line_has_metrics_throughput_and_time_left():
    line = format_epoch(
        {
            "epoch": 2.0,
            "epochs": 10,
            "loss": 0.31234,
            "accuracy": 0.9,
            "val_loss": 0.4,
            "val_accuracy": 0.88,
            "samples_per_second": 123456.7,
            "eta_s": 95,
        }
    )
    assert line == (
        "epoch 2/10  loss 0.3123  accuracy 0.9000  val_loss 0.4000  val_accuracy 0.8800  "
        "123,457 samples/s  1m35s left"
    )


def test_early_stopping_waits_patience_epochs_and_survives_a_checkpoint():
    settings = EarlyStoppingSettings(enabled=True, monitor="val_loss", patience=2)
    stopper = EarlyStopping.from_settings(settings)
    assert stopper.update(1, {"val_loss": 0.5}) == (True, False)
    assert stopper.update(2, {"val_loss": 0.6}) == (False, False)
    resumed = EarlyStopping.from_settings(settings, stopper.state())  # as after a restart
    assert resumed.update(3, {"val_loss": 0.55}) == (False, True)
    assert resumed.best_epoch == 1


def test_early_stopping_on_accuracy_wants_it_higher():
    stopper = EarlyStopping.from_settings(
        EarlyStoppingSettings(enabled=True, monitor="val_accuracy", patience=1)
    )
    assert stopper.update(1, {"val_accuracy": 0.8})[0]
    assert stopper.update(2, {"val_accuracy": 0.9})[0]
    assert stopper.update(3, {"val_accuracy": 0.85}) == (False, True)


def test_the_old_name_of_the_stall_timeout_still_works_with_a_warning():
    from pipeline.config import Config, load_config

    with pytest.warns(FutureWarning, match="train.collective_timeout_s is deprecated"):
        config = load_config(overrides=["train.collective_timeout_s=7"])
    assert config.train.stall_timeout_s == 7
    with pytest.warns(FutureWarning):
        assert (
            Config().with_overrides({"train": {"collective_timeout_s": 9}}).train.stall_timeout_s
            == 9
        )
    assert "collective_timeout_s" not in Config().model_dump()["train"]


def test_checkpoints_every_n_epochs_or_seconds_and_always_at_the_end(monkeypatch):
    from pipeline.config import TrainSettings
    from pipeline.training import worker

    clock = worker._CheckpointClock(*TrainSettings(checkpoint_every=2).checkpoint_interval())
    assert [clock.due(e, last=e == 5) for e in range(1, 6)] == [False, True, False, True, True]
    now = [100.0]
    monkeypatch.setattr(worker.time, "monotonic", lambda: now[0])
    clock = worker._CheckpointClock(*TrainSettings(checkpoint_every="30s").checkpoint_interval())
    due = []
    for epoch, seconds in enumerate([10, 10, 15, 10, 1], start=1):
        now[0] += seconds
        due.append(clock.due(epoch, last=epoch == 5))
    assert due == [False, False, True, False, True]  # 35 s after the start; the last epoch
    with pytest.raises(ValueError, match="seconds"):
        TrainSettings(checkpoint_every="5m")


def test_shares_of_rows_are_contiguous_and_balanced_to_one_row():
    from pipeline.training.inputs import balanced_shares

    rows = [7, 0, 30, 4, 12]
    for workers in (1, 2, 3, 5):
        shares = balanced_shares(rows, workers)
        sizes = [sum(stop - start for _, start, stop in share) for share in shares]
        assert sum(sizes) == sum(rows) and max(sizes) - min(sizes) <= 1
        # Read in worker order, the shares are the rows in file order, each once.
        flat = [(i, r) for share in shares for i, start, stop in share for r in range(start, stop)]
        assert flat == [(i, r) for i, n in enumerate(rows) for r in range(n)]


@pytest.mark.parametrize("label_column", [LABEL_ONEHOT, "label"])
def test_a_share_of_row_groups_spools_its_rows_and_counts_their_classes(tmp_path, label_column):
    import pyarrow.parquet as pq

    from pipeline import rowgroups
    from pipeline.training.data import read_share, spool_share
    from pipeline.training.inputs import balanced_shares

    ids = np.arange(250)
    batch = _record_batch(ids, ids < 0)
    table = pa.table(
        {FEATURES: batch.column(0), LABEL_ONEHOT: batch.column(1), "label": ids % NUM_CLASSES}
    )
    path = str(tmp_path / "part-0.parquet")
    pq.write_table(table, path, row_group_size=100)  # row groups of 100, 100, 50 rows
    footer = pq.read_metadata(path)
    groups = rowgroups.row_groups(path, (tmp_path / "part-0.parquet").stat().st_size, footer)
    shares = balanced_shares([g.rows for g in groups], 2)
    seen = []
    for worker, share in enumerate(shares):
        ranges = [(*groups[i][:4], start, stop, False) for i, start, stop in share]
        directory = tmp_path / f"worker-{worker}"
        directory.mkdir()
        counts = spool_partition(
            read_share(rowgroups.LOCAL, ranges, label_column, batch_rows=40), str(directory)
        )
        assert (counts.train_rows, counts.validation_rows) == (125, 0)
        # Its ranges read and spooled by two threads at once: the same spool, counts and
        # profile, also when its last range is validation rows.
        for kind, mixed in (("train", ranges), ("mixed", [*ranges[:-1], (*ranges[-1][:6], True)])):
            one, two = tmp_path / f"one-{kind}-{worker}", tmp_path / f"two-{kind}-{worker}"
            one.mkdir(), two.mkdir()
            read = read_share(rowgroups.LOCAL, mixed, label_column, batch_rows=40)
            expected = spool_partition(read, str(one), profile_bins=8)
            threaded = spool_share(rowgroups.LOCAL, mixed, label_column, str(two), 8, 40)
            assert threaded.validation_rows == (mixed[-1][5] - mixed[-1][4]) * (kind == "mixed")
            assert (threaded.train_rows, threaded.validation_rows) == (
                expected.train_rows,
                expected.validation_rows,
            )
            assert threaded.train_classes == expected.train_classes
            assert threaded.validation_classes == expected.validation_classes
            np.testing.assert_allclose(threaded.profile, expected.profile, rtol=1e-12)
            for spooled in one.iterdir():
                assert (two / spooled.name).read_bytes() == spooled.read_bytes(), spooled.name
        data = LocalData(str(directory / TRAIN_SPOOL), budget_bytes=1 << 30)
        x, y = (np.concatenate(a) for a in zip(*data.chunks(), strict=True))
        assert np.array_equal(y.argmax(axis=1), x[:, 0].astype(int) % NUM_CLASSES)
        mine = x[:, 0].astype(int)
        assert counts.train_classes == {
            str(c): int(n) for c, n in enumerate(np.bincount(mine % NUM_CLASSES)) if n
        }
        seen.append(mine)
    assert np.array_equal(np.concatenate(seen), ids)  # every row once, in file order

    # A file rewritten since its footer was read is refused, not read.
    pq.write_table(table.slice(0, 200), path, row_group_size=100)
    ranges = [(*groups[0][:4], 0, 100, False)]
    with pytest.raises(InputDataError, match="changed while the job ran"):
        list(read_share(rowgroups.LOCAL, ranges, label_column))
    with pytest.raises(InputDataError, match="changed while the job ran"):
        spool_share(rowgroups.LOCAL, ranges, label_column, str(tmp_path / "worker-0"))

    # Damaged data under an intact footer (same size, same row groups) is an input error
    # that names the file, not a traceback from the task.
    pq.write_table(table, path, row_group_size=100)
    raw = bytearray((tmp_path / "part-0.parquet").read_bytes())
    raw[4:68] = bytes(64)  # the first page header, just after the leading magic bytes
    (tmp_path / "part-0.parquet").write_bytes(bytes(raw))
    groups = rowgroups.row_groups(path, len(raw), pq.read_metadata(path))
    ranges = [(*groups[0][:4], 0, 100, False)]
    with pytest.raises(InputDataError, match=r"cannot read row group 0 of .*part-0\.parquet"):
        list(read_share(rowgroups.LOCAL, ranges, label_column))
    # A share of one range: one reader. Two threads, the damaged group first: its error
    # is the one raised.
    with pytest.raises(InputDataError, match=r"cannot read row group 0 of .*part-0\.parquet"):
        spool_share(rowgroups.LOCAL, ranges, label_column, str(tmp_path / "worker-0"))
    both = [*ranges, (*groups[1][:4], 0, 100, False)]
    with pytest.raises(InputDataError, match=r"cannot read row group 0 of .*part-0\.parquet"):
        spool_share(rowgroups.LOCAL, both, label_column, str(tmp_path / "worker-0"))


def test_the_worker_process_imports_no_spark_before_tensorflow():
    """``python -m pipeline.training.worker`` starts TensorFlow at once: importing it does
    not pull in the driver's orchestration (Spark SQL, the run, the stage)."""
    import subprocess
    import sys

    probe = (
        "import sys, pipeline.training.worker; "
        "print(sorted(m for m in sys.modules if m.startswith('pyspark') "
        "or m in ('pipeline.training.run', 'pipeline.training.fit')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("package", ["pipeline.training", "pipeline.scoring"])
def test_every_name_of_a_package_face_is_its_modules_own(package):
    import importlib

    face = importlib.import_module(package)
    for name in face.__all__:
        module = importlib.import_module(f"{package}.{face._MODULES[name]}")
        assert getattr(face, name) is getattr(module, name)
    assert set(face.__all__) <= set(dir(face))
    with pytest.raises(AttributeError, match="no attribute 'run_everything'"):
        face.run_everything  # noqa: B018


def test_the_driver_answers_an_epoch_with_stop_and_only_that_sender_is_asked_to_stop():
    seen: list[dict] = []

    def on_message(message):
        seen.append(message)
        return STOP if message["epoch"] == 2 else None

    listener = ProgressListener("127.0.0.1", on_message)
    with listener, ProgressSender(listener.address) as sender, ProgressSender(None) as silent:
        sender.send({"event": "epoch", "epoch": 1})
        assert not sender.stop_asked.wait(0.5)  # no answer to epoch 1
        sender.send({"event": "epoch", "epoch": 2})
        assert sender.stop_asked.wait(5)
        assert not silent.stop_asked.is_set()
    assert [m["epoch"] for m in seen] == [1, 2]
