"""Experiment tracking: train and tune runs recorded in an MLflow file store; clear errors."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from pipeline.config import Config, load_config
from pipeline.errors import EnvironmentProblem
from pipeline.tracking import INSTALL_HINT, flatten, require_mlflow, resolve_uri

mlflow = pytest.importorskip("mlflow", reason="tracking needs the [tracking] extra")


def _tracking(tmp_path: Path, experiment: str) -> dict:
    return {"enabled": True, "uri": (tmp_path / "mlruns").as_uri(), "experiment": experiment}


def test_tracking_is_off_by_default_with_a_local_file_store():
    tracking = Config().tracking
    assert not tracking.enabled
    assert tracking.uri.startswith("file:")


def test_relative_file_store_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    assert resolve_uri("file:./mlruns") == (tmp_path / "mlruns").resolve().as_uri()
    assert resolve_uri("mlruns") == (tmp_path / "mlruns").resolve().as_uri()
    assert resolve_uri((tmp_path / "x").as_uri()) == (tmp_path / "x").resolve().as_uri()
    import os

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


@pytest.mark.slow
def test_training_run_is_recorded(spark, ingested_sample, tmp_path):
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import record_training
    from pipeline.training import run_training

    config = Config().with_overrides(
        {
            "train": {"epochs": 3, "validation_fraction": 0.2, "hidden_units": [16]},
            "tracking": _tracking(tmp_path, "train-test"),
        }
    )
    result = run_training(spark, config, ingested_sample, str(tmp_path / "model"), fresh=True)
    run_id = record_training(spark, config.tracking, result, input_path=ingested_sample)

    client = MlflowClient(tracking_uri=resolve_uri(config.tracking.uri))
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.hidden_units"] == "[16]"
    assert run.data.params["train.epochs"] == "3"
    assert run.data.params["train.early_stopping.patience"] == "2"
    assert run.data.tags["pipeline.job"] == "train"
    for name in ("loss", "accuracy", "val_loss", "val_accuracy"):
        points = client.get_metric_history(run_id, name)
        assert sorted(p.step for p in points) == [1, 2, 3], name
        by_step = {p.step: p.value for p in points}
        assert by_step[3] == pytest.approx(result.history[-1][name])
    artifacts = {a.path for a in client.list_artifacts(run_id, "model")}
    assert artifacts == {"model/model.keras", "model/metadata.json", "model/history.png"}
    local = Path(client.download_artifacts(run_id, "model/model.keras", str(tmp_path / "dl")))
    assert local.read_bytes() == (tmp_path / "model" / "model.keras").read_bytes()
    experiment = client.get_experiment_by_name("train-test")
    assert experiment is not None and run.info.experiment_id == experiment.experiment_id


def test_disabled_tracking_records_nothing(tmp_path):
    from pipeline.tracking import record_training, record_tuning

    off = Config().tracking
    assert record_training(None, off, None) is None
    assert record_tuning(None, off, None, Config()) is None
    assert not (tmp_path / "mlruns").exists()


@pytest.mark.slow
def test_tuning_run_is_recorded_with_nested_trials(spark, ingested_sample, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import record_tuning
    from pipeline.tuning import run_tuning
    from tests.faults import break_trials

    config = Config().with_overrides(
        {
            "tune": {
                "strategy": "grid",
                "epochs": 2,
                "space": {"hidden_units": [[16], [32], [24]], "learning_rate": [0.05]},
                "confirm_top": 1,
                "confirm_seeds": 2,
            },
            "tracking": _tracking(tmp_path, "tune-test"),
        }
    )
    break_trials(monkeypatch, "002")
    result = run_tuning(spark, config, ingested_sample, str(tmp_path / "tune"))
    parent_id = record_tuning(spark, config.tracking, result, config)

    client = MlflowClient(tracking_uri=resolve_uri(config.tracking.uri))
    parent = client.get_run(parent_id)
    assert parent.data.params["tune.strategy"] == "grid"
    assert parent.data.metrics["trials"] == 3 and parent.data.metrics["failed_trials"] == 1
    assert parent.data.metrics["best_val_accuracy"] == pytest.approx(result.best.val_accuracy)
    assert {a.path for a in client.list_artifacts(parent_id)} == {
        "results.md",
        "val_accuracy.png",
        "best.yaml",
    }
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'"
    )
    assert len(children) == 3
    by_trial = {c.info.run_name: c for c in children}
    failed = by_trial["trial 002"]
    assert failed.info.status == "FAILED" and failed.data.tags["error_type"]
    for name in ("trial 000", "trial 001"):
        child = by_trial[name]
        assert child.info.status == "FINISHED"
        assert "final_val_accuracy" in child.data.metrics
        assert child.data.params["train.workers"] == "1"


def test_an_unusable_store_is_one_clear_error(tmp_path):
    from types import SimpleNamespace

    from pipeline.tracking import record_training

    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    config = Config().with_overrides({"tracking": _tracking(blocker, "x")})
    stub = SimpleNamespace(model_dir=str(tmp_path / "model"))
    with pytest.raises(EnvironmentProblem, match="could not record the training run"):
        record_training(None, config.tracking, stub)
