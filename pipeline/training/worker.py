"""One training worker: the TensorFlow process a barrier task starts for its partition.

``python -m pipeline.training.worker WORKDIR THREADS PARENT_PID`` is started by its
Spark task before the task reads its partition: it imports TensorFlow while the task
spools the rows, then reads its spec from stdin (plain values: settings, rank, cluster
addresses, steps per epoch, spooled data files, checkpoint directory), trains, and writes
``result.json`` (and, on worker 0, ``model.keras`` and its ONNX export ``model.onnx``)
into WORKDIR.

Why a process of its own rather than TensorFlow inside the Python worker: Spark reuses
Python workers across tasks, and a TensorFlow process can join one collective cluster
only once, with thread pools fixed at start-up. A fresh process per task makes every
stage attempt (and every retry after a failure) start clean, keeps TensorFlow's output
out of the executor log, and dies with its task (``PR_SET_PDEATHSIG``).

`train` reads top to bottom as the worker's steps: start TensorFlow, join the cluster,
load the rows into the trainer's tensor store, resume, run the epochs (train, validate,
agree on the epoch's record, stop if the driver asked, stop early or not, checkpoint,
report), export the model: ``model.keras`` and ``model.onnx``, checked here to give
Keras's probabilities, so that the driver never imports TensorFlow.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import TrainingError

log = logging.getLogger("pipeline.training.worker")


# Optional imports of Keras and TensorFlow that this process needs not pay for
# (`_start_tensorflow`): scikit-learn and Matplotlib for wrappers and galleries, pandas
# and SciPy for inputs this process never gives Keras (it reads Arrow into NumPy).
_UNUSED_BY_KERAS_HERE = ("sklearn", "matplotlib", "pandas", "scipy")


class _BindFailed(TrainingError):
    """TensorFlow's gRPC server could not take its port."""


class _StopAsked(TrainingError):
    """The driver asked worker 0 to stop (its caller wants no more epochs)."""


def main(workdir: str, threads: int, parent_pid: int) -> int:
    """Start TensorFlow, then train as the spec on stdin says (it comes once the task has
    spooled its partition and agreed on the cluster with the others)."""
    from pipeline.training.distributed import BIND_FAILED_EXIT, STOPPED_EXIT

    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s worker: %(message)s",
        stream=sys.stderr,
    )
    _die_with_parent(parent_pid)
    peak = _PeakMemory()
    phases = _Phases()
    with phases.timed("import"):
        tf = _start_tensorflow(threads)
    with phases.timed("wait_for_spec"):
        line = sys.stdin.readline()
    if not line.strip():
        return 1  # the task failed before it could send the spec
    spec = json.loads(line)
    os.environ.update(spec.get("environment") or {})
    try:
        result = train(spec, tf, phases)
    except _BindFailed as exc:
        log.error("gRPC port taken: %s", exc)
        return _exit_now(BIND_FAILED_EXIT)
    except _StopAsked as exc:
        log.info("%s", exc)
        return _exit_now(STOPPED_EXIT)
    result["peak_rss_mb"] = peak.stop()
    with open(os.path.join(workdir, "result.json"), "w", encoding="utf-8") as f:
        json.dump(result, f)
    if int(spec["workers"]) > 1:
        # A peer may still be fetching this worker's part of the last all-reduce from its
        # gRPC server: exit the ordinary way, which keeps the server up a while longer.
        return 0
    # Everything is written: skip the interpreter's teardown of TensorFlow (a second).
    return _exit_now(0)


def _exit_now(code: int) -> int:
    """Exit without waiting on TensorFlow's threads (a failed collective may hold them)."""
    logging.shutdown()
    sys.stderr.flush()
    os._exit(code)
    return code  # not reached


class _Phases(dict):
    """Seconds spent in each phase of the worker, for the benchmark."""

    @contextlib.contextmanager
    def timed(self, name: str):
        """Add the seconds of the block to phase `name`."""
        started = time.monotonic()
        try:
            yield
        finally:
            self[name] = self.get(name, 0.0) + time.monotonic() - started


@dataclass
class _Progress:
    """What the epochs have done so far (restored from a checkpoint on resume)."""

    history: list[dict[str, float]] = field(default_factory=list)
    start_epoch: int = 0
    best_weights: list | None = None
    stopper: Any = None
    stopped_early: bool = False
    train_seconds: float = 0.0
    samples: int = 0
    epoch_seconds: list[float] = field(default_factory=list)


def train(spec: dict[str, Any], tf, phases: _Phases) -> dict[str, Any]:
    """The worker's whole run, TensorFlow started; the statistics for ``result.json``."""
    from pipeline.config import TrainSettings
    from pipeline.training.checkpoints import CheckpointDir
    from pipeline.training.progress import ProgressSender

    settings = TrainSettings.model_validate(spec["train"])
    workers, rank = int(spec["workers"]), int(spec["rank"])
    chief = rank == 0
    with phases.timed("cluster"):
        strategy, listening = _join_cluster(tf, workers, rank)
    with phases.timed("load"):
        train_data, validation = _open_data(spec, settings)
        trainer = _make_trainer(settings, workers, strategy, train_data, validation.rows > 0)
    if strategy is not None:
        # The first collective sets up the workers' group: cluster start-up, like the
        # server itself, so it happens before the first epoch's clock. Under local SGD it
        # is a first average, a no-op on the identical initial weights (2w/2 == w).
        with phases.timed("first_collective"):
            trainer.on_progress = _Watchdog(settings.stall_timeout_s, rank).beat
            trainer.warm_up()
    checkpoints = CheckpointDir(spec["checkpoint_dir"])
    with ProgressSender(spec.get("progress") if chief else None) as progress:
        if strategy is not None:
            cluster = json.loads(os.environ["TF_CONFIG"])["cluster"]["worker"]
            progress.send({"event": "cluster", "workers": cluster, "listen": listening})
        done = _resume(spec, settings, trainer, checkpoints, progress)
        clock = _CheckpointClock(*settings.checkpoint_interval())
        with phases.timed("epochs"), _TensorBoard.for_worker(spec, chief) as tensorboard:
            for epoch in range(done.start_epoch + 1, settings.epochs + 1):
                if done.stopped_early:
                    break
                record = _run_epoch(
                    spec, settings, trainer, train_data, validation, epoch, done, phases
                )
                if progress.stop_asked.is_set():  # no checkpoint, no model: the run is over
                    raise _StopAsked(f"stopped after epoch {epoch}, as the driver asked")
                if chief:
                    if clock.due(epoch, last=epoch == settings.epochs or done.stopped_early):
                        with phases.timed("checkpoints"):
                            _checkpoint(spec, settings, trainer, checkpoints, epoch, done)
                        trainer.on_progress()
                    left = (settings.epochs - epoch) * done.epoch_seconds[-1]
                    progress.send(
                        {"event": "epoch", **record, "epochs": settings.epochs, "eta_s": left}
                    )
                    tensorboard.write(epoch, record)
                if done.stopped_early:
                    log.info(
                        "early stopping after epoch %d (best epoch %s)",
                        epoch,
                        done.stopper.best_epoch,
                    )
    if chief:
        with phases.timed("export"):
            _export_model(settings, trainer, spec["workdir"])
    if spec.get("validation_rows_kept") and validation.rows:
        with phases.timed("predict"):
            _predict_validation(trainer, validation, spec)
    return {
        "rank": rank,
        "epochs_completed": done.history[-1]["epoch"] if done.history else 0,
        "train_rows": train_data.rows,
        "validation_rows": validation.rows,
        "in_memory": train_data.in_memory,
        "samples": done.samples,
        "train_seconds": done.train_seconds,
        "resumed_from": done.start_epoch,
        "stopped_early": done.stopped_early,
        "best_epoch": done.stopper.best_epoch,
        "weights_digest": _digest(trainer.weights()),
        "epoch_seconds": done.epoch_seconds,
        "phases": dict(phases),
        "grpc_listen": listening,
        **({"history": done.history} if chief else {}),
    }


# -- the steps ----------------------------------------------------------------------------
def _start_tensorflow(threads: int):
    """TensorFlow and Keras, imported with this task's share of the cores."""
    from pipeline.tf_runtime import tensorflow

    # Keras and TensorFlow import these, where installed, for features this process
    # never uses: seconds of every training job's start (README, Performance, times it).
    # A None entry in sys.modules makes their import fail as if they were not
    # installed, which Keras and TensorFlow allow for (all are optional there).
    for optional in _UNUSED_BY_KERAS_HERE:
        sys.modules.setdefault(optional, None)

    tf = tensorflow(threads)
    tf.get_logger().setLevel("ERROR")
    import keras  # noqa: F401  (its import is part of the start-up being timed)

    return tf


def _join_cluster(tf, workers: int, rank: int):
    """The collective strategy over TF_CONFIG's workers (None for one worker), and the
    addresses this process's gRPC server listens on."""
    if workers == 1:
        return None, []
    try:
        # No CommunicationOptions(timeout_seconds=...): TensorFlow starts one thread per
        # collective call to enforce it, each sleeping for the whole timeout, which
        # exhausts the host's threads within minutes at thousands of steps a second.
        # `_Watchdog` bounds the wait on a stalled peer instead.
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    except tf.errors.OpError as exc:
        if "could not start grpc server" in str(exc).lower():
            raise _BindFailed(str(exc)) from None
        raise
    listening = _listening()
    log.info("gRPC server of worker %d listens on %s", rank, ", ".join(listening))
    return strategy, listening


def _open_data(spec: dict[str, Any], settings):
    """This worker's spooled training and validation rows, within the memory budget."""
    from pipeline.training.data import LocalData

    budget = settings.memory_budget_mb * 1024 * 1024
    train_data = LocalData(spec["train_spool"], budget)
    # Validation rows stay in memory when the whole partition fits the budget; otherwise
    # they are read back once per epoch, chunk by chunk, like the training rows.
    left = budget - train_data.nbytes if train_data.in_memory else 0
    validation = LocalData(spec["validation_spool"], max(0, left))
    log.info(
        "worker %d/%d: %d training rows (%s), %d validation rows",
        spec["rank"],
        spec["workers"],
        train_data.rows,
        "in memory" if train_data.in_memory else "streamed from local disk",
        validation.rows,
    )
    return train_data, validation


def _make_trainer(settings, workers: int, strategy, train_data, evaluates: bool):
    """The model, its optimizer and compiled loop, with the rows in its tensor store;
    the evaluation traced too if this worker `evaluates` (has validation rows)."""
    import keras

    from pipeline.training.data import store_rows
    from pipeline.training.loop import Trainer

    keras.utils.set_random_seed(settings.seed)
    trainer = Trainer(settings, workers, strategy)
    if train_data.in_memory:
        trainer.hold(*train_data.arrays())
    else:
        trainer.make_store(store_rows(train_data, settings.shuffle_buffer, settings.batch_size))
    # Before the first epoch, so that its speed and the time left are the later epochs'.
    trainer.compile_ahead(evaluate=evaluates)
    return trainer


def _resume(spec, settings, trainer, checkpoints, progress) -> _Progress:
    """The state to start from: the checkpoint the workers agreed on, or a fresh start."""
    from pipeline.training.stopping import EarlyStopping

    epoch = spec.get("resume_epoch")
    if not epoch:
        return _Progress(stopper=EarlyStopping.from_settings(settings.early_stopping))
    state, arrays = checkpoints.read(epoch)
    trainer.set_weights(_arrays(arrays, "w"))
    trainer.set_optimizer_state(_arrays(arrays, "o"))
    log.info("resumed from the checkpoint of epoch %d", state["epoch"])
    progress.send({"event": "resume", "epoch": state["epoch"]})
    return _Progress(
        history=state["history"],
        start_epoch=state["epoch"],
        best_weights=_arrays(arrays, "b") or None,
        stopper=EarlyStopping.from_settings(settings.early_stopping, state.get("best")),
        stopped_early=bool(state.get("stopped_early")),
    )


def _run_epoch(
    spec, settings, trainer, train_data, validation, epoch: int, done: _Progress, phases
):
    """Train and validate one epoch; every worker ends with the same epoch record."""
    from pipeline.training.data import epoch_segments

    workers, steps, batch = int(spec["workers"]), int(spec["steps_per_epoch"]), settings.batch_size
    started = time.monotonic()
    segments = epoch_segments(
        train_data,
        epoch=epoch,
        worker=int(spec["rank"]),
        seed=settings.seed,
        steps=steps,
        batch_size=batch,
        shuffle_buffer=settings.shuffle_buffer,
    )
    loss_sum, correct = trainer.train(segments, steps)
    seconds = time.monotonic() - started
    with phases.timed("validate"):
        val = trainer.evaluate(validation.chunks()) if validation.rows else (0.0, 0.0, 0)
    trainer.on_progress()
    totals = trainer.allreduce_sum([loss_sum, correct, *val, seconds])
    epoch_samples = steps * batch * workers
    record = {
        "epoch": float(epoch),
        "loss": totals[0] / epoch_samples,
        "accuracy": totals[1] / epoch_samples,
    }
    if spec["total_validation_rows"] > 0:
        record["val_loss"] = totals[2] / max(totals[4], 1.0)
        record["val_accuracy"] = totals[3] / max(totals[4], 1.0)
    slowest = totals[5] / workers  # mean across workers of the epoch's training time
    record["samples_per_second"] = epoch_samples / max(seconds, slowest, 1e-9)
    done.epoch_seconds.append(seconds)
    done.train_seconds += seconds
    done.samples += steps * batch
    done.history.append(record)
    _early_stopping(settings, trainer, epoch, record, done)
    return record


def _early_stopping(settings, trainer, epoch: int, record, done: _Progress) -> None:
    """Track the best epoch; on stopping, go back to its weights if asked to."""
    stopping = settings.early_stopping
    if not (stopping.enabled and "val_loss" in record):
        return
    improved, done.stopped_early = done.stopper.update(epoch, record)
    if improved and stopping.restore_best_weights:
        done.best_weights = trainer.weights()
    if done.stopped_early and done.best_weights is not None:
        trainer.set_weights(done.best_weights)


def _checkpoint(spec, settings, trainer, checkpoints, epoch: int, done: _Progress) -> None:
    """Worker 0 writes the checkpoint of `epoch`: everything a resumed run needs."""
    arrays = _named("w", trainer.weights()) | _named("o", trainer.optimizer_state())
    if done.best_weights is not None:
        arrays |= _named("b", done.best_weights)
    state = {
        "epoch": epoch,
        "history": done.history,
        "best": done.stopper.state(),
        "stopped_early": done.stopped_early,
        "seed": settings.seed,
        "fingerprint": spec["fingerprint"],
        "settings": spec["settings_key"],
        "workers": int(spec["workers"]),
        "data_position": {"epoch": epoch, "rule": "batch order = f(seed, worker, epoch)"},
    }
    checkpoints.write(epoch, state, arrays)


class _CheckpointClock:
    """Says when worker 0 writes a checkpoint: every `epochs` epochs, or once `seconds`
    have passed since the last one, and always after the last epoch."""

    def __init__(self, epochs: int, seconds: float) -> None:
        self._epochs, self._seconds = epochs, seconds
        self._last = time.monotonic()

    def due(self, epoch: int, last: bool) -> bool:
        if self._seconds:
            due = time.monotonic() - self._last >= self._seconds
        else:
            due = epoch % self._epochs == 0
        if due or last:
            self._last = time.monotonic()
        return due or last


def _export_model(settings, trainer, workdir: str) -> None:
    """Worker 0's weights as a plain ``model.keras`` (built outside any strategy scope)
    and as ``model.onnx``, refused unless it gives the same probabilities."""
    from pipeline.artifact import MODEL_FILE, ONNX_FILE, model_to_bytes, onnx_of_model
    from pipeline.model import build_model

    plain = build_model(settings)
    plain.set_weights(trainer.weights())
    onnx_bytes = onnx_of_model(settings, plain, settings.seed)
    for name, data in ((MODEL_FILE, model_to_bytes(plain)), (ONNX_FILE, onnx_bytes)):
        with open(os.path.join(workdir, name), "wb") as f:
            f.write(data)


# -- around the steps ---------------------------------------------------------------------
def _predict_validation(trainer, validation, spec: dict[str, Any]) -> None:
    """The final model's probabilities of this worker's validation rows (up to
    ``validation_rows_kept``) and their labels, in ``VALIDATION_PREDICTIONS``, for the
    temperature and the model card."""
    import numpy as np

    from pipeline.training.distributed import VALIDATION_PREDICTIONS

    probabilities, labels = trainer.probabilities(
        validation.chunks(), int(spec["validation_rows_kept"])
    )
    path = os.path.join(spec["workdir"], VALIDATION_PREDICTIONS)
    np.savez(path, probabilities=probabilities, labels=labels)


class _Watchdog:
    """Ends the worker when training makes no progress for `timeout_s` seconds.

    The trainer beats after every compiled call and every collective; a worker waiting on
    a peer that stalled stops beating, and exits with `STALLED_EXIT`, which its Spark task
    reports to the driver.
    """

    def __init__(self, timeout_s: float, rank: int) -> None:
        self._timeout = timeout_s
        self._rank = rank
        self._last = time.monotonic()
        threading.Thread(target=self._watch, daemon=True, name="watchdog").start()

    def beat(self) -> None:
        self._last = time.monotonic()

    def _watch(self) -> None:
        from pipeline.training.distributed import STALLED_EXIT

        while True:
            time.sleep(min(1.0, self._timeout / 10))
            idle = time.monotonic() - self._last
            if idle > self._timeout:
                log.error(
                    "worker %s: no progress for %.0f s (train.stall_timeout_s = %g): "
                    "a collective is waiting for a worker that stalled or was lost",
                    self._rank,
                    idle,
                    self._timeout,
                )
                _exit_now(STALLED_EXIT)


def _listening() -> list[str]:
    """The addresses this process listens on (TensorFlow's gRPC server)."""
    import psutil

    return sorted(
        f"{c.laddr.ip}:{c.laddr.port}"
        for c in psutil.Process().net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN
    )


def _named(prefix: str, arrays) -> dict[str, Any]:
    return {f"{prefix}{i:03d}": a for i, a in enumerate(arrays)}


def _arrays(arrays: dict[str, Any], prefix: str) -> list[Any]:
    return [arrays[k] for k in sorted(arrays) if k[0] == prefix and k[1:].isdigit()]


def _digest(weights) -> str:
    import hashlib

    h = hashlib.sha256()
    for w in weights:
        h.update(w.tobytes())
    return h.hexdigest()


def _die_with_parent(parent_pid: int) -> None:
    """Exit when the Spark task's Python worker dies (it is killed with its task)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:
        os._exit(1)

    def watch():
        while True:
            if os.getppid() != parent_pid:
                os._exit(1)
            time.sleep(1.0)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


class _TensorBoard:
    """Per-epoch scalars written locally and copied to ``MODEL/logs/`` after each epoch.

    Only worker 0 with ``train.tensorboard`` on writes anything; otherwise `write` does
    nothing and no local directory is made. The local directory goes when it closes.
    """

    def __init__(self, target: str | None) -> None:
        self._target = target
        self._local = self._writer = None
        if target:
            import tempfile

            import tensorflow as tf

            self._local = tempfile.mkdtemp(prefix="digits-tb-")
            self._writer = tf.summary.create_file_writer(self._local)

    @classmethod
    @contextlib.contextmanager
    def for_worker(cls, spec: dict[str, Any], chief: bool):
        board = cls(spec.get("tensorboard_dir") if chief else None)
        try:
            yield board
        finally:
            board.close()

    def write(self, epoch: int, record: dict[str, float]) -> None:
        if self._writer is None:
            return
        import tensorflow as tf
        from pyarrow import fs
        from tensorflow.core.framework import summary_pb2

        from pipeline.rowgroups import arrow_uri

        # tf.summary.scalar needs the tensorboard package; this is the same event it writes.
        metadata = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars")
        ).SerializeToString()
        with self._writer.as_default():
            for key, value in record.items():
                if key not in ("epoch", "epochs") and math.isfinite(value):
                    tf.summary.write(
                        f"epoch_{key}", tf.constant(value, tf.float32), epoch, metadata=metadata
                    )
        self._writer.flush()
        target_fs, target_path = fs.FileSystem.from_uri(arrow_uri(self._target))
        target_fs.create_dir(target_path, recursive=True)
        fs.copy_files(self._local, target_path, destination_filesystem=target_fs)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._local is not None:
            import shutil

            shutil.rmtree(self._local, ignore_errors=True)
            self._local = None


class _PeakMemory:
    """Peak resident memory of this process, sampled in the background."""

    def __init__(self) -> None:
        import psutil

        self._process = psutil.Process()
        self._peak = self._process.memory_info().rss
        self._running = True
        self._thread = threading.Thread(target=self._sample, daemon=True, name="rss")
        self._thread.start()

    def _sample(self) -> None:
        while self._running:
            self._peak = max(self._peak, self._process.memory_info().rss)
            time.sleep(0.05)

    def stop(self) -> float:
        self._running = False
        self._peak = max(self._peak, self._process.memory_info().rss)
        return self._peak / 2**20


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
