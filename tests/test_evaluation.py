"""Evaluation: Spark aggregates against the same metrics computed with NumPy on known rows."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import Config
from pipeline.contract import (
    CONFIDENCE,
    LABEL,
    NUM_CLASSES,
    PREDICTION,
    PROBABILITIES,
    REJECT_REASON,
)
from pipeline.evaluation import (
    CONFIDENCE_PLOT,
    CONFUSION_PLOT,
    console_summary,
    metric_columns,
    run_evaluation,
    summarize,
)
from pipeline.quarantine import REJECTED_DIR

ROWS = 300


@pytest.fixture(scope="module")
def known() -> dict[str, np.ndarray]:
    """Predictions whose metrics NumPy computes independently; class 9 is never predicted."""
    rng = np.random.default_rng(7)
    logits = rng.normal(size=(ROWS, NUM_CLASSES)).astype(np.float32)
    logits[:, 9] = -50.0
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    probabilities = probabilities.astype(np.float32)
    labels = rng.integers(0, NUM_CLASSES, ROWS).astype(np.int32)
    prediction = probabilities.argmax(axis=1).astype(np.int32)
    labels[:150] = prediction[:150]  # about half right
    return {
        "probabilities": probabilities,
        "label": labels,
        "prediction": prediction,
        "confidence": probabilities.max(axis=1),
    }


def _table(known, with_label: bool = True) -> pa.Table:
    columns = {
        "id": pa.array(np.arange(ROWS, dtype=np.int64)),
        PREDICTION: pa.array(known["prediction"]),
        PROBABILITIES: pa.array(list(known["probabilities"]), pa.list_(pa.float32())),
        CONFIDENCE: pa.array(known["confidence"]),
    }
    if with_label:
        columns[LABEL] = pa.array(known["label"])
    return pa.table(columns)


def _evaluate(spark, known, with_label=True, threshold=0.5, bins=10):
    df = spark.createDataFrame(_table(known, with_label).to_pandas())
    values = df.agg(*metric_columns(with_label, threshold, bins)).first().asDict()
    return summarize(values, with_label, threshold, bins)


def test_metrics_match_numpy(spark, known):
    evaluation = _evaluate(spark, known)
    labels, prediction = known["label"], known["prediction"]
    confusion = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    np.add.at(confusion, (labels, prediction), 1)
    p_true = known["probabilities"][np.arange(ROWS), labels].astype(np.float64)

    assert evaluation.confusion == confusion.tolist()
    assert evaluation.accuracy == pytest.approx((labels == prediction).mean())
    assert evaluation.log_loss == pytest.approx(-np.log(np.maximum(p_true, 1e-7)).mean())
    for k in range(NUM_CLASSES):
        tp = confusion[k, k]
        precision = tp / confusion[:, k].sum() if confusion[:, k].sum() else 0.0
        recall = tp / confusion[k].sum()
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        m = evaluation.per_class[k]
        assert (m.precision, m.recall, m.f1) == pytest.approx((precision, recall, f1))
        assert m.support == confusion[k].sum()
    assert evaluation.per_class[9].precision == 0.0  # never predicted: no division by zero
    macro = evaluation.macro()
    assert macro["f1"] == pytest.approx(np.mean([m.f1 for m in evaluation.per_class]))
    assert evaluation.predicted == np.bincount(prediction, minlength=NUM_CLASSES).tolist()
    assert evaluation.rows_below_threshold == int((known["confidence"] < 0.5).sum())
    bins = np.minimum(np.floor(known["confidence"].astype(np.float64) * 10), 9).astype(int)
    assert evaluation.histogram == np.bincount(bins, minlength=10).tolist()
    assert sum(evaluation.histogram) == ROWS


def test_unlabelled_predictions_report_distribution_and_confidence_only(spark, known):
    evaluation = _evaluate(spark, known, with_label=False, threshold=0.3, bins=4)
    report = evaluation.as_dict()

    assert not evaluation.has_labels
    assert "accuracy" not in report and "confusion_matrix" not in report
    assert sum(report["predicted_class_distribution"].values()) == ROWS
    assert report["rows_below_threshold"] == int((known["confidence"] < 0.3).sum())
    assert [b["to"] for b in report["confidence_histogram"]] == [0.25, 0.5, 0.75, 1.0]
    assert "precision" not in console_summary(evaluation)


def test_console_summary_shows_every_class_and_the_accuracy(spark, known):
    evaluation = _evaluate(spark, known)
    text = console_summary(evaluation)

    assert f"accuracy {evaluation.accuracy:.4f}" in text
    lines = text.splitlines()
    assert [line.split()[0] for line in lines[2 : 2 + NUM_CLASSES]] == [
        str(k) for k in range(NUM_CLASSES)
    ]
    assert f"{evaluation.rows_below_threshold:,} rows" in text


def test_run_evaluation_recomputes_an_existing_pred(spark, tmp_path, known):
    pred = tmp_path / "pred"
    pred.mkdir()
    pq.write_table(_table(known), pred / "part-0.parquet")
    (pred / REJECTED_DIR).mkdir()
    pq.write_table(
        pa.table({"id": [1000, 1001], REJECT_REASON: ["wrong_length", "pixels_null"]}),
        pred / REJECTED_DIR / "part-0.parquet",
    )
    (pred / "_report.json").write_text(
        json.dumps({"status": "ok", "job": "score", "model_dir": "m"})
    )
    config = Config().with_overrides({"score": {"confidence_threshold": 0.9}})

    result = run_evaluation(spark, config, str(pred))

    report = json.loads((pred / "_report.json").read_text())
    assert report["model_dir"] == "m"  # what scoring recorded is kept
    assert (report["rows_in"], report["rows_out"], report["rows_rejected"]) == (302, 300, 2)
    assert report["rejected_by_reason"] == {"pixels_null": 1, "wrong_length": 1}
    evaluation = report["evaluation"]
    assert evaluation["accuracy"] == pytest.approx(
        (known["label"] == known["prediction"]).mean(), abs=1e-6
    )
    assert evaluation["rows_below_threshold"] == int((known["confidence"] < 0.9).sum())
    for plot in (CONFUSION_PLOT, CONFIDENCE_PLOT):
        assert (pred / plot).read_bytes()[:4] == b"\x89PNG"
    assert result.evaluation.accuracy == pytest.approx(evaluation["accuracy"], abs=1e-6)
