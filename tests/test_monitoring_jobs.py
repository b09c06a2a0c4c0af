"""Calibration and drift through the train and score jobs, on real digits from the sample."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import Config
from pipeline.generate import Augmentation, augment

TRAIN_ROWS = 5000  # the last 1,000 digits are held out


def _raw(path: Path, pixels: np.ndarray, labels: np.ndarray) -> str:
    """Raw digits in the array layout: `pixels` array<int> 0-255, `label`."""
    n = len(pixels)
    offsets = pa.array(np.arange(0, (n + 1) * 784, 784, dtype=np.int32))
    values = pa.array(pixels.astype(np.int32).reshape(-1))
    table = pa.table(
        {"pixels": pa.ListArray.from_arrays(offsets, values), "label": pa.array(labels)}
    )
    pq.write_table(table, path)
    return str(path)


@pytest.fixture(scope="module")
def calibrated_model(spark, sample_pixels, tmp_path_factory):
    """A briefly trained model (4,000 digits) with what training records for monitoring:
    the profile of its training rows and a temperature fitted on 1,000 validation digits."""
    from pipeline.artifact import model_to_bytes, new_metadata, write_model_dir
    from pipeline.model import build_model, build_optimizer
    from pipeline.monitoring.drift import profile_from_sums, profile_sums
    from pipeline.monitoring.training import model_extras
    from pipeline.storage import Storage

    pixels, labels = sample_pixels
    x = (pixels[:TRAIN_ROWS] / 255.0).astype(np.float32)
    y = labels[:TRAIN_ROWS]
    config = Config().with_overrides({"train": {"epochs": 2, "batch_size": 64, "calibrate": True}})
    model = build_model(config.train)
    model.compile(optimizer=build_optimizer(config.train), loss="sparse_categorical_crossentropy")
    model.fit(x[:4000], y[:4000], epochs=2, batch_size=64, verbose=0)
    model_bytes = model_to_bytes(model)
    metadata = new_metadata(model_bytes, config.train, epochs_completed=2)
    bins = config.score.drift.ink_bins
    profile = profile_from_sums(profile_sums(x[:4000], y[:4000], bins), bins, "label")
    validation = (model.predict(x[4000:], verbose=0), y[4000:])
    metadata, extras = model_extras(config, metadata, model_bytes, profile, validation)
    model_dir = tmp_path_factory.mktemp("monitoring") / "model"
    write_model_dir(Storage(spark), str(model_dir), metadata, model_bytes, extras)
    return model_dir


def test_training_records_profile_temperature_card_and_first_layer(calibrated_model):
    metadata = json.loads((calibrated_model / "metadata.json").read_text())
    profile = metadata["profile"]
    assert profile["rows"] == 4000  # the training rows, not the validation rows
    assert len(profile["pixel_mean"]) == 784 and sum(profile["class_counts"]) == profile["rows"]
    assert metadata["temperature"] is not None and metadata["temperature"] != pytest.approx(1.0)
    card = (calibrated_model / "model_card.md").read_text()
    assert "## Validation" in card and "temperature" in card and "## Known limits" in card
    assert (calibrated_model / "first_layer.png").read_bytes().startswith(b"\x89PNG")


def _score(spark, tmp_path, model_dir, pixels, labels, name):
    from pipeline.scoring import run_scoring

    raw = _raw(tmp_path / f"{name}.parquet", pixels, labels)
    result = run_scoring(spark, Config(), raw, str(model_dir), str(tmp_path / name))
    return result, tmp_path / name


def test_held_out_digits_score_ok(spark, tmp_path, calibrated_model, sample_pixels):
    pixels, labels = sample_pixels
    result, out = _score(
        spark, tmp_path, calibrated_model, pixels[TRAIN_ROWS:], labels[TRAIN_ROWS:], "held"
    )
    report = json.loads((out / "_report.json").read_text())
    assert report["drift"]["status"] == "ok", report["drift"]
    assert result.watch.drift.status == "ok"
    for name in ("_drift.png", "_calibration.png", "_report.md"):
        assert (out / name).exists(), name
    assert "## Drift: ok" in (out / "_report.md").read_text()


def test_inverted_digits_alert(spark, tmp_path, calibrated_model, sample_pixels):
    pixels, labels = sample_pixels
    held = pixels[TRAIN_ROWS:]
    _, out = _score(spark, tmp_path, calibrated_model, 255 - held, labels[TRAIN_ROWS:], "inv")
    drift = json.loads((out / "_report.json").read_text())["drift"]
    assert drift["status"] == "alert"
    assert drift["checks"]["ink_psi"] == "alert", drift


def test_digits_shifted_off_centre_alert(spark, tmp_path, calibrated_model, sample_pixels):
    pixels, labels = sample_pixels
    far = Augmentation.off_centre()
    shifted, source = augment(pixels[TRAIN_ROWS:], np.arange(1000), seed=0, aug=far)
    _, out = _score(
        spark, tmp_path, calibrated_model, shifted, labels[TRAIN_ROWS:][source], "shifted"
    )
    drift = json.loads((out / "_report.json").read_text())["drift"]
    assert drift["status"] == "alert", drift


def test_temperature_lowers_held_out_ece_and_keeps_accuracy(
    spark, tmp_path, calibrated_model, sample_pixels
):
    pixels, labels = sample_pixels
    plain = tmp_path / "plain-model"
    shutil.copytree(calibrated_model, plain)
    metadata = json.loads((plain / "metadata.json").read_text())
    metadata["temperature"] = None
    (plain / "metadata.json").write_text(json.dumps(metadata))
    held, held_labels = pixels[TRAIN_ROWS:], labels[TRAIN_ROWS:]
    scaled, _ = _score(spark, tmp_path, calibrated_model, held, held_labels, "scaled")
    unscaled, _ = _score(spark, tmp_path, plain, held, held_labels, "unscaled")
    assert scaled.evaluation.accuracy == unscaled.evaluation.accuracy
    before, after = unscaled.watch.calibration.ece, scaled.watch.calibration.ece
    assert after < before, (before, after, metadata)
    assert scaled.report["calibration"]["temperature"] == pytest.approx(
        json.loads((calibrated_model / "metadata.json").read_text())["temperature"]
    )


@pytest.mark.slow
def test_the_train_job_records_them(training_run):
    """The shared training job (train.calibrate on, validated on split=validation)."""
    model_dir, result = training_run.model_dir, training_run.result
    metadata = json.loads((model_dir / "metadata.json").read_text())
    assert metadata["temperature"] == result.metadata.temperature is not None
    profile = metadata["profile"]
    assert profile["rows"] == result.fit.workers[0]["train_rows"]  # the training rows
    assert 4500 < profile["rows"] < 5100  # split=train: about 80 % of the 6,000
    assert sum(profile["class_counts"]) == profile["rows"]
    assert metadata["phases"]["predict"] > 0  # the worker scored split=validation
    card = (model_dir / "model_card.md").read_text()
    assert "--set train.calibrate=true" in card and "## Validation" in card
    assert (model_dir / "first_layer.png").exists()


def test_scoring_sums_count_each_row_once_when_the_scoring_runs_again(
    spark, ingested_sample, trained_model_dir
):
    """Acting twice on scored rows runs every scoring task twice; the evaluation,
    calibration and drift sums still count each row once (a re-run task replaces its
    partition's total), on both routes: rows Spark reads, and row groups the tasks read."""
    from pipeline.config import ScoreSettings
    from pipeline.evaluation import PartitionSums, metric_names, partition_total
    from pipeline.monitoring.watch import WatchShape
    from pipeline.scoring import (
        broadcast_model,
        plan_row_groups,
        predict_digits,
        read_scoring_model,
        score_row_groups,
    )
    from pipeline.storage import Storage

    storage = Storage(spark)
    metadata, onnx_bytes = read_scoring_model(storage, trained_model_dir)
    model = broadcast_model(spark, metadata, onnx_bytes)
    shape = WatchShape.of(ScoreSettings())
    features = spark.read.parquet(ingested_sample).select("features", "label")
    rows = features.count()
    plan = plan_row_groups(
        storage, ingested_sample, features.schema, spark.sparkContext.defaultParallelism
    )
    assert plan is not None

    watched = spark.sparkContext.accumulator({}, PartitionSums())
    by_spark = predict_digits(features, model, 1, (watched, shape))
    sums = spark.sparkContext.accumulator({}, PartitionSums())
    planned = spark.sparkContext.accumulator({}, PartitionSums())
    by_files = score_row_groups(spark, plan, model, 1, 1024, (sums, 0.5, 10), (planned, shape))
    for scored in (by_spark, by_spark, by_files, by_files):
        scored.write.format("noop").mode("overwrite").save()

    assert partition_total(watched.value, shape.size)[0] == rows  # the profile's row count
    assert partition_total(planned.value, shape.size)[0] == rows
    evaluation = partition_total(sums.value, len(metric_names(True, 10)))
    assert evaluation[metric_names(True, 10).index("rows")] == rows
