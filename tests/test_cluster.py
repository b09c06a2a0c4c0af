"""The pipeline on a real Spark standalone cluster: a master and two workers on loopback.

Starts the cluster from the installed pyspark (`spark-class ... Master` / `Worker`),
submits ingest -> train (two workers, a barrier stage across two executor JVMs) ->
score through `spark-submit --master spark://127.0.0.1:PORT`, checks the results and
stops the cluster.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.faults import job_env, run_job

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

SPARK_CLASS = str(Path(sys.executable).with_name("spark-class"))


def _start(args: list[str], log: Path) -> subprocess.Popen:
    handle = log.open("w")
    env = job_env(SPARK_LOCAL_IP="127.0.0.1")
    env.pop("SPARK_CONF_DIR")  # Spark's default INFO logging: the master logs its URL
    return subprocess.Popen(
        [SPARK_CLASS, *args],
        stdout=handle,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )


def _wait_for_line(log: Path, pattern: str, timeout: float, count: int = 1) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.findall(pattern, log.read_text()) if log.exists() else []
        if len(found) >= count:
            return found
        time.sleep(0.5)
    raise TimeoutError(f"no {pattern!r} in {log} after {timeout:.0f}s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """URL of a running standalone master with two one-core workers; stopped afterwards."""
    logs = tmp_path_factory.mktemp("cluster")
    processes = []
    try:
        master = _start(
            [
                "org.apache.spark.deploy.master.Master",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--webui-port",
                "0",
            ],
            logs / "master.log",
        )
        processes.append(master)
        (url,) = _wait_for_line(logs / "master.log", r"Starting Spark master at (spark://\S+)", 120)
        for i in range(2):
            processes.append(
                _start(
                    [
                        "org.apache.spark.deploy.worker.Worker",
                        url,
                        "--host",
                        "127.0.0.1",
                        "--cores",
                        "1",
                        "--memory",
                        "2g",
                        "--webui-port",
                        "0",
                        "--work-dir",
                        str(logs / f"work{i}"),
                    ],
                    logs / f"worker{i}.log",
                )
            )
        _wait_for_line(logs / "master.log", r"Registering worker", 120, count=2)
        yield url
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


def _submit(url: str, job: str, *args: str) -> subprocess.CompletedProcess:
    return run_job(
        job,
        *args,
        master=url,
        conf=["spark.executor.memory=1g"],
        env=job_env(SPARK_LOCAL_IP="127.0.0.1"),
        timeout=900,
    )


def test_ingest_train_score_on_a_standalone_cluster(cluster, tmp_path, sample_file):
    features, model, predictions = (tmp_path / n for n in ("features", "model", "predictions"))

    ingest = _submit(
        cluster,
        "ingest.py",
        "--input",
        sample_file,
        "--output",
        str(features),
        "--set",
        "ingest.split.enabled=true",
    )
    assert ingest.returncode == 0, (ingest.stdout + ingest.stderr)[-4000:]
    report = json.loads((features / "_report.json").read_text())
    assert (report["rows_in"], report["rows_out"]) == (6000, 6000)

    train = _submit(
        cluster,
        "train.py",
        "--input",
        str(features / "split=train"),
        "--model-dir",
        str(model),
        "--workers",
        "2",
        "--set",
        "train.epochs=3",
        "--set",
        "train.validation_fraction=0.1",
    )
    assert train.returncode == 0, (train.stdout + train.stderr)[-4000:]
    metadata = json.loads((model / "metadata.json").read_text())
    assert metadata["workers"] == 2 and metadata["epochs_completed"] == 3
    assert metadata["data"]["rows"] == _parquet_rows(features / "split=train")

    score = _submit(
        cluster,
        "score.py",
        "--input",
        str(features / "split=test"),
        "--model-dir",
        str(model),
        "--output",
        str(predictions),
    )
    assert score.returncode == 0, (score.stdout + score.stderr)[-4000:]
    scored = json.loads((predictions / "_report.json").read_text())
    test_rows = _parquet_rows(features / "split=test")  # counted from the files themselves
    assert scored["rows_in"] == scored["rows_out"] == test_rows > 400
    assert _parquet_rows(predictions) == test_rows
    assert scored["evaluation"]["accuracy"] > 0.85


def _parquet_rows(directory: Path) -> int:
    """Rows in the Parquet files of `directory` and below, from their footers."""
    import pyarrow.parquet as pq

    return sum(pq.read_metadata(p).num_rows for p in directory.rglob("*.parquet"))
