"""One training worker: the TensorFlow process a barrier task starts for its partition.

``python -m pipeline.training.worker SPEC.json`` reads the spec its Spark task wrote
(plain values: settings, rank, cluster addresses, steps per epoch, spooled data files,
checkpoint directory), trains, and writes ``result.json`` (and, on worker 0,
``model.keras``) beside the spec.

Why a process of its own rather than TensorFlow inside the Python worker: Spark reuses
Python workers across tasks, and a TensorFlow process can join one collective cluster
only once, with thread pools fixed at start-up. A fresh process per task makes every
stage attempt (and every retry after a failure) start clean, keeps TensorFlow's output
out of the executor log, and dies with its task (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
from typing import Any

from pipeline.errors import TrainingError

log = logging.getLogger("pipeline.training.worker")


class _BindFailed(TrainingError):
    """TensorFlow's gRPC server could not take its port."""


def main(spec_path: str) -> int:
    from pipeline.training.distributed import BIND_FAILED_EXIT

    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s worker: %(message)s",
        stream=sys.stderr,
    )
    with open(spec_path, encoding="utf-8") as f:
        spec = json.load(f)
    _die_with_parent(spec["parent_pid"])
    peak = _PeakMemory()
    try:
        result = _train(spec, peak)
    except _BindFailed as exc:
        log.error("gRPC port taken: %s", exc)
        return _exit_now(BIND_FAILED_EXIT)
    result["peak_rss_mb"] = peak.stop()
    with open(os.path.join(spec["workdir"], "result.json"), "w", encoding="utf-8") as f:
        json.dump(result, f)
    return 0


def _exit_now(code: int) -> int:
    """Exit without waiting on TensorFlow's threads (a failed collective may hold them)."""
    logging.shutdown()
    sys.stderr.flush()
    os._exit(code)
    return code  # not reached


def _train(spec: dict[str, Any], peak: _PeakMemory) -> dict[str, Any]:
    phases: dict[str, float] = {}  # seconds spent in each phase, for the benchmark
    phase_started = time.monotonic()
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    threads = int(spec["threads"])
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)

    import keras

    from pipeline.artifact import model_to_bytes
    from pipeline.config import TrainSettings
    from pipeline.model import build_model
    from pipeline.training.checkpoints import CheckpointDir
    from pipeline.training.data import LocalData, epoch_segments, store_rows
    from pipeline.training.loop import Trainer
    from pipeline.training.stopping import EarlyStopping

    phases["import"] = time.monotonic() - phase_started
    phase_started = time.monotonic()
    settings = TrainSettings.model_validate(spec["train"])
    workers, rank = int(spec["workers"]), int(spec["rank"])
    chief = rank == 0
    strategy = None
    listening: list[str] = []
    if workers > 1:
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
    keras.utils.set_random_seed(settings.seed)
    phases["cluster"] = time.monotonic() - phase_started
    phase_started = time.monotonic()

    budget = settings.memory_budget_mb * 1024 * 1024
    train_data = LocalData(spec["train_file"], budget)
    # Validation rows stay in memory when the whole partition fits the budget; otherwise
    # they are read back once per epoch, chunk by chunk, like the training rows.
    left = budget - train_data.nbytes if train_data.in_memory else 0
    validation = LocalData(spec["validation_file"], max(0, left))
    validation.keep_in_memory()
    log.info(
        "worker %d/%d: %d training rows (%s), %d validation rows",
        rank,
        workers,
        train_data.rows,
        "in memory" if train_data.in_memory else "streamed from local disk",
        validation.rows,
    )
    has_validation = spec["total_validation_rows"] > 0

    trainer = Trainer(settings, workers, strategy)
    trainer.make_store(store_rows(train_data, settings.shuffle_buffer, settings.batch_size))
    if train_data.in_memory:
        trainer.fill_store(train_data.chunks())
    phases["load"] = time.monotonic() - phase_started
    if strategy is not None:
        # The first collective sets up the workers' group: cluster start-up, like the
        # server itself, so it happens before the first epoch's clock. Under local SGD it
        # is a first average, a no-op on the identical initial weights (2w/2 == w).
        phase_started = time.monotonic()
        trainer.on_progress = _Watchdog(settings.collective_timeout_s, spec).beat
        trainer.warm_up()
        phases["first_collective"] = time.monotonic() - phase_started
    checkpoints = CheckpointDir(spec["checkpoint_dir"])
    progress = _Progress(spec.get("progress")) if chief else _Progress(None)
    if strategy is not None:
        cluster = json.loads(os.environ["TF_CONFIG"])["cluster"]["worker"]
        progress.send({"event": "cluster", "workers": cluster, "listen": listening})

    history: list[dict[str, float]] = []
    best_weights = None
    start_epoch = 0
    resume = spec.get("resume_epoch")
    if resume:
        state, arrays = checkpoints.read(resume)
        trainer.set_weights(_arrays(arrays, "w"))
        trainer.set_optimizer_state(_arrays(arrays, "o"))
        best_weights = _arrays(arrays, "b") or None
        history, start_epoch = state["history"], state["epoch"]
        log.info("resumed from the checkpoint of epoch %d", start_epoch)
        progress.send({"event": "resume", "epoch": start_epoch})

    steps = int(spec["steps_per_epoch"])
    batch = settings.batch_size
    stopping = settings.early_stopping
    stopper = EarlyStopping.from_settings(stopping, state.get("best") if resume else None)
    stopped_early = state_stopped = bool(resume) and bool(state.get("stopped_early"))
    train_seconds = 0.0
    samples = 0
    epoch_seconds: list[float] = []
    tensorboard = _TensorBoard(spec.get("tensorboard_dir")) if chief else None
    epoch = start_epoch
    loop_started = time.monotonic()
    for epoch in range(start_epoch + 1, settings.epochs + 1):
        if state_stopped:
            break
        started = time.monotonic()
        segments = epoch_segments(
            train_data,
            epoch=epoch,
            worker=rank,
            seed=settings.seed,
            steps=steps,
            batch_size=batch,
            shuffle_buffer=settings.shuffle_buffer,
        )
        loss_sum, correct = trainer.train(segments, steps)
        seconds = time.monotonic() - started
        epoch_seconds.append(seconds)
        val = trainer.evaluate(validation.chunks()) if validation.rows else (0.0, 0.0, 0)
        trainer.on_progress()
        totals = trainer.allreduce_sum([loss_sum, correct, *val, seconds])
        epoch_samples = steps * batch * workers
        record = {
            "epoch": float(epoch),
            "loss": totals[0] / epoch_samples,
            "accuracy": totals[1] / epoch_samples,
        }
        if has_validation:
            record["val_loss"] = totals[2] / max(totals[4], 1.0)
            record["val_accuracy"] = totals[3] / max(totals[4], 1.0)
        slowest = totals[5] / workers  # mean across workers of the epoch's training time
        record["samples_per_second"] = epoch_samples / max(seconds, slowest, 1e-9)
        train_seconds += seconds
        samples += steps * batch
        history.append(record)

        if stopping.enabled and has_validation:
            improved, stopped_early = stopper.update(epoch, record)
            if improved and stopping.restore_best_weights:
                best_weights = trainer.weights()

        if stopped_early and best_weights is not None:
            trainer.set_weights(best_weights)
        if chief:
            arrays = _named("w", trainer.weights()) | _named("o", trainer.optimizer_state())
            if best_weights is not None:
                arrays |= _named("b", best_weights)
            state = {
                "epoch": epoch,
                "history": history,
                "best": stopper.state(),
                "stopped_early": stopped_early,
                "seed": settings.seed,
                "fingerprint": spec["fingerprint"],
                "settings": spec["settings_key"],
                "workers": workers,
                "data_position": {"epoch": epoch, "rule": "batch order = f(seed, worker, epoch)"},
            }
            checkpoints.write(epoch, state, arrays)
            trainer.on_progress()
            left = (settings.epochs - epoch) * (time.monotonic() - started)
            progress.send({"event": "epoch", **record, "epochs": settings.epochs, "eta_s": left})
            if tensorboard is not None:
                tensorboard.write(epoch, record)
        if spec.get("stall_at_epoch") == epoch and rank == workers - 1:
            _stall()
        if spec.get("fail_at_epoch") == epoch:
            _inject_fault(trainer, checkpoints, rank, workers)
        if stopped_early:
            log.info("early stopping after epoch %d (best epoch %s)", epoch, stopper.best_epoch)
            break

    phases["epochs"] = time.monotonic() - loop_started  # training, validation, checkpoints
    result: dict[str, Any] = {
        "rank": rank,
        "epochs_completed": history[-1]["epoch"] if history else 0,
        "train_rows": train_data.rows,
        "validation_rows": validation.rows,
        "in_memory": train_data.in_memory,
        "samples": samples,
        "train_seconds": train_seconds,
        "resumed_from": start_epoch,
        "stopped_early": stopped_early,
        "best_epoch": stopper.best_epoch,
        "weights_digest": _digest(trainer.weights()),
        "epoch_seconds": epoch_seconds,
        "phases": phases,
        "grpc_listen": listening,
    }
    if chief:
        result["history"] = history
        plain = build_model(settings)  # outside any strategy scope, for a plain .keras file
        plain.set_weights(trainer.weights())
        with open(os.path.join(spec["workdir"], "model.keras"), "wb") as f:
            f.write(model_to_bytes(plain))
        if tensorboard is not None:
            tensorboard.close()
    progress.close()
    return result


def _inject_fault(trainer, checkpoints, rank: int, workers: int) -> None:
    """Test only: the last worker's Spark task dies once, after this epoch's checkpoint."""
    if workers > 1:
        trainer.sync_point()  # worker 0 has finished writing the checkpoint
    if rank == workers - 1 and checkpoints.claim_once("fault-injected"):
        log.error("fault injection: killing this worker's Spark task")
        os.kill(os.getppid(), signal.SIGKILL)
        os._exit(1)


class _Watchdog:
    """Ends the worker when training makes no progress for `timeout_s` seconds.

    The trainer beats after every compiled call and every collective; a worker waiting on
    a peer that stalled stops beating, and exits with the collective-timeout code, which
    its Spark task reports to the driver.
    """

    def __init__(self, timeout_s: float, spec: dict[str, Any]) -> None:
        self._timeout = timeout_s
        self._spec = spec
        self._last = time.monotonic()
        threading.Thread(target=self._watch, daemon=True, name="watchdog").start()

    def beat(self) -> None:
        self._last = time.monotonic()

    def _watch(self) -> None:
        from pipeline.training.distributed import COLLECTIVE_TIMEOUT_EXIT

        while True:
            time.sleep(min(1.0, self._timeout / 10))
            idle = time.monotonic() - self._last
            if idle > self._timeout:
                log.error(
                    "worker %s: no progress for %.0f s (train.collective_timeout_s = %g): "
                    "a collective is waiting for a worker that stalled or was lost",
                    self._spec["rank"],
                    idle,
                    self._timeout,
                )
                _exit_now(COLLECTIVE_TIMEOUT_EXIT)


def _stall() -> None:
    """Test only: this worker stops answering (alive, never reaching another collective)."""
    log.error("fault injection: this worker stalls")
    while True:
        time.sleep(60)


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


class _Progress:
    """Worker 0's epoch lines to the driver's listener; training goes on if it is gone."""

    def __init__(self, address: list | None) -> None:
        self._sock = None
        if address:
            try:
                self._sock = socket.create_connection((address[0], int(address[1])), timeout=10)
            except OSError as exc:
                log.warning("no progress to the driver (%s)", exc)

    def send(self, message: dict[str, Any]) -> None:
        if self._sock is None:
            return
        try:
            self._sock.sendall((json.dumps(message) + "\n").encode("utf-8"))
        except OSError as exc:
            log.warning("progress connection lost (%s)", exc)
            self._sock = None

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()


class _TensorBoard:
    """Per-epoch scalars written locally and copied to ``MODEL/logs/`` after each epoch."""

    def __init__(self, target: str | None) -> None:
        import tempfile

        import tensorflow as tf

        self._target = target
        self._local = tempfile.mkdtemp(prefix="digits-tb-")
        self._writer = tf.summary.create_file_writer(self._local) if target else None

    def write(self, epoch: int, record: dict[str, float]) -> None:
        if self._writer is None:
            return
        import tensorflow as tf
        from pyarrow import fs
        from tensorflow.core.framework import summary_pb2

        from pipeline.training.checkpoints import arrow_uri

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
    sys.exit(main(sys.argv[1]))
