"""Calibration and drift measures on real digits from the sample."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import DriftSettings
from pipeline.contract import CONFIDENCE, LABEL, PREDICTION
from pipeline.errors import ConfigError
from pipeline.generate import Augmentation, augment
from pipeline.monitoring import (
    apply_temperature,
    calibration_from_sums,
    calibration_sums,
    calibration_sums_of,
    compare_profiles,
    fit_temperature,
    profile_from_sums,
    profile_sums,
    psi,
)

BINS = 20


def _profile(pixels: np.ndarray, classes: np.ndarray):
    return profile_from_sums(profile_sums(pixels / 255.0, classes, BINS), BINS)


# --- calibration --------------------------------------------------------------------------


def test_ece_of_known_bins():
    confidence = np.full(100, 0.9)
    right = np.arange(100) < 90
    assert calibration_from_sums(calibration_sums(confidence, right, 10)).ece == pytest.approx(0)
    wrong = np.zeros(100, bool)
    assert calibration_from_sums(calibration_sums(confidence, wrong, 10)).ece == pytest.approx(0.9)
    # Half the rows in each of two bins, each off by 0.2 and 0.4: ECE 0.3, MCE 0.4.
    confidence = np.r_[np.full(50, 0.6), np.full(50, 1.0)]
    right = np.r_[np.arange(50) < 40, np.arange(50) < 30]
    calibration = calibration_from_sums(calibration_sums(confidence, right, 10))
    assert calibration.ece == pytest.approx(0.3)
    assert calibration.mce == pytest.approx(0.4)
    assert calibration.counts[9] == 50  # confidence 1.0 falls in the last bin


def test_spark_aggregation_gives_the_executor_sums(spark):
    rng = np.random.default_rng(0)
    confidence = rng.uniform(0.1, 1.0, 500).astype(np.float32)
    prediction = rng.integers(0, 10, 500)
    label = np.where(rng.uniform(size=500) < confidence, prediction, (prediction + 1) % 10)
    rows = [
        (int(p), float(c), int(y)) for p, c, y in zip(prediction, confidence, label, strict=True)
    ]
    rows.append((3, 0.5, None))  # unlabelled: left out
    df = spark.createDataFrame(rows, f"{PREDICTION} int, {CONFIDENCE} float, {LABEL} int")
    np.testing.assert_allclose(
        calibration_sums_of(df, 15),
        calibration_sums(confidence.astype(np.float64), prediction == label, 15),
        rtol=1e-6,
    )


def test_temperature_scaling_lowers_ece_and_keeps_every_prediction(sample_pixels):
    from pipeline.config import TrainSettings
    from pipeline.model import build_model, build_optimizer

    pixels, labels = sample_pixels
    x = (pixels / 255.0).astype(np.float32)
    settings = TrainSettings(epochs=2, batch_size=64)
    model = build_model(settings)
    model.compile(optimizer=build_optimizer(settings), loss="sparse_categorical_crossentropy")
    model.fit(x[:4000], labels[:4000], epochs=2, batch_size=64, verbose=0)
    validation = model.predict(x[4000:5000], verbose=0)
    held_out = model.predict(x[5000:], verbose=0)

    temperature = fit_temperature(validation, labels[4000:5000])
    assert temperature != pytest.approx(1.0, abs=0.05)
    scaled = apply_temperature(held_out, temperature)
    np.testing.assert_array_equal(scaled.argmax(axis=1), held_out.argmax(axis=1))
    np.testing.assert_allclose(scaled.sum(axis=1), 1.0, rtol=1e-5)

    def ece(p):
        correct = p.argmax(axis=1) == labels[5000:]
        return calibration_from_sums(calibration_sums(p.max(axis=1), correct, 15)).ece

    assert ece(scaled) < 0.75 * ece(held_out), (ece(held_out), ece(scaled), temperature)


def test_fit_temperature_finds_the_one_that_was_applied():
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 2, (4000, 10))
    true = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = np.array([rng.choice(10, p=p) for p in true])
    sharpened = apply_temperature(true, 0.5)  # over-confident by a factor of two
    assert fit_temperature(sharpened, labels) == pytest.approx(2.0, rel=0.1)


# --- drift --------------------------------------------------------------------------------


def test_psi():
    assert psi([10, 20, 30], [20, 40, 60]) == pytest.approx(0.0)
    shifted = psi([50, 50, 0], [0, 50, 50])
    assert shifted > 1.0
    assert psi([50, 50, 0], [0, 50, 50]) == pytest.approx(psi([0, 50, 50], [50, 50, 0]))


def test_profiles_survive_json(sample_pixels):
    import json

    from pipeline.monitoring import DataProfile

    pixels, labels = sample_pixels
    profile = _profile(pixels[:500], labels[:500])
    again = DataProfile.from_dict(json.loads(json.dumps(profile.as_dict())))
    assert again.rows == 500 and again.class_counts == profile.class_counts
    np.testing.assert_allclose(again.pixel_mean, profile.pixel_mean, atol=1e-5)


@pytest.fixture(scope="module")
def training_profile(sample_pixels):
    pixels, labels = sample_pixels
    return _profile(pixels[:5000], labels[:5000])


def test_held_out_digits_do_not_drift(sample_pixels, training_profile):
    pixels, labels = sample_pixels
    drift = compare_profiles(
        training_profile, _profile(pixels[5000:], labels[5000:]), DriftSettings()
    )
    assert drift.status == "ok", drift.as_dict()


def test_inverted_digits_alert(sample_pixels, training_profile):
    pixels, labels = sample_pixels
    inverted = 255 - pixels[5000:]
    drift = compare_profiles(training_profile, _profile(inverted, labels[5000:]), DriftSettings())
    assert drift.status == "alert"
    assert drift.checks["ink_psi"] == "alert" and drift.checks["pixel_mean_mad"] == "alert"


def test_digits_shifted_off_centre_alert(sample_pixels, training_profile):
    pixels, labels = sample_pixels
    far = Augmentation.off_centre()
    shifted, source = augment(pixels[5000:], np.arange(1000), seed=0, aug=far)
    drift = compare_profiles(
        training_profile, _profile(shifted, labels[5000:][source]), DriftSettings()
    )
    assert drift.status == "alert"
    assert drift.checks["pixel_mean_mad"] == "alert", drift.as_dict()


def test_drift_thresholds_are_validated():
    from pipeline.config import load_config

    with pytest.raises(ConfigError, match="psi_alert"):
        load_config(overrides=["score.drift.psi_alert=0.05"])


# --- what scoring watches -----------------------------------------------------------------


def test_watch_sums_of_batches_add_up_to_the_whole(sample_pixels, training_profile):
    from pipeline.config import ScoreSettings
    from pipeline.monitoring.watch import WatchShape, batch_watch_sums, watch_from_sums

    pixels, labels = sample_pixels
    x = pixels[5000:] / 255.0
    rng = np.random.default_rng(0)
    prediction = np.where(rng.uniform(size=1000) < 0.9, labels[5000:], 0)
    confidence = rng.uniform(0.5, 1.0, 1000)
    shape = WatchShape.of(ScoreSettings())
    whole = batch_watch_sums(shape, x, prediction, confidence, labels[5000:])
    parts = sum(
        batch_watch_sums(shape, x[s], prediction[s], confidence[s], labels[5000:][s])
        for s in (slice(0, 300), slice(300, 1000))
    )
    np.testing.assert_allclose(parts, whole)
    assert len(whole) == shape.size
    watch = watch_from_sums(whole, shape, ScoreSettings(), training_profile, labelled=True)
    assert watch.drift.status == "ok"
    assert watch.calibration.rows == 1000
    assert watch.profile.class_counts == tuple(np.bincount(prediction, minlength=10))
    assert set(watch.files(training_profile)) == {"_calibration.png", "_drift.png"}

    unlabelled = batch_watch_sums(shape, 1 - x, prediction, confidence, None)
    watch = watch_from_sums(unlabelled, shape, ScoreSettings(), training_profile, labelled=False)
    assert watch.calibration is None and watch.drift.status == "alert"
    assert set(watch.files(training_profile)) == {"_drift.png"}


def test_model_card_and_report_say_what_the_json_says():
    from pipeline.artifact import new_metadata
    from pipeline.config import TrainSettings
    from pipeline.monitoring.documents import model_card, scoring_report_md

    history = [{"epoch": 1, "loss": 0.5, "accuracy": 0.81, "val_loss": 0.4, "val_accuracy": 0.85}]
    metadata = new_metadata(
        b"weights",
        TrainSettings(hidden_units=[64]),
        history=history,
        epochs_completed=1,
        data={"rows": 4800, "class_counts": {"0": 480}, "path": "features", "sha256": "ab" * 32},
    ).model_dump(mode="json")
    validation = {
        "rows": 600,
        "accuracy": 0.85,
        "per_class": [{"precision": 0.9, "recall": 0.8, "f1": 0.847, "support": 60}] * 10,
        "calibration": {"ece_before": 0.08, "ece_after": 0.02, "temperature": 1.7},
    }
    card = model_card(metadata, validation, "spark-submit jobs/train.py --input f --model-dir m")
    for expected in (
        "[64]",
        "4,800 input rows",
        "| 1 | 0.5 | 0.81",
        "0.0800 before",
        "temperature 1.700",
        "ink on a black background",
        "--model-dir m",
    ):
        assert expected in card, expected
    report = {
        "status": "ok",
        "rows_in": 10,
        "rows_out": 9,
        "rows_rejected": 1,
        "rejected_by_reason": {"label_null": 1},
        "evaluation": {"accuracy": 0.9},
        "calibration": {"ece": 0.031, "mce": 0.2, "bins": 15, "rows": 9, "temperature": None},
        "drift": {
            "status": "alert",
            "ink_psi": 3.2,
            "class_mix_psi": 0.5,
            "pixel_mean_mad": 0.7,
            "checks": {"ink_psi": "alert"},
            "ink_mean": {"training": 0.13, "scored": 0.87},
            "nonzero_share": {"training": 0.19, "scored": 1.0},
        },
    }
    text = scoring_report_md(report, ["_drift.png"])
    for expected in (
        "| rejected | 1 |",
        "label_null",
        "0.0310",
        "## Drift: alert",
        "0.1300 → 0.8700",
        "[_drift.png](_drift.png)",
    ):
        assert expected in text, expected
