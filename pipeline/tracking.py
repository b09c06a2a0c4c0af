"""Experiment tracking: finished train and tune runs recorded in MLflow.

Optional: ``pip install 'digits-pipeline[tracking]'`` and ``tracking.enabled: true``. The
config refuses ``tracking.enabled`` without MLflow installed, so a job stops before Spark
starts. Runs go to ``tracking.uri``, by default the SQLite database ``mlflow.db`` in the
working directory, with artifacts in ``mlartifacts/`` beside it: ``mlflow ui`` started
there opens it. A train run records the train settings as parameters, the per-epoch
history as metrics (step = epoch) and the model directory's ``model.keras``,
``metadata.json`` and ``history.png`` as artifacts under ``model/``. A tune run records a
parent run (the tune settings, the results table and plot, ``best.yaml``) with one nested
run per trial, whose ``judged_val_accuracy`` is that of the epoch the trial's model keeps.

Everything goes through an explicit `MlflowClient` (no global active run), and the model
directory is read through `Storage`, so a model on HDFS or S3 is recorded the same way.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from pipeline.artifact import HISTORY_PLOT, METADATA_FILE, MODEL_FILE
from pipeline.config import Config, TrackingSettings
from pipeline.errors import EnvironmentProblem
from pipeline.storage import Storage

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from pipeline.training import TrainResult
    from pipeline.tuning import TuneResult

log = logging.getLogger(__name__)

__all__ = ["record_training", "record_tuning", "require_mlflow", "resolve_uri"]

INSTALL_HINT = "pip install 'digits-pipeline[tracking]'"
# Folder beside a SQLite store that holds its experiments' artifacts.
ARTIFACTS_DIR = "mlartifacts"
MODEL_ARTIFACTS = (MODEL_FILE, METADATA_FILE, HISTORY_PLOT)
# Where a train run keeps the model as an MLflow model (pipeline.mlflow_model).
MLFLOW_MODEL_PATH = "mlflow_model"
_EPOCH_METRICS = ("loss", "accuracy", "val_loss", "val_accuracy", "samples_per_second")
_PARAMS_PER_BATCH = 100
_METRICS_PER_BATCH = 1000


def require_mlflow() -> Any:
    """The mlflow module, or `EnvironmentProblem` saying how to install it."""
    try:
        import mlflow
    except ImportError as exc:
        raise EnvironmentProblem(
            f"tracking.enabled is true but MLflow cannot be imported ({exc}): {INSTALL_HINT}, "
            "or set tracking.enabled=false"
        ) from None
    return mlflow


def resolve_uri(uri: str) -> str:
    """`uri` with a relative SQLite database or file store made absolute.

    Relative paths are taken from the working directory, as MLflow itself does: the
    default ``sqlite:///mlflow.db`` is the store ``mlflow ui`` opens when started there.
    MLflow 3 refuses a file store unless ``MLFLOW_ALLOW_FILE_STORE`` is true; this sets it
    (unless already set) when the user names a local file store.
    """
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        database = _sqlite_path(uri)
        return f"sqlite:///{database}" if database is not None else uri
    if parsed.scheme in ("", "file"):
        if parsed.scheme == "file" and (parsed.netloc or uri.startswith("file:/")):
            path = Path(parsed.path)
        else:
            path = Path(uri.removeprefix("file:"))
        uri = path.expanduser().resolve().as_uri()
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return uri


def _sqlite_path(uri: str) -> Path | None:
    """The absolute database file of a ``sqlite:///`` URI; None for an in-memory one."""
    rest = uri.removeprefix("sqlite://")
    if not rest.startswith("/") or rest == "/" or rest.startswith("/:memory:"):
        return None
    # sqlite:///relative.db (three slashes) is relative; sqlite:////abs.db is absolute.
    return Path(rest[1:]).expanduser().resolve()


def artifact_location(uri: str, experiment: str) -> str | None:
    """Where a new experiment of a local SQLite store keeps its artifacts: beside the database.

    ``<database folder>/mlartifacts/<experiment>``; None (MLflow's default) for other stores.
    """
    database = _sqlite_path(resolve_uri(uri)) if uri.startswith("sqlite:") else None
    if database is None:
        return None
    folder = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment).strip("._") or "experiment"
    return (database.parent / ARTIFACTS_DIR / folder).as_uri()


def record_training(
    spark: SparkSession,
    settings: TrackingSettings,
    result: TrainResult,
    *,
    input_path: str | None = None,
) -> str | None:
    """Record a finished training run; its MLflow run id, or None when tracking is off."""
    if not settings.enabled:
        return None
    with _mlflow_errors(settings, f"the training run (model {result.model_dir})"):
        return _record_training(spark, settings, result, input_path)


def _record_training(
    spark: SparkSession, settings: TrackingSettings, result: TrainResult, input_path: str | None
) -> str:
    client, experiment_id = _client(settings)
    metadata = result.metadata
    run = client.create_run(
        experiment_id,
        run_name=f"train {Path(result.model_dir.rstrip('/')).name}",
        tags={"pipeline.job": "train", "pipeline.model_dir": result.model_dir},
    )
    run_id = run.info.run_id
    try:
        params = {
            **flatten(metadata.train.model_dump(mode="json"), "train"),
            "workers": metadata.workers,
            "data.rows": metadata.data.get("rows"),
            "data.sha256": metadata.data.get("sha256"),
        }
        if input_path is not None:
            params["input"] = input_path
        summary = {
            "epochs_completed": metadata.epochs_completed,
            "training_seconds": metadata.training_seconds or 0.0,
            "samples_per_second_overall": metadata.samples_per_second or 0.0,
        }
        _log(client, run_id, params, metadata.history, summary)
        storage = Storage(spark)
        _log_files(
            client, run_id, storage, result.model_dir, MODEL_ARTIFACTS, artifact_path="model"
        )
        _log_mlflow_model(client, run_id, storage, result.model_dir)
    except Exception:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    log.info(
        "recorded in MLflow: %s, run %s; model: runs:/%s/%s",
        resolve_uri(settings.uri),
        run_id,
        run_id,
        MLFLOW_MODEL_PATH,
    )
    if settings.register_as:
        version = _register(client, settings.register_as, run_id, metadata.model_sha256)
        log.info("registered as models:/%s/%s", settings.register_as, version)
    return run_id


def _register(client, name: str, run_id: str, model_sha256: str) -> str:
    """A new version of registered model `name` (created if new) from the run's model."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name)
    version = client.create_model_version(
        name,
        source=f"runs:/{run_id}/{MLFLOW_MODEL_PATH}",
        run_id=run_id,
        tags={"model_sha256": model_sha256},
    )
    return str(version.version)


def _log_mlflow_model(client, run_id: str, storage: Storage, model_dir: str) -> None:
    """The model as an MLflow pyfunc model with its signature, under ``mlflow_model/``."""
    import mlflow.pyfunc

    from pipeline import mlflow_model
    from pipeline.artifact import METADATA_FILE, ONNX_FILE

    with tempfile.TemporaryDirectory(prefix="digits-mlflow-model-") as local:
        files = Path(local, "files")
        files.mkdir()
        for name in (ONNX_FILE, METADATA_FILE):
            (files / name).write_bytes(storage.read_bytes(f"{model_dir.rstrip('/')}/{name}"))
        saved = Path(local, MLFLOW_MODEL_PATH)
        with warnings.catch_warnings():
            # MLflow suggests type hints or an input example to infer a signature; the
            # signature is given, and an example would load TensorFlow on the driver.
            warnings.simplefilter("ignore", UserWarning)
            mlflow.pyfunc.save_model(
                str(saved),
                python_model=mlflow_model.write_code(local),
                artifacts=mlflow_model.artifacts(files),
                signature=mlflow_model.signature(),
                pip_requirements=mlflow_model.requirements(),
            )
        client.log_artifacts(run_id, str(saved), MLFLOW_MODEL_PATH)


def record_tuning(
    spark: SparkSession, settings: TrackingSettings, result: TuneResult, config: Config
) -> str | None:
    """Record a finished search: a parent run and one nested run per trial."""
    if not settings.enabled:
        return None
    with _mlflow_errors(settings, f"the search (results in {result.output})"):
        return _record_tuning(spark, settings, result, config)


def _record_tuning(
    spark: SparkSession, settings: TrackingSettings, result: TuneResult, config: Config
) -> str:
    from pipeline.tuning import BEST_FILE, PLOT_FILE, RESULTS_MD

    client, experiment_id = _client(settings)
    parent = client.create_run(
        experiment_id,
        run_name=f"tune {Path(result.output.rstrip('/')).name}",
        tags={"pipeline.job": "tune", "pipeline.output": result.output},
    )
    parent_id = parent.info.run_id
    try:
        tune = config.tune.model_dump(mode="json")
        space = tune.pop("space")
        params = {
            **flatten(tune, "tune"),
            "tune.space": json.dumps(space),
            "parallelism_used": result.parallelism,
        }
        best = result.best
        summary = {
            "trials": len(result.results),
            "failed_trials": len(result.failed),
            "search_seconds": result.seconds,
        }
        if best is not None:
            summary["best_val_accuracy"] = best.val_accuracy or 0.0
            summary["best_val_loss"] = best.val_loss or 0.0
            client.set_tag(parent_id, "best_trial", f"{best.trial.number:03d}")
            client.set_tag(parent_id, "best_structure", best.trial.structure)
        _log(client, parent_id, params, [], summary)
        names = (RESULTS_MD, PLOT_FILE, BEST_FILE) if best is not None else (RESULTS_MD, PLOT_FILE)
        _log_files(client, parent_id, Storage(spark), result.output, names)
        for trial in result.results:
            _record_trial(client, experiment_id, parent_id, trial)
    except Exception:
        client.set_terminated(parent_id, "FAILED")
        raise
    client.set_terminated(parent_id, "FINISHED")
    log.info(
        "recorded in MLflow: %s, run %s with %d trials",
        resolve_uri(settings.uri),
        parent_id,
        len(result.results),
    )
    return parent_id


def _record_trial(client, experiment_id: str, parent_id: str, trial) -> None:
    tags = {
        "mlflow.parentRunId": parent_id,
        "pipeline.job": "tune-trial",
        "pipeline.model_dir": trial.model_dir,
        "structure": trial.trial.structure,
        "reference": str(trial.trial.reference).lower(),
        "status": trial.status,
    }
    if trial.status == "failed":
        tags["error_type"] = trial.error_type or ""
        tags["error"] = (trial.error or "")[:5000]
    run = client.create_run(experiment_id, run_name=f"trial {trial.trial.number:03d}", tags=tags)
    summary: dict[str, float] = {"train_seconds": trial.seconds, "epochs_run": trial.epochs_run}
    # The trial's model holds the judged epoch's weights (early stopping may have run on
    # past it): its metrics are the judged ones; the last epoch's are logged beside them.
    last = trial.history[-1] if trial.history else {}
    for name in ("val_accuracy", "val_loss"):
        value = getattr(trial, name)
        if value is not None:
            summary[f"judged_{name}"] = value
        if name in last:
            summary[f"last_epoch_{name}"] = last[name]
    if trial.epoch is not None:
        summary["judged_epoch"] = trial.epoch
    _log(
        client,
        run.info.run_id,
        flatten(trial.trial.settings.model_dump(mode="json"), "train"),
        trial.history,
        summary,
    )
    status = {"ok": "FINISHED", "pruned": "KILLED"}.get(trial.status, "FAILED")
    client.set_terminated(run.info.run_id, status)


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as ``a.b.c`` keys; lists and None as their JSON text."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, Mapping):
            flat.update(flatten(value, name))
        elif isinstance(value, (list, tuple)) or value is None:
            flat[name] = json.dumps(value)
        else:
            flat[name] = value
    return flat


@contextlib.contextmanager
def _mlflow_errors(settings: TrackingSettings, what: str) -> Iterator[None]:
    """MLflow's failures (store unreachable, refused) as one clear `EnvironmentProblem`."""
    require_mlflow()
    from mlflow.exceptions import MlflowException

    try:
        yield
    except (MlflowException, OSError) as exc:
        raise EnvironmentProblem(
            f"could not record {what} in MLflow at {settings.uri}: {exc}. The run itself "
            "finished; fix tracking.uri or set tracking.enabled=false"
        ) from exc


def _client(settings: TrackingSettings):
    require_mlflow()
    from mlflow.tracking import MlflowClient

    uri = resolve_uri(settings.uri)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(settings.experiment)
    experiment_id = (
        experiment.experiment_id
        if experiment is not None
        else client.create_experiment(
            settings.experiment,
            artifact_location=artifact_location(settings.uri, settings.experiment),
        )
    )
    return client, experiment_id


def _log(
    client,
    run_id: str,
    params: Mapping[str, Any],
    history: Iterable[Mapping[str, float]],
    summary: Mapping[str, float],
) -> None:
    from mlflow.entities import Metric, Param

    now = int(time.time() * 1000)
    param_list = [Param(k, str(v)) for k, v in params.items() if v is not None]
    metrics = [
        Metric(name, float(record[name]), now, int(record["epoch"]))
        for record in history
        for name in _EPOCH_METRICS
        if name in record
    ]
    metrics += [Metric(name, float(value), now, 0) for name, value in summary.items()]
    for start in range(0, len(param_list), _PARAMS_PER_BATCH):
        client.log_batch(run_id, params=param_list[start : start + _PARAMS_PER_BATCH])
    for start in range(0, len(metrics), _METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=metrics[start : start + _METRICS_PER_BATCH])


def _log_files(
    client,
    run_id: str,
    storage: Storage,
    directory: str,
    names: Iterable[str],
    artifact_path: str | None = None,
) -> None:
    """Copy the named files of `directory` (any URI) to a temporary directory and log them."""
    with tempfile.TemporaryDirectory(prefix="digits-tracking-") as local:
        copied = 0
        for name in names:
            source = f"{directory.rstrip('/')}/{name}"
            if storage.exists(source):
                Path(local, name).write_bytes(storage.read_bytes(source))
                copied += 1
            else:
                log.warning("not recorded in MLflow: %s does not exist", source)
        if copied:
            client.log_artifacts(run_id, local, artifact_path)
