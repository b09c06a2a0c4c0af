"""The training stage on Spark in local mode: exactness, uneven data, faults, resume, slots."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import time
from collections import Counter

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.artifact import model_from_bytes, read_model_dir
from pipeline.config import Config, TrainSettings
from pipeline.contract import FEATURES, LABEL_ONEHOT, NUM_CLASSES
from pipeline.errors import (
    ConfigError,
    EnvironmentProblem,
    InputDataError,
    TrainingError,
    TrainingStopped,
)
from pipeline.storage import Storage
from pipeline.training import fit_partitions, run_training
from pipeline.training.checkpoints import CheckpointDir
from pipeline.training.data import VALIDATION_FLAG
from tests import faults

BATCH = 32


def _rows(pixels: np.ndarray, labels: np.ndarray) -> list[tuple]:
    x = (pixels / 255.0).astype(np.float32)
    y = np.eye(NUM_CLASSES, dtype=np.float32)[labels]
    return [(xi.tolist(), yi.tolist(), False) for xi, yi in zip(x, y, strict=True)]


def _frame(spark, partitions: list[list[tuple]]):
    """A DataFrame whose partitions are exactly `partitions`, rows in order."""
    rdd = spark.sparkContext.parallelize(partitions, len(partitions)).flatMap(lambda part: part)
    sizes = rdd.glom().map(len).collect()
    assert sizes == [len(p) for p in partitions], "parallelize did not keep the slices"
    return spark.createDataFrame(
        rdd,
        f"{FEATURES} array<float>, {LABEL_ONEHOT} array<float>, {VALIDATION_FLAG} boolean",
    )


def _weights(settings: TrainSettings, model_bytes: bytes) -> list[np.ndarray]:
    from pipeline.artifact import Metadata, sha256_bytes
    from pipeline.config import IngestSettings

    metadata = Metadata(
        feature_dim=784,
        classes=NUM_CLASSES,
        model_sha256=sha256_bytes(model_bytes),
        preprocessing=IngestSettings(),
        train=settings,
        workers=settings.workers,
        epochs_completed=0,
        seed=settings.seed,
    )
    return model_from_bytes(metadata, model_bytes).get_weights()


@pytest.fixture(scope="module")
def blocks(sample_pixels):
    """512 digits as two halves A and B of 8 batches of 32 each."""
    pixels, labels = sample_pixels
    rows = _rows(pixels[:512], labels[:512])
    return rows[:256], rows[256:]


@pytest.mark.slow
def test_two_workers_equal_one_worker_at_twice_the_batch(spark, tmp_path, blocks):
    """Exactness of the all-reduce: after every step all workers hold the same weights, and
    workers 0 and 1 at batch 32 take the step one worker takes at batch 64 on A_i + B_i."""
    a, b = blocks
    # The same loop on both sides (exact sync runs without XLA): equal to rounding.
    common = {
        "epochs": 2,
        "shuffle_buffer": 0,
        "steps_per_call": 3,
        "seed": 5,
        "jit_compile": False,
    }
    two = TrainSettings(**common, workers=2, batch_size=BATCH, sync="exact")
    one = TrainSettings(**common, workers=1, batch_size=2 * BATCH)
    interleaved = [
        row for i in range(0, len(a), BATCH) for row in (*a[i : i + BATCH], *b[i : i + BATCH])
    ]

    fit_two = fit_partitions(spark, _frame(spark, [a, b]), two, checkpoint_dir=str(tmp_path / "c2"))
    fit_one = fit_partitions(
        spark, _frame(spark, [interleaved]), one, checkpoint_dir=str(tmp_path / "c1")
    )

    digests = {w["weights_digest"] for w in fit_two.workers}
    assert len(fit_two.workers) == 2 and len(digests) == 1  # bit-identical on both workers
    assert [w["samples"] for w in fit_two.workers] == [2 * 256, 2 * 256]
    w2, w1 = _weights(two, fit_two.model_bytes), _weights(one, fit_one.model_bytes)
    initial = _weights(one, _initial_model_bytes(one))
    for after_two, after_one, before in zip(w2, w1, initial, strict=True):
        assert not np.allclose(after_one, before)  # training moved the weights
        np.testing.assert_allclose(after_two, after_one, rtol=0, atol=1e-6)
    for r2, r1 in zip(fit_two.history, fit_one.history, strict=True):
        assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-4)
        assert r2["accuracy"] == pytest.approx(r1["accuracy"])


def _initial_model_bytes(settings: TrainSettings) -> bytes:
    from pipeline.artifact import model_to_bytes
    from pipeline.model import build_model

    return model_to_bytes(build_model(settings))


@pytest.mark.slow
def test_uneven_partitions_finish_with_the_same_steps_everywhere_on_reserved_ports(
    spark, tmp_path, sample_pixels
):
    pixels, labels = sample_pixels
    rows = _rows(pixels[:1000], labels[:1000])
    settings = TrainSettings(
        workers=2, epochs=2, sync="local_sgd", average_every=10, checkpoint_every=5
    )
    fit = fit_partitions(
        spark, _frame(spark, [rows[:850], rows[850:]]), settings, checkpoint_dir=str(tmp_path)
    )
    # Every 5 epochs, and always after the last one: epoch 2's checkpoint only.
    assert sorted(p.name for p in tmp_path.glob("epoch-*")) == ["epoch-0002.npz"]
    assert [w["train_rows"] for w in fit.workers] == [850, 150]
    steps = -(-1000 // (2 * BATCH))  # ceil(1000 / 64) = 16 steps per epoch on both
    assert [w["samples"] for w in fit.workers] == [2 * steps * BATCH] * 2
    assert len({w["weights_digest"] for w in fit.workers}) == 1  # averaged at the epoch end
    assert fit.epochs_completed == 2
    assert fit.history[-1]["loss"] < fit.history[0]["loss"]
    _check_grpc_servers(fit.workers)


def _check_grpc_servers(workers: list[dict]) -> None:
    """Each worker's gRPC server uses the port its executor reserved (the one in TF_CONFIG)."""
    addresses = [w["address"] for w in workers]
    assert len(set(addresses)) == 2
    for worker in workers:
        host, port = worker["address"].rsplit(":", 1)
        listen_ports = {a.rsplit(":", 1)[1] for a in worker["grpc_listen"]}
        assert listen_ports == {port}  # one server, on the port in TF_CONFIG
        hosts = {a.rsplit(":", 1)[0] for a in worker["grpc_listen"]}
        assert hosts <= {host, "::", "0.0.0.0"}
        # A known limit: TensorFlow 2.21 binds its gRPC server to every interface
        # ("0.0.0.0:" + port is hard-coded in GrpcServer::Init) whatever the cluster spec
        # says. When this fails, TensorFlow has fixed it: require hosts == {host} instead.
        assert hosts & {"::", "0.0.0.0"}


@pytest.mark.slow
def test_two_workers_train_on_a_union_of_training_and_validation_rows(spark, tmp_path, blocks):
    """A union with as many partitions as workers (training rows plus a validation
    dataset, one partition each) is shuffled first: a barrier stage refuses a union."""
    a, b = blocks
    validation = [(x, y, True) for x, y, _ in b[:64]]
    data = _frame(spark, [a[:200]]).unionByName(_frame(spark, [validation]))
    assert data.rdd.getNumPartitions() == 2
    settings = TrainSettings(workers=2, epochs=1)
    fit = fit_partitions(spark, data, settings, checkpoint_dir=str(tmp_path))
    assert sum(w["train_rows"] for w in fit.workers) == 200
    assert sum(w["validation_rows"] for w in fit.workers) == 64


@pytest.mark.slow
def test_two_workers_train_on_one_file_whose_row_group_spark_reads_in_one_split(spark, tmp_path):
    """One 12 MB row group that Spark reads as two splits, one of them empty: the job
    spreads the rows over both workers instead of leaving one without rows."""
    rng = np.random.default_rng(0)
    x = rng.random((4000, 784), dtype=np.float32)
    features = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 784)
    table = pa.table(
        {FEATURES: features.cast(pa.list_(pa.float32())), "label": np.arange(4000) % 10}
    )
    path = tmp_path / "features.parquet"
    pq.write_table(table, path, row_group_size=4000, compression="none")
    assert spark.read.parquet(str(path)).rdd.getNumPartitions() == 2
    config = Config().with_overrides({"train": {"epochs": 1, "workers": 2, "hidden_units": [8]}})
    result = run_training(spark, config, str(path), str(tmp_path / "model"))
    assert all(w["train_rows"] > 1000 for w in result.fit.workers)


@pytest.mark.slow
def test_a_worker_without_rows_stops_the_stage_with_an_input_error(spark, tmp_path, blocks):
    a, _ = blocks
    settings = TrainSettings(workers=2, epochs=1)
    with pytest.raises(InputDataError, match=r"worker\(s\) \[1\] received no training rows"):
        fit_partitions(spark, _frame(spark, [a, []]), settings, checkpoint_dir=str(tmp_path))
    assert not list(tmp_path.glob("epoch-*"))


def test_too_few_slots_fail_fast_naming_the_slots_and_the_setting(spark, tmp_path, ingested_sample):
    with pytest.raises(EnvironmentProblem) as caught:
        run_training(spark, Config(), ingested_sample, str(tmp_path / "model"), workers=3)
    message = str(caught.value)
    assert "--workers 3 needs 3 free task slots" in message
    assert "has 2 (master local[" in message
    assert "train.workers" in message and "local[3]" in message
    assert not (tmp_path / "model").exists()


@pytest.mark.slow
def test_killed_worker_is_retried_and_resumes_from_its_checkpoint(
    spark, tmp_path, ingested_sample, caplog
):
    model_dir = tmp_path / "model"
    config = Config().with_overrides({"train": {"epochs": 4, "workers": 2, "sync": "exact"}})
    killed: list[int] = []

    def kill_the_last_worker(record):
        # Runs on the driver when worker 0 reports epoch 1, after writing its checkpoint:
        # the last worker's TensorFlow process dies, as a crashed or OOM-killed one would.
        if not killed:
            victim = faults.training_workers()[1]
            victim.kill()
            killed.append(victim.pid)

    with caplog.at_level(logging.INFO, logger="pipeline.training"):
        result = run_training(
            spark, config, ingested_sample, str(model_dir), on_epoch=kill_the_last_worker
        )
    assert killed  # the fault did happen
    (resumed,) = result.fit.resumed_from
    assert 1 <= resumed < 4  # exact sync: the others could not finish without it
    assert f"resuming from the checkpoint of epoch {resumed}" in caplog.text
    assert [h["epoch"] for h in result.history] == [1.0, 2.0, 3.0, 4.0]
    assert result.metadata.epochs_completed == 4
    assert len({w["weights_digest"] for w in result.fit.workers}) == 1
    # the published directory is complete and verifies
    metadata, _ = read_model_dir(Storage(spark), str(model_dir))
    assert metadata.workers == 2 and metadata.history[-1]["accuracy"] > 0.8


def test_training_stops_when_on_epoch_asks_and_its_worker_trains_no_further(
    spark, tmp_path, ingested_sample
):
    model_dir = tmp_path / "model"
    config = Config().with_overrides({"train": {"epochs": 60, "checkpoint_every": 1}})
    seen: list[int] = []

    def stop_after_epoch_2(record) -> bool:
        seen.append(int(record["epoch"]))
        return record["epoch"] == 2

    with pytest.raises(TrainingStopped) as caught:
        run_training(spark, config, ingested_sample, str(model_dir), on_epoch=stop_after_epoch_2)
    assert caught.value.epoch == 2 and seen == [1, 2]
    assert not (model_dir / "model.keras").exists()  # nothing published
    # Worker 0 stops before its first checkpoint after the answer reaches it: epoch 3's,
    # or a later one if epochs (a tenth of a second each here) ended before the answer
    # came. Without being told, it trained on until Spark's cancellation reached its
    # process: all 60 epochs on this sample.
    time.sleep(3)
    assert 2 <= CheckpointDir(str(model_dir / "checkpoints")).latest() < 10


@pytest.mark.slow
def test_rerun_resumes_fresh_starts_over_epochs_never_go_back_and_changes_are_refused(
    spark, tmp_path, ingested_sample
):
    model_dir = str(tmp_path / "model")

    def train(epochs, fresh=False, data=ingested_sample, **settings):
        overrides = {"train": {"epochs": epochs, "steps_per_call": 50, **settings}}
        return run_training(spark, Config().with_overrides(overrides), data, model_dir, fresh=fresh)

    first = train(2)
    assert first.fit.resumed_from == [] and first.metadata.epochs_completed == 2
    # Resuming with another model, or on other data, is refused before any epoch runs.
    with pytest.raises(ConfigError, match=r"train.hidden_units.*--fresh"):
        train(3, hidden_units=[16])
    fewer = str(tmp_path / "fewer")
    spark.read.parquet(ingested_sample).limit(5000).write.parquet(fewer)
    with pytest.raises(ConfigError, match=r"\(epoch 2\) trained on other data .*--fresh"):
        train(3, data=fewer)
    assert not (tmp_path / "model" / "checkpoints" / "epoch-0003.npz").exists()

    longer = train(3)  # the same command with more epochs picks up where it stopped
    assert longer.fit.resumed_from == [2]
    assert [h["epoch"] for h in longer.history] == [1.0, 2.0, 3.0]
    assert longer.history[:2] == first.history  # carried in the checkpoint
    shorter = train(2)  # asking for fewer epochs never rolls the model back
    assert shorter.metadata.epochs_completed == 3
    assert shorter.fit.workers[0]["weights_digest"] == longer.fit.workers[0]["weights_digest"]
    fresh = train(1, fresh=True)
    assert fresh.fit.resumed_from == [] and fresh.metadata.epochs_completed == 1
    same_seed = ("loss", "accuracy")  # same seed, same first epoch
    assert [fresh.history[0][k] for k in same_seed] == [first.history[0][k] for k in same_seed]


@pytest.mark.slow
def test_validation_early_stopping_tensorboard_and_the_artifact(spark, tmp_path, ingested_sample):
    model_dir = tmp_path / "model"
    # A learning rate this high makes the validation loss rise after the first epochs:
    # with a patience of 1, training must stop before the last epoch.
    config = Config().with_overrides(
        {
            "train": {
                "epochs": 6,
                "learning_rate": 0.5,
                "validation_fraction": 0.2,
                "early_stopping": {"enabled": True, "monitor": "val_loss", "patience": 1},
                "tensorboard": True,
            }
        }
    )
    result = run_training(spark, config, ingested_sample, str(model_dir))
    history = result.history
    assert all("val_loss" in h and "val_accuracy" in h for h in history)
    worker = result.fit.workers[0]
    assert 0.15 * 6000 < worker["validation_rows"] < 0.25 * 6000
    assert worker["train_rows"] + worker["validation_rows"] == 6000
    val_losses = [h["val_loss"] for h in history]
    assert worker["stopped_early"] and len(history) < 6
    assert val_losses[-1] > val_losses[-2]  # stopped on the first epoch without progress
    assert worker["best_epoch"] == len(history) - 1 == 1 + val_losses.index(min(val_losses))

    metadata = json.loads((model_dir / "metadata.json").read_text())
    assert metadata["feature_dim"] == 784 and metadata["classes"] == NUM_CLASSES
    assert metadata["epochs_completed"] == len(history)
    assert metadata["data"]["rows"] == 6000 and metadata["data"]["files"]
    assert len(metadata["data"]["sha256"]) == 64
    assert metadata["versions"]["tensorflow"] and metadata["versions"]["spark"]
    assert metadata["preprocessing"]["layout"] == "auto"
    assert metadata["samples_per_second"] > 0
    assert (model_dir / "history.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    loaded_metadata, model_bytes = read_model_dir(Storage(spark), str(model_dir))
    model = model_from_bytes(loaded_metadata, model_bytes)
    assert len(model.get_weights()) == 4
    assert os.path.exists(model_dir / "checkpoints")

    scalars = _tensorboard_scalars(model_dir / "logs")
    for key in ("loss", "accuracy", "val_loss", "val_accuracy", "samples_per_second"):
        steps = [step for step, _ in scalars[f"epoch_{key}"]]
        assert steps == list(range(1, len(history) + 1)), key  # one scalar per epoch
    for (_, logged), record in zip(scalars["epoch_val_loss"], history, strict=True):
        assert logged == pytest.approx(record["val_loss"], rel=1e-6)


def _tensorboard_scalars(logs) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the event files under `logs`, by tag: [(step, value)] in order."""
    import tensorflow as tf

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(logs.rglob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                number = float(tf.make_ndarray(value.tensor))
                scalars.setdefault(value.tag, []).append((event.step, number))
    return scalars


@pytest.mark.slow
def test_a_stalled_worker_fails_the_job_naming_the_stall_timeout(
    spark, tmp_path, ingested_sample, caplog
):
    """A stall is final: the first attempt's error ends the job, Spark never reruns it."""
    # The timeout must end the job before TensorFlow's coordination service notices that
    # the stopped peer sent no heartbeat (10 s): that ends the worker with another exit
    # code, which Spark retries, and the retry succeeds. Healthy runs on a heavily loaded
    # machine can go 5 s without progress at start-up: this test wants a quiet machine.
    config = Config().with_overrides(
        {"train": {"epochs": 4, "workers": 2, "sync": "local_sgd", "stall_timeout_s": 5}}
    )
    paused: list = []

    def pause_the_last_worker(record):
        # Runs on the driver when worker 0 reports epoch 1: the last worker's TensorFlow
        # process stops (SIGSTOP), alive but never reaching another collective.
        if not paused:
            victim = faults.training_workers()[1]
            victim.send_signal(signal.SIGSTOP)
            paused.append(victim)

    try:
        with (
            caplog.at_level(logging.INFO, logger="pipeline.training"),
            pytest.raises(TrainingError) as caught,
        ):
            run_training(
                spark, config, ingested_sample, str(tmp_path / "model"),
                on_epoch=pause_the_last_worker,
            )  # fmt: skip
    finally:
        for process in paused:  # the stage's end normally takes it down with its task
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
    assert paused  # the fault did happen
    message = str(caught.value)
    assert "train.stall_timeout_s = 5 s" in message and "stalled" in message
    # One attempt only: a retry would form a second TensorFlow cluster and resume from
    # epoch 1's checkpoint (and, with the worker gone, finish and publish a model).
    clusters = [r for r in caplog.records if r.getMessage().startswith("TensorFlow cluster")]
    assert len(clusters) == 1, caplog.text
    assert "resuming from the checkpoint" not in caplog.text
    assert not (tmp_path / "model" / "model.keras").exists()
    checkpoints = sorted(p.name for p in (tmp_path / "model" / "checkpoints").iterdir())
    assert "epoch-0001.npz" in checkpoints and "epoch-0004.npz" not in checkpoints


@pytest.mark.slow
def test_a_split_ingest_output_trains_on_its_train_split_only(spark, tmp_path, training_run):
    import pyarrow.parquet as pq

    from pipeline.ingest import ingest_report
    from pipeline.training.inputs import resolve_input

    features, result = training_run.features, training_run.result  # the whole split output
    rows = {
        name: sum(
            pq.read_metadata(p).num_rows for p in (features / f"split={name}").glob("*.parquet")
        )
        for name in ("train", "validation", "test")
    }
    assert sum(rows.values()) == 6000 and min(rows.values()) > 0

    metadata = json.loads((training_run.model_dir / "metadata.json").read_text())
    assert metadata["data"]["splits"] == {"train": rows["train"], "validation": rows["validation"]}
    assert metadata["data"]["rows"] == rows["train"]
    assert all("/split=train/" in f["path"] for f in metadata["data"]["files"])
    worker = result.fit.workers[0]
    assert (worker["train_rows"], worker["validation_rows"]) == (rows["train"], rows["validation"])
    assert "val_accuracy" in result.history[-1]
    assert f"training on split=train ({rows['train']:,} rows)" in training_run.log
    # The task read the row groups itself (no shuffle), counted the classes as it read
    # them, and the job says where its time went.
    total = rows["train"] + rows["validation"]
    assert f"{total:,} rows read by the 1 training task(s) from the files" in training_run.log
    assert not training_run.session_made  # RDD jobs alone: the job starts no SparkSession
    train_labels = pq.read_table(features / "split=train", columns=["label"])["label"]
    expected = Counter(str(v) for v in train_labels.to_pylist())
    assert metadata["data"]["class_counts"] == dict(sorted(expected.items()))
    phases = metadata["phases"]
    assert {"read", "import", "trace", "steps", "checkpoints", "publish"} <= set(phases)
    assert phases["read"] > 0 and phases["import"] > 0 and phases["steps"] > 0
    assert f"split=validation ({rows['validation']:,} rows)" in training_run.log

    # A split named on the command line is used as it is, test rows included.
    storage = Storage(spark)
    report = ingest_report(storage, str(features))
    named = resolve_input(storage, f"{features}/split=test", TrainSettings(), report)
    assert (named.train_path, named.validation_path) == (f"{features}/split=test", None)
    # Validation the user chose wins over split=validation.
    chosen = resolve_input(storage, str(features), TrainSettings(validation_fraction=0.1), report)
    assert chosen.train_path.endswith("/split=train") and chosen.validation_path is None

    # A final model trains on split=validation too; split=test is still not read.
    settings = {"epochs": 1, "include_validation_split": True}
    both = run_training(
        spark, Config().with_overrides({"train": settings}), str(features),
        str(tmp_path / "final"),
    )  # fmt: skip
    metadata = json.loads((tmp_path / "final" / "metadata.json").read_text())
    assert metadata["data"]["splits"] == {"train": rows["train"], "validation": rows["validation"]}
    assert metadata["data"]["rows"] == rows["train"] + rows["validation"]
    folders = {f["path"].rsplit("/", 2)[-2] for f in metadata["data"]["files"]}
    assert folders == {"split=train", "split=validation"}
    worker = both.fit.workers[0]
    assert (worker["train_rows"], worker["validation_rows"]) == (
        rows["train"] + rows["validation"],
        0,
    )
    assert "val_accuracy" not in both.history[-1]
