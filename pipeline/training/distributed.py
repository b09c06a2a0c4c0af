"""The Spark side of training: task slots, and the barrier task each worker runs.

``df.mapInArrow(task, schema, barrier=True)`` runs one task per worker on the DataFrame's
partitions (or, when the tasks read their own files, an RDD of the ranks does). Each task
spools its rows to local files (raw float32 matrices), reserves a port on its executor's
address, and shares (address, row counts, checkpoint to resume from) with the others through
``BarrierTaskContext.allGather``: every worker then knows the cluster, the same number of
steps per epoch, and the same checkpoint. It writes ``TF_CONFIG`` and a spec, starts the
TensorFlow worker process (`pipeline.training.worker`), waits for it and yields one small
row: worker 0's model bytes (``model.keras`` and ``model.onnx``) and history, the others'
statistics.

A failed barrier ResultStage is never retried by Spark, so the barrier stage is followed
by a shuffle (``repartition(1)``), which makes it a ShuffleMapStage: when a worker dies,
Spark reruns the whole stage (up to ``spark.stage.maxConsecutiveAttempts`` times) and the
workers resume from the newest checkpoint. One worker runs an ordinary task, which Spark
retries by itself (``spark.task.maxFailures``), with no shuffle after it. A worker that
sees no progress for ``train.stall_timeout_s`` (a peer stalled, and a collective waits
for it) is not retried: its task tells the driver through the progress channel, which
cancels the stage and raises `TrainingError`; so does a task that finds no training rows
(`InputDataError`).

Ports: the reservation socket stays bound (never listening) until the worker exits, and
TensorFlow's server shares the port with it (``SO_REUSEPORT``), so two jobs on one host
never race for a port. TF_CONFIG names each executor's own address, but TensorFlow 2.x
binds its gRPC server to every interface ("0.0.0.0:<port>" is fixed in its C++ server);
the servers are unauthenticated, so keep the executors' network private.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa

from pipeline.errors import (
    EnvironmentProblem,
    InputDataError,
    PipelineError,
    SlotsBusy,
    TrainingError,
)
from pipeline.training.progress import send_once

log = logging.getLogger(__name__)

RESULT_SCHEMA = "rank int, model binary, onnx binary, monitoring binary, info string"
# A worker's validation probabilities and labels (.npz), written for the task to return.
VALIDATION_PREDICTIONS = "validation_predictions.npz"
# Exit codes of the worker process (pipeline.training.worker) that the task explains.
BIND_FAILED_EXIT = 75  # its gRPC port was taken
STALLED_EXIT = 76  # its watchdog saw no progress for train.stall_timeout_s: a peer stalled
STOPPED_EXIT = 77  # the driver asked it to stop (`run_training`'s on_epoch)
_RESULT_ARROW_SCHEMA = pa.schema(
    [
        pa.field("rank", pa.int32()),
        pa.field("model", pa.binary()),
        pa.field("onnx", pa.binary()),
        pa.field("monitoring", pa.binary()),
        pa.field("info", pa.string()),
    ]
)
_LOG_TAIL_CHARS = 3000


# -- driver: slots ------------------------------------------------------------------------
def task_slots(spark) -> tuple[int, str]:
    """How many tasks this application can run at once, and how that was worked out."""
    sc = spark.sparkContext
    conf = sc.getConf()
    task_cpus = int(conf.get("spark.task.cpus", "1"))
    master = sc.master
    match = re.fullmatch(r"local(?:\[(\*|\d+)(?:,\s*\d+)?\])?", master)
    if match:
        threads = match.group(1)
        cores = os.cpu_count() or 1 if threads == "*" else int(threads or 1)
        return cores // task_cpus, f"master {master}, spark.task.cpus={task_cpus}"
    cores = sc.defaultParallelism
    return cores // task_cpus, (
        f"{cores} executor cores in all (spark.executor.cores x executors), "
        f"spark.task.cpus={task_cpus}"
    )


def check_slots(spark, workers: int) -> None:
    """Fail at once when a barrier stage of `workers` tasks could never be scheduled."""
    slots, how = task_slots(spark)
    busy = busy_tasks(spark)
    if workers > slots - busy:
        error = SlotsBusy if workers <= slots else EnvironmentProblem
        raise error(
            f"--workers {workers} needs {workers} free task slots at once (a barrier stage); "
            f"this Spark application has {slots} ({how})"
            + (f", {busy} of them busy with other jobs" if busy else "")
            + f". Lower --workers / train.workers to at most {max(slots - busy, 1)}, or give "
            f"Spark more cores: --master local[{workers}] in local mode, otherwise "
            f"spark.executor.cores / spark.executor.instances (or a smaller spark.task.cpus)"
        )


def busy_tasks(spark) -> int:
    """Tasks running now in this application's active stages."""
    tracker = spark.sparkContext.statusTracker()
    busy = 0
    for stage_id in tracker.getActiveStageIds():
        info = tracker.getStageInfo(stage_id)
        if info is not None:
            busy += info.numActiveTasks
    return busy


# -- executor: the barrier task -----------------------------------------------------------
def make_task(spec: dict[str, Any]) -> Callable[[Iterator[pa.RecordBatch]], Iterator]:
    """The function each barrier task runs. `spec` holds plain values only."""
    spec = json.loads(json.dumps(spec))  # proof that it pickles without a session

    def task(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        from pyspark import BarrierTaskContext, TaskContext

        workers = int(spec["workers"])
        context = BarrierTaskContext.get() if workers > 1 else TaskContext.get()
        rank = context.partitionId()
        workdir = tempfile.mkdtemp(prefix=f"digits-train-{rank}-", dir=_local_dir())
        try:
            yield _run_worker(spec, context, rank, workers, batches, workdir)
        except PipelineError as exc:
            # The driver learns the error's type and message from here, not from Spark's
            # text; a final one (a retry would fail the same way) stops the stage at once.
            final = isinstance(exc, (InputDataError, _Stalled))
            kind = "InputDataError" if isinstance(exc, InputDataError) else "TrainingError"
            send_once(
                spec.get("progress"),
                {
                    "event": "error",
                    "type": kind,
                    "message": str(exc),
                    "final": final,
                    "rank": rank,
                },
            )
            raise
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    return task


def make_rank_task(spec: dict[str, Any]) -> Callable[[Iterator[int]], Iterator[dict[str, Any]]]:
    """`make_task` for an RDD that gives each task its rank alone (the tasks read their
    own files): the same task, its result row as a dict."""
    task = make_task(spec)

    def rank_task(ranks: Iterator[int]) -> Iterator[dict[str, Any]]:
        for batch in task(ranks):
            yield from batch.to_pylist()

    return rank_task


def _run_worker(spec, context, rank: int, workers: int, batches, workdir: str) -> pa.RecordBatch:
    from pipeline.training.checkpoints import CheckpointDir
    from pipeline.training.data import (
        TRAIN_SPOOL,
        VALIDATION_SPOOL,
        add_counts,
        spool_partition,
        spool_share,
    )

    started = time.monotonic()
    # The worker process starts first: it imports TensorFlow (seconds) while this task
    # spools the partition, then waits for its spec on stdin.
    log_path = os.path.join(workdir, "worker.log")
    process = _start_process(workdir, _task_cpus(context), log_path)
    reserved = None
    try:
        files = spec.get("files")
        if files:  # this task reads its share of the row groups; its one input row is its rank
            for _ in batches:
                pass
            counts = spool_share(
                files["filesystem"],
                files["shares"][rank],
                files["label_column"],
                workdir,
                spec.get("profile_bins"),
            )
        else:
            counts = spool_partition(batches, workdir, spec.get("profile_bins"))
        spooled = time.monotonic()
        host = _executor_host(context, rank, workers)
        reserved = _reserve_port(host) if workers > 1 else None
        resume = CheckpointDir(spec["checkpoint_dir"]).latest() if rank == 0 else None
        mine = {
            "rank": rank,
            "address": f"{host}:{reserved.getsockname()[1]}" if reserved else None,
            "train_rows": counts.train_rows,
            "validation_rows": counts.validation_rows,
            "train_classes": counts.train_classes,
            "validation_classes": counts.validation_classes,
            "resume_epoch": resume,
        }
        if workers > 1:
            everyone = sorted((json.loads(m) for m in context.allGather(json.dumps(mine))),
                              key=lambda m: m["rank"])  # fmt: skip
        else:
            everyone = [mine]
        classes = _input_classes(spec.get("classes_of"), everyone, add_counts)
        empty = [m["rank"] for m in everyone if m["train_rows"] == 0]
        if empty:
            raise InputDataError(
                f"worker(s) {empty} received no training rows out of "
                f"{sum(m['train_rows'] for m in everyone)}: fewer rows than workers, or an "
                f"empty partition; lower --workers"
            )
        total_train = sum(m["train_rows"] for m in everyone)
        batch = int(spec["train"]["batch_size"])
        child_spec = {
            **spec,
            "rank": rank,
            "workdir": workdir,
            "train_spool": os.path.join(workdir, TRAIN_SPOOL),
            "validation_spool": os.path.join(workdir, VALIDATION_SPOOL),
            "total_train_rows": total_train,
            "total_validation_rows": sum(m["validation_rows"] for m in everyone),
            "steps_per_epoch": math.ceil(total_train / (workers * batch)),
            # At most `validation_rows_kept` validation rows' probabilities reach the driver.
            "validation_rows_kept": int(spec.get("validation_rows_kept") or 0) // workers,
            "resume_epoch": everyone[0]["resume_epoch"],
            "environment": _cluster_environment(everyone, rank) if workers > 1 else {},
        }
        process_started = time.monotonic()
        with contextlib.suppress(BrokenPipeError):  # it died early: its exit code says why
            process.stdin.write((json.dumps(child_spec) + "\n").encode("utf-8"))
            process.stdin.close()
        code = process.wait()
    finally:
        if process.poll() is None:  # this task failed before the worker could run
            process.kill()
            process.wait()
        if reserved is not None:
            reserved.close()
    process_seconds = time.monotonic() - process_started
    if code == BIND_FAILED_EXIT:
        raise TrainingError(
            f"training worker {rank} of {workers} could not start TensorFlow's gRPC server on "
            f"{mine['address']} (port taken); Spark retries the stage with new ports"
        )
    if code == STALLED_EXIT:
        # The worker's watchdog saw no progress (a peer stalled): a retry would most likely
        # stall again, so the driver stops the stage at once.
        raise _Stalled(stalled_message(rank, workers, float(spec["train"]["stall_timeout_s"])))
    if code == STOPPED_EXIT:  # the driver has cancelled the stage too
        raise TrainingError(f"training worker {rank} stopped, as the driver asked")
    if code != 0:
        raise TrainingError(
            f"training worker {rank} of {workers} exited with code {code}; its log ends:\n"
            + _tail(log_path)
        )
    with open(os.path.join(workdir, "result.json"), encoding="utf-8") as f:
        info = json.load(f)
    info["log_tail"] = _tail(log_path, 600) if rank == 0 else ""
    info["address"] = mine["address"]  # this worker's entry in TF_CONFIG
    if classes is not None:
        info["class_counts"] = classes
    info["phases"] = {
        "read": spooled - started,
        "until_spec": process_started - spooled,
        "process_after_spec": process_seconds,
        **info.get("phases", {}),
    }
    model = onnx = None
    if rank == 0:
        from pipeline.artifact import MODEL_FILE, ONNX_FILE

        with open(os.path.join(workdir, MODEL_FILE), "rb") as f:
            model = f.read()
        with open(os.path.join(workdir, ONNX_FILE), "rb") as f:
            onnx = f.read()
    return pa.record_batch(
        [
            pa.array([rank], pa.int32()),
            pa.array([model], pa.binary()),
            pa.array([onnx], pa.binary()),
            pa.array([_monitoring(counts.profile, workdir)], pa.binary()),
            pa.array([json.dumps(info)]),
        ],
        schema=_RESULT_ARROW_SCHEMA,
    )


def _monitoring(profile, workdir: str) -> bytes | None:
    """What this worker adds to the model's monitoring record, as .npz bytes: its training
    rows' profile sums and its validation rows' probabilities (None when not asked for)."""
    import numpy as np

    arrays = {} if profile is None else {"profile_sums": profile}
    predictions = os.path.join(workdir, VALIDATION_PREDICTIONS)
    if os.path.exists(predictions):
        with np.load(predictions) as saved:
            arrays |= {name: saved[name] for name in saved.files}
    if not arrays:
        return None
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _input_classes(of: dict[str, Any] | None, everyone, add_counts) -> dict[str, int] | None:
    """The training input's rows per class, counted by all workers as they spooled, once
    checked (`check_classes`); None when the stage was not asked to check them.

    ``of["with_validation"]`` says that the validation rows are part of the input (chosen
    from it by ``train.validation_fraction``) rather than a dataset of their own."""
    if of is None:
        return None
    from pipeline.training.inputs import check_classes

    counts = add_counts(
        *(m["train_classes"] for m in everyone),
        *(m["validation_classes"] for m in everyone if of["with_validation"]),
    )
    check_classes(counts, of["path"])
    return counts


class _Stalled(TrainingError):
    """A worker's watchdog ended it: no progress within train.stall_timeout_s."""


def _start_process(workdir: str, threads: int, log_path: str) -> subprocess.Popen:
    """``python -m pipeline.training.worker WORKDIR THREADS PARENT_PID``, its spec to come
    on stdin, its output in `log_path`."""
    env = dict(os.environ)
    env.update(
        TF_CPP_MIN_LOG_LEVEL="2",
        TF_ENABLE_ONEDNN_OPTS="0",
        # Record batches are tens of MB: always mmap them, so freed ones go back to the OS
        # instead of growing the heap (glibc raises its mmap threshold after each free).
        MALLOC_MMAP_THRESHOLD_="1048576",
        MALLOC_ARENA_MAX="2",
        PYTHONPATH=os.pathsep.join(filter(None, [_package_root(), env.get("PYTHONPATH")])),
        # Temporary files in the work directory, which the task removes: the worker ends
        # with os._exit, so TensorFlow's exit hooks that would delete its own (autograph's
        # generated modules) never run.
        TMPDIR=workdir,
    )
    env.pop("TF_CONFIG", None)  # the worker sets it from its spec
    command = [sys.executable, "-m", "pipeline.training.worker", workdir, str(threads)]
    with open(log_path, "wb") as log_file:
        return subprocess.Popen(
            [*command, str(os.getpid())],
            stdin=subprocess.PIPE,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=workdir,
        )


def _cluster_environment(everyone: list[dict[str, Any]], rank: int) -> dict[str, str]:
    """The variables the worker sets before it joins the TensorFlow cluster."""
    return {
        "TF_CONFIG": json.dumps(
            {
                "cluster": {"worker": [m["address"] for m in everyone]},
                "task": {"type": "worker", "index": rank},
            }
        ),
        # The reservation (SO_REUSEPORT, bound, never listening) is held until the worker
        # exits, and TensorFlow's server may share the port with it: no other process can
        # take the port between the reservation and the server's start.
        "TF_GRPC_REUSE_PORT": "1",
    }


def stalled_message(rank: int, workers: int, timeout_s: float) -> str:
    return (
        f"worker {rank} of {workers} made no progress for train.stall_timeout_s = "
        f"{timeout_s:g} s: it waited on a collective that another worker never joined (a "
        f"worker stalled or was lost); the job stops instead of waiting. Raise "
        f"train.stall_timeout_s if the workers are merely slow"
    )


def _executor_host(context, rank: int, workers: int) -> str:
    if workers > 1:
        address = context.getTaskInfos()[rank].address
        return address.rsplit(":", 1)[0]
    return socket.gethostbyname(socket.gethostname())


def _reserve_port(host: str, attempts: int = 5) -> socket.socket:
    """A socket bound to a free port on `host`, held while the worker process runs.

    It never listens, so every connection to the port reaches TensorFlow's server, which
    shares the port through ``SO_REUSEPORT`` (``TF_GRPC_REUSE_PORT=1``).
    """
    last: OSError | None = None
    for _ in range(attempts):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, 0))
            return sock
        except OSError as exc:
            sock.close()
            last = exc
    raise TrainingError(f"could not reserve a port on {host}: {last}")


def _task_cpus(context) -> int:
    with contextlib.suppress(AttributeError, TypeError, ValueError):
        return max(1, int(context.cpus()))
    return 1


def _local_dir() -> str | None:
    for key in ("SPARK_LOCAL_DIRS", "LOCAL_DIRS"):
        value = os.environ.get(key)
        if value:
            first = value.split(",")[0]
            if os.path.isdir(first):
                return first
    return None


def _package_root() -> str:
    import pipeline

    return os.path.dirname(os.path.dirname(os.path.abspath(pipeline.__file__)))


def _tail(path: str, chars: int = _LOG_TAIL_CHARS) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - chars))
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return "(no log)"


def spark_failure(exc: Exception) -> str:
    """The first lines of a failed stage's error, for when no task reported its own."""
    java = getattr(exc, "java_exception", None)
    text = str(java.toString()) if java is not None else str(exc)
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("\tat ")]
    return " ".join(lines[:3])[:1500]
