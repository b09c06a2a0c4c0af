"""Helpers for tests that run the jobs as users do (``spark-submit`` subprocesses) and for
the fault tests that hurt them on cue: kill executors, kill or pause training workers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

REPO = Path(__file__).resolve().parent.parent
SPARK_SUBMIT = str(Path(sys.executable).with_name("spark-submit"))
LOCAL_CLUSTER = "local-cluster[2,1,1024]"  # two real executor JVMs with one core each


def job_env(**extra: str) -> dict[str, str]:
    """The environment a job runs in: this interpreter for Spark's Python workers, the
    project's Spark configuration, TensorFlow's C++ log quiet; `extra` on top."""
    env = dict(
        os.environ,
        PYSPARK_PYTHON=sys.executable,
        TF_CPP_MIN_LOG_LEVEL="2",
        SPARK_CONF_DIR=str(REPO / "conf"),
    )
    env.update(extra)
    return env


def job_command(job: str, *args: str, master: str = "local[2]", conf=()) -> list[str]:
    """``spark-submit --master MASTER [--conf K=V ...] jobs/JOB ARGS``."""
    command = [SPARK_SUBMIT, "--master", master]
    for item in conf:
        command += ["--conf", item]
    return [*command, str(REPO / "jobs" / job), *args]


def run_job(
    job: str, *args: str, master: str = "local[2]", conf=(), env=None, cwd=None, timeout=600
) -> subprocess.CompletedProcess:
    """Run ``spark-submit jobs/JOB`` to the end; its output captured as text."""
    return subprocess.run(
        job_command(job, *args, master=master, conf=conf),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env or job_env(),
        cwd=cwd,
        check=False,
    )


def run_in_process(job: str, *args: str) -> int:
    """Run ``jobs/JOB`` with `args` in this process, as its command line would, on the test
    run's SparkSession; return its exit code. For tests about what a job does, not about
    spark-submit."""
    import importlib.util

    from pipeline.cli import run

    spec = importlib.util.spec_from_file_location(f"job_{Path(job).stem}", REPO / "jobs" / job)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        run(module.main, module.parser(), list(args))
    except SystemExit as exited:
        return exited.code
    raise AssertionError(f"jobs/{job} returned without an exit code")


def submit(
    job: str, *args: str, master: str = LOCAL_CLUSTER, conf=(), cwd=None
) -> subprocess.Popen:
    """Start ``spark-submit jobs/JOB`` in its own process group (stdout and stderr merged)."""
    return subprocess.Popen(
        job_command(job, *args, master=master, conf=conf),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=job_env(),
        cwd=cwd,
        start_new_session=True,
    )


def executors(job: subprocess.Popen) -> list[psutil.Process]:
    """The executor JVMs started by `job` (descendants of its process)."""
    try:
        children = psutil.Process(job.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    found = []
    for child in children:
        try:
            if "CoarseGrainedExecutorBackend" in " ".join(child.cmdline()):
                found.append(child)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def training_workers(root: psutil.Process | None = None) -> dict[int, psutil.Process]:
    """The TensorFlow worker processes (``python -m pipeline.training.worker WORKDIR ...``)
    below `root` (default: this process), by rank, read from the work directory on their
    command line (``.../digits-train-RANK-XXXX``)."""
    root = root or psutil.Process()
    found = {}
    try:
        children = root.children(recursive=True)
    except psutil.NoSuchProcess:
        return {}
    for child in children:
        try:
            command = child.cmdline()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if "pipeline.training.worker" in command and child.status() != psutil.STATUS_ZOMBIE:
            workdir = Path(command[command.index("pipeline.training.worker") + 1]).name
            found[int(workdir.split("-")[2])] = child
    return found


def wait_for(condition: Callable[[], bool], timeout: float, what: str, job=None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if job is not None and job.poll() is not None:
            raise RuntimeError(f"the job ended before {what}:\n{job.stdout.read()[-4000:]}")
        time.sleep(0.2)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def staging_dirs(output: Path) -> list[Path]:
    return sorted(output.parent.glob(f".{output.name}.staging-*"))


def kill_process_group(job: subprocess.Popen) -> None:
    os.killpg(job.pid, signal.SIGKILL)
    job.wait(timeout=60)


def finish(job: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    out, _ = job.communicate(timeout=timeout)
    return job.returncode, out


def fingerprint(df: DataFrame, key: str = "id") -> dict[str, int]:
    """Row count, distinct keys and an order-independent hash of every row's content."""
    row_hash = F.xxhash64(*[F.col(c) for c in sorted(df.columns)]).cast("decimal(38,0)")
    result = df.agg(
        F.count(F.lit(1)).alias("rows"),
        F.countDistinct(key).alias("keys"),
        F.sum(row_hash).alias("hash"),
    ).first()
    return {"rows": int(result["rows"]), "keys": int(result["keys"]), "hash": int(result["hash"])}


def max_array_difference(left: DataFrame, right: DataFrame, key: str, column: str) -> float:
    """The largest element-wise difference of an array column between two runs, joined on `key`."""
    joined = left.select(key, F.col(column).alias("a")).join(
        right.select(key, F.col(column).alias("b")), key
    )
    diff = F.array_max(F.zip_with("a", "b", lambda x, y: F.abs(x - y)))
    return float(joined.agg(F.max(diff)).first()[0])


def break_trials(monkeypatch, *names: str) -> None:
    """Make the search trials named (``"001"``...) fail inside the real training run: they
    are handed a features path that does not exist."""
    from pipeline import training

    real = training.run_training

    def run_training(spark, config, input_path, model_dir, *args, **kwargs):
        if model_dir.rstrip("/").rpartition("/")[2] in names:
            input_path = f"{input_path}/_no_such_features"
        return real(spark, config, input_path, model_dir, *args, **kwargs)

    monkeypatch.setattr(training, "run_training", run_training)
