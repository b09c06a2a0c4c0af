"""TensorFlow in a Spark task: imported late, quietly, with the task's share of the cores.

Import this module anywhere; it imports TensorFlow only when `tensorflow()` is called,
which happens in executor code (never on the driver, never before Spark forks).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

log = logging.getLogger(__name__)

_configured_threads: int | None = None

# XLA's LLVM optimisation level for compiled training steps. At the default (3) the
# reference model's steps take half a second longer to compile than at 1 and run no
# faster: their time goes to the matrix kernels that XLA calls, not to code LLVM
# generates. At 0 they run at half the speed. Not with augmentation, whose compiled
# transform is such generated code: level 1 slowed it (augment_bench on/off ratio 0.48
# against 0.59 at the default).
XLA_OPTIMIZATION = "--xla_backend_optimization_level=1"


def prefer_quick_xla_compiles() -> None:
    """Use `XLA_OPTIMIZATION` in this process unless XLA_FLAGS sets a level already.
    XLA reads its flags at its first compilation, so call this before that."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_backend_optimization_level" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {XLA_OPTIMIZATION}".strip()


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Hide what TensorFlow's C++ start-up prints to fd 2 (CUDA probes, CPU features).

    Those lines come before TensorFlow reads TF_CPP_MIN_LOG_LEVEL's effect on absl, and
    in local mode they would land on the job's console. Python errors are unaffected:
    they are raised as exceptions, not written during the import.
    """
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def tensorflow(threads: int = 1):
    """The `tensorflow` module, imported on first use with `threads` intra/inter-op threads.

    Set the threads to ``spark.task.cpus``: otherwise every task on a machine starts
    thread pools as large as the machine and they fight over the cores.
    """
    global _configured_threads
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with _native_stderr_silenced():
        import tensorflow as tf

        tf.config.list_physical_devices()  # device probing prints here, once
        if _configured_threads is None:
            try:
                tf.config.threading.set_intra_op_parallelism_threads(threads)
                tf.config.threading.set_inter_op_parallelism_threads(threads)
                _configured_threads = threads
            except RuntimeError:  # TensorFlow already ran in this process: pools are fixed
                _configured_threads = tf.config.threading.get_intra_op_parallelism_threads()
    if _configured_threads != threads:
        log.debug("TensorFlow keeps %s threads in this worker", _configured_threads)
    return tf
