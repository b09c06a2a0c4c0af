"""Experiment tracking: training runs recorded in an MLflow SQLite store and read back by a
plain MlflowClient in a fresh process; clear errors. A search's record (a parent run, a
nested run per trial) is checked on the search that tests/test_tuning.py runs anyway."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

from pipeline.config import Config, load_config
from pipeline.errors import EnvironmentProblem
from pipeline.tracking import (
    ARTIFACTS_DIR,
    INSTALL_HINT,
    MLFLOW_MODEL_PATH,
    artifact_location,
    flatten,
    require_mlflow,
    resolve_uri,
)
from tests.mlflow_runs import read_back_run, tracking_settings

# Only the tests that record need MLflow; those about it being absent run without it.
needs_mlflow = pytest.mark.skipif(
    importlib.util.find_spec("mlflow") is None, reason="tracking needs the [tracking] extra"
)


def test_tracking_is_off_by_default_with_a_local_sqlite_store():
    tracking = Config().tracking
    assert not tracking.enabled
    assert tracking.uri == "sqlite:///mlflow.db"


def test_relative_stores_are_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    here = tmp_path.resolve()
    assert resolve_uri("sqlite:///mlflow.db") == f"sqlite:///{here / 'mlflow.db'}"
    assert resolve_uri(f"sqlite:///{here / 'a.db'}") == f"sqlite:///{here / 'a.db'}"
    assert resolve_uri("sqlite:///:memory:") == "sqlite:///:memory:"
    assert "MLFLOW_ALLOW_FILE_STORE" not in os.environ  # only a named file store needs it
    assert artifact_location("sqlite:///mlflow.db", "my runs/1") == (
        (here / ARTIFACTS_DIR / "my_runs_1").as_uri()
    )
    assert artifact_location("http://mlflow.example:5000", "x") is None
    # the file store is still accepted when named
    assert resolve_uri("file:./mlruns") == (here / "mlruns").as_uri()
    assert resolve_uri("mlruns") == (here / "mlruns").as_uri()
    assert resolve_uri((tmp_path / "x").as_uri()) == (here / "x").as_uri()
    assert os.environ["MLFLOW_ALLOW_FILE_STORE"] == "true"
    assert resolve_uri("http://mlflow.example:5000") == "http://mlflow.example:5000"


def test_flatten_names_nested_settings():
    flat = flatten({"a": 1, "b": {"c": [1, 2], "d": None}}, "train")
    assert flat == {"train.a": 1, "train.b.c": "[1, 2]", "train.b.d": "null"}


def test_enabling_tracking_without_mlflow_fails_at_load(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` now raises ImportError
    with pytest.raises(EnvironmentProblem) as info:
        load_config(overrides=["tracking.enabled=true"])
    assert "tracking.enabled" in str(info.value)
    assert INSTALL_HINT in str(info.value)
    with pytest.raises(EnvironmentProblem, match=r"digits-pipeline\[tracking\]"):
        require_mlflow()
    # off, the missing package does not matter
    assert not load_config(overrides=["tracking.enabled=false"]).tracking.enabled


def test_train_job_refuses_tracking_without_mlflow_before_spark(monkeypatch, capsys):
    """The job exits with the environment problem's code (3) before building a session."""
    monkeypatch.setitem(sys.modules, "mlflow", None)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "jobs"))
    try:
        import train as train_job
    finally:
        sys.path.pop(0)
    built = []
    monkeypatch.setattr("pipeline.session.build_session", lambda *a, **k: built.append(1))
    with pytest.raises(SystemExit) as exit_info:
        from pipeline.cli import run

        run(
            train_job.main,
            train_job.parser(),
            ["--input", "x", "--model-dir", "y", "--set", "tracking.enabled=true"],
        )
    assert exit_info.value.code == EnvironmentProblem.exit_code == 3
    assert INSTALL_HINT in capsys.readouterr().err
    assert not built


@needs_mlflow
@pytest.mark.slow
def test_training_run_is_recorded(spark, training_run, tmp_path):
    import hashlib

    from pipeline.tracking import record_training

    settings = tracking_settings(tmp_path, "train-test")
    tracking = Config().with_overrides({"tracking": settings}).tracking
    result, features = training_run.result, str(training_run.features)
    run_id = record_training(spark, tracking, result, input_path=features)

    run = read_back_run(tracking.uri, run_id, tmp_path)
    assert run["experiment"] == "train-test"
    assert run["status"] == "FINISHED"
    assert run["params"]["train.hidden_units"] == "[16]"  # the shared job's own settings
    assert run["params"]["train.epochs"] == "2"
    assert run["params"]["train.augment.max_rotation"] == "10.0"
    assert run["params"]["train.early_stopping.patience"] == "2"
    assert run["params"]["input"] == features
    assert run["tags"]["pipeline.job"] == "train"
    for name in ("loss", "accuracy", "val_loss", "val_accuracy"):
        history = run["history"][name]
        assert [step for step, _ in history] == [1, 2], name
        assert [value for _, value in history] == pytest.approx(
            [epoch[name] for epoch in result.history]
        )
    assert {path for path in run["artifacts"] if path.startswith("model/")} == {
        "model/history.png",
        "model/metadata.json",
        "model/model.keras",
    }
    assert f"{MLFLOW_MODEL_PATH}/MLmodel" in run["artifacts"]  # the MLflow model beside them
    first = training_run.model_dir / run["downloaded"].removeprefix("model/")
    assert run["downloaded_sha256"] == hashlib.sha256(first.read_bytes()).hexdigest()
    # the artifacts live beside the database, not in the working directory
    assert (tmp_path / ARTIFACTS_DIR / "train-test").is_dir()


def test_disabled_tracking_records_nothing(tmp_path, monkeypatch):
    """With tracking off, the default store (relative to the working directory) stays unmade."""
    from types import SimpleNamespace

    from pipeline.tracking import record_training, record_tuning

    monkeypatch.chdir(tmp_path)
    off = Config().tracking
    assert not off.enabled and off.uri == "sqlite:///mlflow.db"
    result = SimpleNamespace(model_dir=str(tmp_path / "model"), output=str(tmp_path / "tune"))
    assert record_training(None, off, result) is None
    assert record_tuning(None, off, result, Config()) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@needs_mlflow
def test_an_unusable_store_is_one_clear_error(tmp_path):
    from types import SimpleNamespace

    from pipeline.tracking import record_training

    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    config = Config().with_overrides({"tracking": tracking_settings(blocker, "x")})
    stub = SimpleNamespace(model_dir=str(tmp_path / "model"))
    with pytest.raises(EnvironmentProblem, match="could not record the training run"):
        record_training(None, config.tracking, stub)


@needs_mlflow
@pytest.mark.slow
def test_the_logged_model_scores_like_the_scoring_job_in_spark_udf(
    spark, ingested_sample, trained_model_dir, tmp_path
):
    """The run's MLflow model, loaded with spark_udf from the registry, gives the job's
    probabilities; the registered version points at the run."""
    from types import SimpleNamespace

    import mlflow
    import numpy as np
    from mlflow.tracking import MlflowClient
    from pyspark.sql import functions as F

    from pipeline.artifact import METADATA_FILE, parse_metadata
    from pipeline.contract import DEFAULT_ID_COLUMNS, FEATURES, PROBABILITIES
    from pipeline.scoring import run_scoring
    from pipeline.tracking import MLFLOW_MODEL_PATH, record_training

    settings = (
        Config()
        .with_overrides(
            {"tracking": {**tracking_settings(tmp_path, "model-test"), "register_as": "digits"}}
        )
        .tracking
    )
    metadata_text = (Path(trained_model_dir) / METADATA_FILE).read_text()
    result = SimpleNamespace(
        model_dir=trained_model_dir, metadata=parse_metadata(metadata_text, trained_model_dir)
    )
    run_id = record_training(spark, settings, result)
    run_id_again = record_training(spark, settings, result)

    uri = resolve_uri(settings.uri)
    client = MlflowClient(tracking_uri=uri)
    versions = sorted(client.search_model_versions("name = 'digits'"), key=lambda v: v.version)
    assert [(int(v.version), v.run_id) for v in versions] == [(1, run_id), (2, run_id_again)]
    scored = run_scoring(spark, Config(), ingested_sample, trained_model_dir, str(tmp_path / "p"))
    job = spark.read.parquet(scored.output)
    key = next(c for c in DEFAULT_ID_COLUMNS if c in job.columns)
    features = spark.read.parquet(ingested_sample).select(key, FEATURES).limit(1000)

    mlflow.set_tracking_uri(uri)
    try:
        info = mlflow.models.get_model_info(f"runs:/{run_id}/{MLFLOW_MODEL_PATH}")
        (features_in,) = info.signature.inputs.inputs
        (probabilities_out,) = info.signature.outputs.inputs
        assert (features_in.name, features_in.shape, str(features_in.type)) == (
            FEATURES,
            (-1, 784),
            "float32",
        )
        assert (probabilities_out.shape, str(probabilities_out.type)) == ((-1, 10), "float32")
        udf = mlflow.pyfunc.spark_udf(
            spark, "models:/digits/1", result_type="array<float>", env_manager="local"
        )
        by_udf = features.withColumn("udf", udf(F.col(FEATURES)))
        both = by_udf.join(job.select(key, PROBABILITIES), key).toPandas()
    finally:
        mlflow.set_tracking_uri(None)
    assert len(both) == 1000
    np.testing.assert_allclose(
        np.stack(both["udf"].to_numpy()), np.stack(both[PROBABILITIES].to_numpy()), atol=1e-5
    )
