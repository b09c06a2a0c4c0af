"""Faults injected into real jobs: executors killed mid-run, the driver killed mid-write.

These run the jobs under spark-submit on `local-cluster` (real executor JVMs) and kill
processes while they work; each checks the output against a clean run's.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from pipeline.config import Config
from pipeline.errors import InputDataError
from pipeline.ingest import read_features, run_ingest
from tests import faults

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

ROWS = 48_000


@pytest.fixture(scope="module")
def raw_array(spark, tmp_path_factory) -> str:
    """Augmented digits in the array layout, in several files, with an id column."""
    from pipeline.generate import run_generate

    out = tmp_path_factory.mktemp("faults") / "raw"
    config = Config().with_overrides({"generate": {"rows_per_file": ROWS // 8}})
    run_generate(spark, config, ROWS, str(out), layout="array", seed=11)
    return str(out)


@pytest.fixture(scope="module")
def features(spark, raw_array, tmp_path_factory) -> str:
    """The clean run's ingest output."""
    out = tmp_path_factory.mktemp("clean") / "features"
    run_ingest(spark, Config(), raw_array, str(out))
    return str(out)


@pytest.fixture(scope="module")
def clean_ingest(spark, features) -> dict:
    return faults.fingerprint(spark.read.parquet(features))


def _run_killing_one_executor(job, output: Path, ready=None) -> str:
    """Wait for both executors and for `ready` (default: the write started), kill one
    executor, check that the job still succeeds, and return its log."""
    try:
        faults.wait_for(lambda: len(faults.executors(job)) == 2, 120, "two executors", job)
        faults.wait_for(ready or (lambda: faults.staging_dirs(output)), 300, "the work", job)
        victims = faults.executors(job)
        assert job.poll() is None, "the job finished before the fault could be injected"
        victims[0].kill()
        code, log = faults.finish(job)
    finally:
        if job.poll() is None:
            faults.kill_process_group(job)
    assert code == 0, log[-4000:]
    assert "Lost executor" in log, log[-4000:]  # the fault really hit the job
    return log


def test_executor_killed_during_ingest_changes_nothing(spark, raw_array, clean_ingest, tmp_path):
    out = tmp_path / "features"
    job = faults.submit(
        "ingest.py",
        "--input",
        raw_array,
        "--output",
        str(out),
        "--set",
        "ingest.max_rows_per_file=5000",
    )
    _run_killing_one_executor(job, out)
    assert faults.fingerprint(spark.read.parquet(str(out))) == clean_ingest
    assert clean_ingest["rows"] == clean_ingest["keys"] == ROWS  # one row per input row
    leftovers = [p for p in out.rglob("*") if "_temporary" in p.parts or p.name.startswith(".")]
    assert [p for p in leftovers if not p.name.endswith(".crc")] == []
    assert faults.staging_dirs(out) == []


def test_driver_killed_during_write_leaves_nothing_that_looks_complete(
    spark, raw_array, clean_ingest, tmp_path
):
    out = tmp_path / "features"
    job = faults.submit("ingest.py", "--input", raw_array, "--output", str(out), master="local[2]")
    try:
        faults.wait_for(lambda: faults.staging_dirs(out), 120, "the write to start", job)
        time.sleep(1.0)
        assert job.poll() is None, "the job finished before the fault could be injected"
        faults.kill_process_group(job)
    finally:
        if job.poll() is None:
            faults.kill_process_group(job)
    assert not out.exists()
    with pytest.raises(InputDataError, match="input not found"):
        read_features(spark, str(out))

    run_ingest(spark, Config(), raw_array, str(out))  # the same job again, in this process
    assert faults.fingerprint(spark.read.parquet(str(out))) == clean_ingest
    assert faults.staging_dirs(out) == []  # the rerun removed the dead run's staging directory


def test_executor_killed_during_scoring_changes_no_prediction(
    spark, features, trained_model_dir, tmp_path
):
    from pipeline.scoring import run_scoring

    clean = tmp_path / "clean"
    run_scoring(spark, Config(), features, trained_model_dir, str(clean))
    out = tmp_path / "predictions"
    job = faults.submit(
        "score.py",
        "--input",
        features,
        "--model-dir",
        trained_model_dir,
        "--output",
        str(out),
        "--set",
        "score.batch_size=2048",
    )
    _run_killing_one_executor(job, out)
    exact = ["id", "label", "prediction"]
    faulty_df, clean_df = spark.read.parquet(str(out)), spark.read.parquet(str(clean))
    assert faults.fingerprint(faulty_df.select(*exact)) == faults.fingerprint(
        clean_df.select(*exact)
    )
    assert faulty_df.count() == ROWS  # one row per input row
    assert faults.max_array_difference(faulty_df, clean_df, "id", "probabilities") < 1e-6


# Training: exact sync at a small batch makes an epoch long enough (its steps each wait on
# an all-reduce) for the fault to land mid-run, on half of the rows to spool.
TRAIN = {"epochs": 3, "validation_fraction": 0.1, "sync": "exact", "batch_size": 16}
TRAIN_ROWS = 24_000


@pytest.fixture(scope="module")
def train_features(spark, features, tmp_path_factory) -> str:
    """The first `TRAIN_ROWS` rows of the clean run's ingest output, in four files."""
    out = str(tmp_path_factory.mktemp("train") / "features")
    spark.read.parquet(features).limit(TRAIN_ROWS).repartition(4).write.parquet(out)
    return out


def test_training_worker_killed_mid_run_resumes_from_its_checkpoint(
    spark, train_features, tmp_path
):
    from pipeline.training import run_training

    clean = run_training(spark, Config().with_overrides({"train": TRAIN}), train_features,
                         str(tmp_path / "clean"), workers=2)  # fmt: skip
    model_dir = tmp_path / "model"
    args = ["--input", train_features, "--model-dir", str(model_dir), "--workers", "2"]
    for key, value in TRAIN.items():
        args += ["--set", f"train.{key}={value}"]
    job = faults.submit("train.py", *args)
    first_checkpoint = model_dir / "checkpoints" / "epoch-0001.npz"
    log = _run_killing_one_executor(job, model_dir, ready=first_checkpoint.exists)
    assert "resuming from the checkpoint of epoch" in log, log[-4000:]
    metadata = json.loads((model_dir / "metadata.json").read_text())
    assert metadata["epochs_completed"] == 3 and metadata["data"]["rows"] == TRAIN_ROWS
    # Every worker gets the same rows in the same order on every run and under every
    # master, and a checkpoint holds all the state: the resumed run is the clean run.
    measured = ("loss", "accuracy", "val_loss", "val_accuracy")
    faulty = [epoch[k] for epoch in metadata["history"] for k in measured]
    expected = [epoch[k] for epoch in clean.metadata.history for k in measured]
    assert faulty == pytest.approx(expected, rel=1e-6), (faulty, expected)
