"""The training loop: many SGD steps per compiled call, on one worker or kept in sync on many.

Three modes share one step (forward pass, categorical cross-entropy plus regularisation,
gradient, optimizer update):

- ``single``: one worker, no collectives.
- ``exact``: synchronous data-parallel SGD under ``MultiWorkerMirroredStrategy``. The step
  runs inside ``strategy.run``; Keras 3's optimizer sums the gradients of all workers in
  one collective all-reduce, so each worker's loss is scaled by 1/N: N workers at batch b
  take the same step as one worker at batch N*b. Weights are identical after every step.
- ``local_sgd``: each worker steps on its own data; every ``average_every`` steps and at
  the end of every epoch one all-reduce averages the weights and momentum.

``model.fit`` is not used: under the strategy it fails in Keras 3, and its per-step
overhead dominates this small model. The worker's rows live in a tensor store: the whole
partition when it fits the memory budget, held as mapped from the spool without a copy
(`Trainer.hold`), else one shuffle window at a time in two non-trainable variables.
`Trainer.train` runs ``steps_per_call`` steps per ``tf.function`` call, each step
gathering its batch from the store by row positions planned in NumPy
(`pipeline.training.data.epoch_segments`); with augmentation, a second thread gathers and
augments the next call's batches while a call trains. No tf.data pipeline and no Python
per batch. With ``train.jit_compile`` (the default) that function
is compiled with XLA, about 1.4x the steps per second on CPU, except in ``exact`` mode,
whose all-reduce inside the loop XLA cannot compile on CPU. Every call has the same shape
(short calls are padded and say how many steps to run), so XLA compiles once:
`Trainer.compile_ahead`, before the first epoch. Imported only in the worker's
TensorFlow process.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import tensorflow as tf

from pipeline.config import TrainSettings
from pipeline.contract import FEATURE_DIM, NUM_CLASSES
from pipeline.model import build_model, build_optimizer
from pipeline.tf_runtime import prefer_quick_xla_compiles
from pipeline.training.augment import make_augment

# Rows of augmented training batches made in one go (about 10 MB of pixels).
AUGMENT_CALL_ROWS = 3200
# Bytes to which TensorFlow's CPU kernels assume a tensor's memory is aligned.
_ALIGNMENT = 64


class Trainer:
    """A model, its optimizer and the compiled functions that train and evaluate it."""

    def __init__(self, settings: TrainSettings, workers: int, strategy=None) -> None:

        self.settings = settings
        self.workers = workers
        ran = settings.model_copy(update={"workers": workers})
        self.mode = ran.sync_mode()
        self.strategy = strategy
        scope = strategy.scope() if self.mode == "exact" else contextlib.nullcontext()
        with scope:
            self.model = build_model(settings)
            self.optimizer = build_optimizer(ran)  # its learning rate is the worker's
            self.optimizer.build(self.model.trainable_variables)
        self._device = strategy.extended.worker_devices[0] if strategy is not None else None
        self._store_x = self._store_y = None
        rank = strategy.cluster_resolver.task_id if strategy is not None else 0
        self._augment = make_augment(settings.augment, settings.seed, rank)  # None when off
        self.on_progress = _nothing  # called after every compiled call and collective
        # XLA fuses the steps into one compiled loop; not under exact sync
        # (`TrainSettings.compiles_with_xla`). Augmentation is always compiled.
        self.jit_compile = ran.compiles_with_xla()
        if self._augment is None:  # augmenting is code LLVM generates: level 1 slows it
            prefer_quick_xla_compiles()  # before the first compilation
        # Every call gets `_steps_per_call` rows of batches, padded, and runs the first
        # `count`: XLA compiles one shape, once (`compile_ahead`), for short calls too.
        batches = tf.TensorSpec((None, settings.batch_size), tf.int32)
        count = tf.TensorSpec((), tf.int32)
        self._train_steps = tf.function(
            self._train_steps_fn, input_signature=[batches, count], jit_compile=self.jit_compile
        )
        if self._augment is not None:
            self._train_augmented = tf.function(
                self._train_steps_fn,
                input_signature=[
                    batches,
                    count,
                    tf.TensorSpec((None, settings.batch_size, FEATURE_DIM), tf.float32),
                ],
                jit_compile=self.jit_compile,
            )
            self._augmented = tf.function(
                self._augmented_fn,
                input_signature=[batches, tf.TensorSpec((), tf.int64)],
                jit_compile=True,
            )
        self._evaluate_batch = tf.function(
            self._evaluate_batch_fn,
            input_signature=[
                tf.TensorSpec((None, FEATURE_DIM), tf.float32),
                tf.TensorSpec((None, NUM_CLASSES), tf.float32),
            ],
        )
        self._predict = tf.function(
            lambda x: self.model(x, training=False),
            input_signature=[tf.TensorSpec((None, FEATURE_DIM), tf.float32)],
        )
        if strategy is not None:
            self._allreduce = tf.function(self._allreduce_fn)
            self._average = tf.function(self._average_fn)

    # -- the step ---------------------------------------------------------------------
    def _step(self, x, y):
        import keras

        variables = self.model.trainable_variables
        with tf.GradientTape() as tape:
            probabilities = self.model(x, training=True)
            # The functional loss: Keras' Loss objects divide by the replica count themselves
            # inside a strategy; the scaling here is explicit instead.
            loss = tf.reduce_mean(keras.losses.categorical_crossentropy(y, probabilities))
            if self.model.losses:
                loss = loss + tf.add_n(self.model.losses)
            scaled = loss / self.workers if self.mode == "exact" else loss
        gradients = tape.gradient(scaled, variables)
        self.optimizer.apply(gradients, variables)
        batch = tf.cast(tf.shape(x)[0], tf.float32)
        return loss * batch, _correct(y, probabilities)

    def _train_steps_fn(self, batches, count, features=None):
        """The steps of the first `count` rows of `batches` (store positions, one row per
        step). Each step's features are gathered from the store, or taken from `features`
        (steps, batch, 784) when the batches were augmented beforehand (`Trainer.train`)."""
        loss_sum = tf.constant(0.0)
        correct = tf.constant(0.0)
        # A while loop on `count`, not `tf.range(count)`, whose loop XLA compiles anew for
        # every count.
        i = tf.constant(0)
        while i < count:
            rows = batches[i]
            x = tf.gather(self._store_x, rows) if features is None else features[i]
            y = tf.gather(self._store_y, rows)
            if self.mode == "exact":
                step_loss, step_correct = self.strategy.run(self._step, args=(x, y))
                step_loss = self.strategy.experimental_local_results(step_loss)[0]
                step_correct = self.strategy.experimental_local_results(step_correct)[0]
            else:
                step_loss, step_correct = self._step(x, y)
            loss_sum += step_loss
            correct += step_correct
            i += 1
        return loss_sum, correct

    def _augmented_fn(self, batches, first_step):
        """The training batches at store positions `batches`, augmented as at steps
        `first_step`, `first_step` + 1, ...: only training batches pass through here."""
        return self._augment.steps(tf.gather(self._store_x, batches), first_step)

    # -- the tensor store -------------------------------------------------------------
    def hold(self, x: np.ndarray, y: np.ndarray) -> None:
        """Make the whole partition, features `x` and one-hot labels `y`, the store, as
        they are: no copy (`LocalData.arrays` maps them from the spool). Call once, before
        training; for a partition that must be streamed, `make_store` instead."""
        self._store_x, self._store_y = _tensor_of(x), _tensor_of(y)

    def make_store(self, rows: int) -> None:
        """Room for `rows` rows, filled window by window (`fill_store`); call once, before
        training."""
        with tf.device(self._device or "/cpu:0"):
            self._store_x = tf.Variable(
                tf.zeros((rows, FEATURE_DIM), tf.float32), trainable=False, name="store_x"
            )
            self._store_y = tf.Variable(
                tf.zeros((rows, NUM_CLASSES), tf.float32), trainable=False, name="store_y"
            )

    def fill_store(self, blocks) -> None:
        """Place (features, labels) blocks one after another from the store's first row."""
        at = 0
        for x, y in blocks:
            n = len(x)
            if n:
                # A scatter writes in place; slice assignment (store[a:b].assign) reads the
                # variable first and then copies all of it on write, for every block.
                rows = tf.range(at, at + n)
                self._store_x.scatter_update(tf.IndexedSlices(tf.constant(x), rows))
                self._store_y.scatter_update(tf.IndexedSlices(tf.constant(y), rows))
                at += n

    def train(self, segments, steps: int) -> tuple[float, float]:
        """Run the `steps` steps of `segments`; (sum of per-sample loss, correct predictions).

        With augmentation, the batches of the next call are augmented on a second thread
        while the current call trains: the transforms are a pure function of the step, so
        they can be made ahead, and on a free core they cost the steps almost nothing.
        """
        sync_every = self.settings.average_every if self.mode == "local_sgd" else steps
        loss_sum = correct = 0.0
        done = since_sync = 0
        first_step = int(self.optimizer.iterations.numpy()) if self._augment is not None else 0
        with _augmenting_thread(self._augment is not None) as thread:
            for segment in segments:
                if segment.rows is not None:
                    self.fill_store(segment.rows)
                batches = segment.batches
                segment = None  # the window's arrays are in the store now: let them go
                calls = []
                at = 0
                while at < len(batches):
                    n = min(self._steps_per_call, len(batches) - at, sync_every - since_sync)
                    at, done, since_sync = at + n, done + n, since_sync + n
                    average = self.mode == "local_sgd" and (
                        since_sync == sync_every or done == steps
                    )
                    if average:
                        since_sync = 0
                    step = first_step + done - n
                    calls.append(_Call(self._padded(batches[at - n : at]), n, step, average))
                # All of this window's calls end before the next window fills the store.
                for call, features in zip(calls, self._features(thread, calls), strict=True):
                    if features is None:
                        step_loss, step_correct = self._train_steps(call.batches, call.count)
                    else:
                        step_loss, step_correct = self._train_augmented(
                            call.batches, call.count, features
                        )
                    loss_sum += float(step_loss)
                    correct += float(step_correct)
                    self.on_progress()
                    if call.then_average:
                        self._average()
                        self.on_progress()
        if done != steps:
            from pipeline.errors import TrainingError

            raise TrainingError(f"the epoch planned {done} steps, expected {steps}")
        return loss_sum, correct

    def _padded(self, batches: np.ndarray) -> tf.Tensor:
        """`batches` with rows of store position 0 added up to `_steps_per_call` rows."""
        missing = self._steps_per_call - len(batches)
        if missing > 0:
            batches = np.concatenate([batches, np.zeros((missing, batches.shape[1]), np.int32)])
        return tf.constant(batches, tf.int32)

    def compile_ahead(self, evaluate: bool = True) -> None:
        """Compile the training call (XLA, seconds) and, if `evaluate`, trace the
        evaluation before the first epoch: calls of zero steps and zero rows, which change
        nothing. The store's shape must be final (`make_store`); its rows need not be in
        yet.

        (XLA holds the variables while it compiles: filling the store on another thread
        meanwhile waits for it, and saves nothing.)"""
        if not self.jit_compile:
            return
        batches = self._padded(np.zeros((0, self.settings.batch_size), np.int32))
        if self._augment is None:
            self._train_steps(batches, tf.constant(0))
        else:
            features = self._augmented(batches, tf.constant(0, tf.int64))
            self._train_augmented(batches, tf.constant(0), features)
        if evaluate:
            self._evaluate_batch(tf.zeros((0, FEATURE_DIM)), tf.zeros((0, NUM_CLASSES)))

    @property
    def _steps_per_call(self) -> int:
        per_call = self.settings.steps_per_call
        if self._augment is None:
            return per_call
        # An augmented call's pixels (and XLA's intermediates, a few times as many) are
        # held at once: at most AUGMENT_CALL_ROWS rows of them.
        return max(1, min(per_call, AUGMENT_CALL_ROWS // self.settings.batch_size))

    def _features(self, thread, calls):
        """Each call's augmented features, the next call's under way on `thread` while
        this one trains; None for every call without augmentation."""
        if thread is None:
            yield from (None for _ in calls)
            return

        def start(call: _Call):
            return thread.submit(self._augmented, call.batches, call.first_step)

        ahead = start(calls[0]) if calls else None
        for following in [*calls[1:], None]:
            current, ahead = ahead, start(following) if following is not None else None
            yield current.result()

    # -- collectives ------------------------------------------------------------------
    def _allreduce_fn(self, vector):
        with tf.device(self._device):
            vector = tf.identity(vector)
        reduced = self.strategy.run(
            lambda t: tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, t),
            args=(vector,),
        )
        return self.strategy.experimental_local_results(reduced)[0]

    def allreduce_sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over all workers (the values themselves on one worker)."""
        if self.strategy is None:
            return list(values)
        self.on_progress()  # the time since the last beat was this worker's own work
        summed = [float(v) for v in self._allreduce(tf.constant(values, tf.float64)).numpy()]
        self.on_progress()
        return summed

    def _averaged_variables(self):
        momentum = [
            v
            for v in self.optimizer.variables
            if v.dtype in ("float32", tf.float32) and len(v.shape) > 0
        ]
        return list(self.model.trainable_variables) + momentum

    def _average_fn(self):
        variables = self._averaged_variables()
        with tf.device(self._device):
            flat = tf.concat([tf.reshape(v, [-1]) for v in variables], axis=0)
        summed = self.strategy.run(
            lambda t: tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, t),
            args=(flat,),
        )
        mean = self.strategy.experimental_local_results(summed)[0] / self.workers
        offset = 0
        for v in variables:
            size = int(np.prod(v.shape))
            v.assign(tf.reshape(mean[offset : offset + size], v.shape))
            offset += size

    def warm_up(self) -> None:
        """Run the collectives once before training (workers start with equal weights)."""
        if self.strategy is None:
            return
        if self.mode == "local_sgd":
            self._average()
        self.sync_point()

    def sync_point(self) -> None:
        """A collective every worker must reach: all are past the previous epoch's end."""
        self.allreduce_sum([1.0])

    # -- evaluation -------------------------------------------------------------------
    def _evaluate_batch_fn(self, x, y):
        import keras

        probabilities = self.model(x, training=False)
        loss = tf.reduce_sum(keras.losses.categorical_crossentropy(y, probabilities))
        return loss, _correct(y, probabilities)

    def evaluate(self, blocks) -> tuple[float, float, int]:
        """(sum of per-sample loss, correct, rows) over (features, labels) `blocks`."""
        loss_sum = correct = 0.0
        rows = 0
        for x, y in blocks:
            batch_loss, batch_correct = self._evaluate_batch(x, y)
            loss_sum += float(batch_loss)
            correct += float(batch_correct)
            rows += int(x.shape[0])
        return loss_sum, correct, rows

    def probabilities(self, blocks, limit: int) -> tuple[np.ndarray, np.ndarray]:
        """The model's class probabilities and the labels (one-hot's class; -1 for none) of
        the first `limit` rows of (features, labels) `blocks`."""
        probabilities: list[np.ndarray] = [np.zeros((0, NUM_CLASSES), np.float32)]
        labels: list[np.ndarray] = [np.zeros(0, np.int64)]
        left = limit
        for x, y in blocks:
            if left <= 0:
                break
            x, y = x[:left], y[:left]
            probabilities.append(np.asarray(self._predict(x), np.float32))
            hot = y == 1.0
            labels.append(np.where(hot.any(axis=1), hot.argmax(axis=1), -1))
            left -= len(x)
        return np.concatenate(probabilities), np.concatenate(labels)

    # -- state ------------------------------------------------------------------------
    def weights(self) -> list[np.ndarray]:
        return [np.asarray(w) for w in self.model.get_weights()]

    def set_weights(self, weights: list[np.ndarray]) -> None:
        self.model.set_weights(weights)

    def optimizer_state(self) -> list[np.ndarray]:
        return [np.asarray(v.numpy()) for v in self.optimizer.variables]

    def set_optimizer_state(self, values: list[np.ndarray]) -> None:
        variables = self.optimizer.variables
        if len(values) != len(variables):
            from pipeline.errors import TrainingError

            raise TrainingError(
                f"the checkpoint holds {len(values)} optimizer variables, the optimizer has "
                f"{len(variables)}: it was written with other settings; rerun with --fresh"
            )
        for variable, value in zip(variables, values, strict=True):
            variable.assign(value)


class _Call(NamedTuple):
    """One compiled call of the training loop: its batches (store positions), the
    global step of its first batch, and whether local SGD averages the weights after it."""

    batches: tf.Tensor  # padded to `_steps_per_call` rows
    count: int  # the rows of `batches` trained on
    first_step: int
    then_average: bool


def _tensor_of(array: np.ndarray) -> tf.Tensor:
    """A float32 tensor over `array`'s memory, through DLPack, without a copy (a copy
    when its memory is not aligned as TensorFlow's kernels assume: mapped files are)."""
    array = np.ascontiguousarray(array, np.float32)
    if array.ctypes.data % _ALIGNMENT or not array.flags.writeable:
        return tf.constant(array)
    return tf.experimental.dlpack.from_dlpack(array.__dlpack__())


def _nothing() -> None:
    return None


@contextlib.contextmanager
def _augmenting_thread(wanted: bool):
    """A thread that augments batches ahead of the steps (None when not `wanted`)."""
    if not wanted:
        yield None
        return
    with ThreadPoolExecutor(1, thread_name_prefix="augment") as thread:
        yield thread


def _correct(y, probabilities):
    hits = tf.equal(tf.argmax(probabilities, axis=1), tf.argmax(y, axis=1))
    return tf.reduce_sum(tf.cast(hits, tf.float32))
