"""Shared fixtures: one local SparkSession for the whole run, and data derived from the sample."""

from __future__ import annotations

import functools
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from pipeline.config import Config, SparkSettings
from pipeline.sample import sample_path

os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# The tests' JVMs (the shared session's, every spark-submit's, local-cluster executors,
# the standalone daemons) live for seconds on small data: the first JIT tier compiles
# enough, and the optimising tier's compiler threads would take the cores from the tests.
# On this project's small ingest job: about 18 CPU seconds instead of 30. Behaviour is
# the same; only the JVM's code generation differs.
QUICK_JVM = "-XX:TieredStopAtLevel=1"
_EXECUTORS = f"-Dspark.executor.extraJavaOptions={QUICK_JVM}"
os.environ.setdefault("SPARK_SUBMIT_OPTS", f"{QUICK_JVM} -XX:+UseSerialGC {_EXECUTORS}")
os.environ.setdefault("SPARK_DAEMON_JAVA_OPTS", QUICK_JVM)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Tests marked `cluster` are skipped where extra executor JVMs cannot start."""
    if item.get_closest_marker("cluster") is not None:
        problem = _cluster_problem()
        if problem:
            pytest.skip(f"no Spark cluster can start here: {problem}")


# Two executor JVMs of one core each run a two-task job, or say why not.
_CLUSTER_PROBE = """
from pyspark.sql import SparkSession
spark = (SparkSession.builder.master("local-cluster[2,1,1024]")
         .config("spark.ui.enabled", "false").getOrCreate())
hosts = spark.sparkContext.parallelize(range(2), 2).map(lambda _: __import__("os").getpid())
print("executor python workers:", len(set(hosts.collect())))
spark.stop()
"""


@functools.cache
def _cluster_problem() -> str | None:
    """Why `local-cluster` cannot start on this machine, or None; checked once per run."""
    from tests.faults import job_env

    try:
        probe = subprocess.run(
            [sys.executable, "-c", _CLUSTER_PROBE],
            capture_output=True,
            text=True,
            timeout=240,
            env=job_env(),
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"local-cluster[2,1,1024] did not come up ({exc})"
    if probe.returncode != 0 or "executor python workers:" not in probe.stdout:
        lines = (probe.stderr or probe.stdout).strip().splitlines() or ["no output"]
        return f"local-cluster[2,1,1024] did not come up: {lines[-1][:300]}"
    return None


@pytest.fixture(scope="session")
def spark():
    """The one SparkSession of the test run, built by the project's own session code."""
    from pipeline.session import build_session

    session = build_session(
        SparkSettings(
            master="local[2]",
            show_progress=False,
            log_level="ERROR",
            conf={
                "spark.sql.shuffle.partitions": "4",
                "spark.ui.enabled": "false",
                "spark.driver.memory": "2g",
            },
        )
    )
    yield session
    session.stop()


@pytest.fixture(scope="session")
def config() -> Config:
    """The defaults, as a job sees them with no conf files."""
    return Config()


@pytest.fixture(scope="session")
def sample_file() -> str:
    return sample_path()


@pytest.fixture(scope="session")
def sample_pixels(sample_file) -> tuple[np.ndarray, np.ndarray]:
    """The sample decoded in the test process: (uint8 pixels of shape (n, 784), labels)."""
    import pyarrow.parquet as pq

    from pipeline.features.images import decode_image

    table = pq.read_table(sample_file)
    images = table.column("image").to_pylist()
    pixels = np.stack([decode_image(img["bytes"]) for img in images])
    labels = np.asarray(table.column("label").to_pylist(), dtype=np.int64)
    return pixels, labels


@pytest.fixture(scope="session")
def ingested_sample(spark, tmp_path_factory, sample_file) -> str:
    """The whole sample ingested once per run: a features directory to train and score on."""
    from pipeline.ingest import run_ingest

    out = str(tmp_path_factory.mktemp("ingested") / "features")
    run_ingest(spark, Config(), sample_file, out)
    return out


@pytest.fixture(scope="session")
def trained_model_dir(spark, tmp_path_factory, sample_pixels) -> str:
    """A model directory trained briefly in-process on the sample's first 5,000 digits.

    Stands in for the train job's output; scoring tests hold out the last 1,000 digits.
    """
    from pipeline.artifact import model_to_bytes, new_metadata, write_model_dir
    from pipeline.config import TrainSettings
    from pipeline.model import build_model, build_optimizer
    from pipeline.storage import Storage

    pixels, labels = sample_pixels
    x = (pixels[:5000].astype(np.float64) / 255.0).astype(np.float32)
    settings = TrainSettings(epochs=2, batch_size=64)
    model = build_model(settings)
    model.compile(optimizer=build_optimizer(settings), loss="sparse_categorical_crossentropy")
    model.fit(x, labels[:5000], epochs=settings.epochs, batch_size=settings.batch_size, verbose=0)
    model_bytes = model_to_bytes(model)
    metadata = new_metadata(model_bytes, settings, epochs_completed=settings.epochs)
    model_dir = str(tmp_path_factory.mktemp("model") / "model")
    write_model_dir(Storage(spark), model_dir, metadata, model_bytes)
    return model_dir


@pytest.fixture(scope="session")
def split_features(spark, tmp_path_factory, sample_file) -> Path:
    """The whole sample ingested once with the split on: split=train, validation and test."""
    from pipeline.ingest import run_ingest

    out = tmp_path_factory.mktemp("split") / "features"
    run_ingest(spark, Config().with_overrides({"ingest": {"split": {"enabled": True}}}),
               sample_file, str(out))  # fmt: skip
    return out


# The one training job that the tests of what a run records share (its splits, its
# augmentation, its calibration, its MLflow run): short, with everything of theirs on.
TRAINING_RUN = {
    "epochs": 2,
    "hidden_units": [16],
    "augment": {"enabled": True, "max_rotation": 10.0, "max_shear": 5.0},
    "calibrate": True,
}


@pytest.fixture(scope="session")
def training_run(spark, tmp_path_factory, split_features) -> SimpleNamespace:
    """`run_training` in-process on the split sample with `TRAINING_RUN`'s settings: its
    config, result, model directory, the training stage's console lines and whether it
    asked for a SparkSession (it gets a `SessionOnDemand`, as the job does)."""
    from pipeline.session import SessionOnDemand
    from pipeline.training import run_training

    config = Config().with_overrides({"train": TRAINING_RUN})
    on_demand = SessionOnDemand(spark.sparkContext)  # as the train job has it
    model_dir = tmp_path_factory.mktemp("training-run") / "model"
    console = logging.getLogger("pipeline.training")
    handler, level = _Lines(), console.level
    console.addHandler(handler)
    console.setLevel(logging.INFO)
    try:
        result = run_training(on_demand, config, str(split_features), str(model_dir))
    finally:
        console.removeHandler(handler)
        console.setLevel(level)
    return SimpleNamespace(
        config=config,
        result=result,
        model_dir=model_dir,
        features=split_features,
        log="\n".join(handler.lines),
        session_made=on_demand.started,
    )


class _Lines(logging.Handler):
    """Keeps the messages it handles (a session fixture cannot use `caplog`)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())
