"""Checkpoints under ``MODEL/checkpoints/``: one file per epoch, written whole or not at all.

A checkpoint is one ``.npz`` file, ``epoch-0003.npz``, holding the model weights, the
optimizer's variables (step counter and momentum), the best weights seen so far (for
early stopping) and a JSON state: epoch, history, early-stopping counters, the seed, the
settings that fix the model and its training (`resume_key`) and the fingerprint of the
data it was trained on. The data position needs no more than that: a worker's batch
order in an epoch is a function of (seed, worker, epoch). `check_resumable` refuses, on
the driver, to resume from a checkpoint of other settings or other data.

Worker 0 writes it from the executor through ``pyarrow.fs`` (local paths, ``hdfs://``,
``s3://``): into a hidden temporary name, then moved into place, so a reader sees a
complete checkpoint or none. The newest file is the one to resume from; older ones are
deleted, keeping `KEEP`.
"""

from __future__ import annotations

import io
import json
import logging
import re
import uuid
import zipfile
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.errors import ConfigError, TrainingError
from pipeline.rowgroups import arrow_uri  # the one Hadoop-to-pyarrow URI converter

if TYPE_CHECKING:
    from pipeline.config import TrainSettings
    from pipeline.storage import Storage

log = logging.getLogger(__name__)

KEEP = 2
# Settings that may change between a checkpoint and the run resuming from it.
RESUMABLE_CHANGES = {
    "epochs",
    "workers",
    "steps_per_call",
    "jit_compile",
    "memory_budget_mb",
    "checkpoint_every",
    "stall_timeout_s",
    "tensorboard",
    "early_stopping",
    "overfit_patience",
}
_NAME = re.compile(r"^epoch-(\d{4,})\.npz$")
_STATE_KEY = "__state__"


def checkpoint_name(epoch: int) -> str:
    return f"epoch-{epoch:04d}.npz"


def epoch_of(name: str) -> int | None:
    """The epoch of a checkpoint file name, or None for any other file."""
    match = _NAME.match(name.rsplit("/", 1)[-1])
    return int(match.group(1)) if match else None


def encode(state: dict[str, Any], arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    payload = {_STATE_KEY: np.frombuffer(json.dumps(state).encode("utf-8"), dtype=np.uint8)}
    np.savez(buffer, **payload, **arrays)
    return buffer.getvalue()


def decode(data: bytes, where: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
        state = json.loads(arrays.pop(_STATE_KEY).tobytes().decode("utf-8"))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise TrainingError(
            f"checkpoint {where} is unreadable ({exc}); delete it or rerun with --fresh"
        ) from None
    return state, arrays


class CheckpointDir:
    """Executor-side access to ``MODEL/checkpoints/`` through pyarrow's filesystems."""

    def __init__(self, uri: str) -> None:
        from pyarrow import fs

        self._fs, self._root = fs.FileSystem.from_uri(arrow_uri(uri))
        self._root = self._root.rstrip("/")
        self._fs.create_dir(self._root, recursive=True)

    def epochs(self) -> list[int]:
        from pyarrow import fs

        infos = self._fs.get_file_info(fs.FileSelector(self._root, allow_not_found=True))
        found = (epoch_of(info.path) for info in infos if info.type == fs.FileType.File)
        return sorted(e for e in found if e is not None)

    def latest(self) -> int | None:
        epochs = self.epochs()
        return epochs[-1] if epochs else None

    def read(self, epoch: int) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        path = f"{self._root}/{checkpoint_name(epoch)}"
        with self._fs.open_input_stream(path) as stream:
            return decode(stream.read(), path)

    def write(self, epoch: int, state: dict[str, Any], arrays: dict[str, np.ndarray]) -> str:
        """Write the checkpoint of `epoch` atomically and drop all but the newest `KEEP`.

        Raises `TrainingError` when the directory is gone: whoever removed it does not get
        it back, which the write would otherwise do. A search deletes a pruned trial once
        its stage is cancelled, while the trial's worker, told to stop at its next epoch,
        may still be finishing the epoch it was in and write its checkpoint."""
        from pyarrow import fs

        if self._fs.get_file_info(self._root).type == fs.FileType.NotFound:
            raise TrainingError(f"{self._root} was removed while training ran: no checkpoint")
        final = f"{self._root}/{checkpoint_name(epoch)}"
        tmp = f"{self._root}/.tmp-{uuid.uuid4().hex}"
        with self._fs.open_output_stream(tmp) as stream:
            stream.write(encode(state, arrays))
        self._fs.move(tmp, final)
        for old in self.epochs()[:-KEEP]:
            self._fs.delete_file(f"{self._root}/{checkpoint_name(old)}")
        return final


def resume_key(settings: TrainSettings) -> dict[str, Any]:
    """The settings a checkpoint must share with the run that resumes from it."""
    dumped = settings.model_dump(mode="json")
    return {k: v for k, v in dumped.items() if k not in RESUMABLE_CHANGES}


def check_resumable(
    storage: Storage, checkpoint_dir: str, settings: TrainSettings, fingerprint: str
) -> None:
    """Refuse to resume from a checkpoint written with another model or optimizer, or on
    other data (its data fingerprint differs from `fingerprint`)."""
    if not storage.exists(checkpoint_dir):
        return
    found = [(epoch_of(p), p) for p, _ in storage.list_files(checkpoint_dir)]
    found = sorted((e, p) for e, p in found if e is not None)
    if not found:
        return
    epoch, path = found[-1]
    state, _ = decode(storage.read_bytes(path), path)
    before = state.get("settings") or {}
    now = resume_key(settings)
    changed = sorted(k for k in now if k in before and before[k] != now[k])
    if changed:
        differs = f"with other settings ({', '.join(f'train.{k}' for k in changed)} differ)"
    elif state.get("fingerprint") and state["fingerprint"] != fingerprint:
        differs = (
            f"on other data (data fingerprint {state['fingerprint'][:12]}…, this input's is "
            f"{fingerprint[:12]}…)"
        )
    else:
        differs = ""
    if differs:
        raise ConfigError(
            f"{checkpoint_dir} holds a checkpoint (epoch {epoch}) trained {differs}: "
            f"rerun with --fresh to start over, or use another model directory"
        )
    if epoch >= settings.epochs:
        log.info("checkpoint of epoch %d already reaches train.epochs = %d", epoch, settings.epochs)
    else:
        log.info("found the checkpoint of epoch %d: training resumes from it", epoch)
