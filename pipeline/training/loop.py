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
overhead dominates this small model. `Trainer.train` runs ``steps_per_call`` steps per
``tf.function`` call, pulling batches from a ``tf.data`` iterator inside the loop.
Imported only in the worker's TensorFlow process.
"""

from __future__ import annotations

import contextlib

import numpy as np
import tensorflow as tf

from pipeline.config import TrainSettings
from pipeline.model import build_model, build_optimizer


class Trainer:
    """A model, its optimizer and the compiled functions that train and evaluate it."""

    def __init__(self, settings: TrainSettings, workers: int, strategy=None) -> None:

        self.settings = settings
        self.workers = workers
        self.mode = "single" if workers == 1 else settings.sync
        self.strategy = strategy
        self.steps_done = 0
        scope = strategy.scope() if self.mode == "exact" else contextlib.nullcontext()
        with scope:
            self.model = build_model(settings)
            self.optimizer = build_optimizer(settings)
            self.optimizer.build(self.model.trainable_variables)
        self._device = strategy.extended.worker_devices[0] if strategy is not None else None
        self._train_steps = tf.function(self._train_steps_fn)
        self._evaluate_batch = tf.function(
            self._evaluate_batch_fn, reduce_retracing=True, jit_compile=False
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

    def _train_steps_fn(self, iterator, steps):
        loss_sum = tf.constant(0.0)
        correct = tf.constant(0.0)
        for _ in tf.range(steps):
            x, y = next(iterator)
            if self.mode == "exact":
                step_loss, step_correct = self.strategy.run(self._step, args=(x, y))
                step_loss = self.strategy.experimental_local_results(step_loss)[0]
                step_correct = self.strategy.experimental_local_results(step_correct)[0]
            else:
                step_loss, step_correct = self._step(x, y)
            loss_sum += step_loss
            correct += step_correct
        return loss_sum, correct

    def train(self, dataset, steps: int) -> tuple[float, float]:
        """Run `steps` steps over `dataset`; (sum of per-sample loss, correct predictions)."""
        iterator = iter(dataset)
        per_call = self.settings.steps_per_call
        sync_every = self.settings.average_every if self.mode == "local_sgd" else steps
        loss_sum = correct = 0.0
        done = since_sync = 0
        while done < steps:
            n = min(per_call, steps - done, sync_every - since_sync)
            step_loss, step_correct = self._train_steps(iterator, tf.constant(n, tf.int32))
            loss_sum += float(step_loss)
            correct += float(step_correct)
            done += n
            since_sync += n
            if self.mode == "local_sgd" and (since_sync == sync_every or done == steps):
                self._average()
                since_sync = 0
        self.steps_done += steps
        return loss_sum, correct

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
        return [float(v) for v in self._allreduce(tf.constant(values, tf.float64)).numpy()]

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

    def sync_point(self) -> None:
        """A collective every worker must reach: all are past the previous epoch's end."""
        self.allreduce_sum([1.0])

    # -- evaluation -------------------------------------------------------------------
    def _evaluate_batch_fn(self, x, y):
        import keras

        probabilities = self.model(x, training=False)
        loss = tf.reduce_sum(keras.losses.categorical_crossentropy(y, probabilities))
        return loss, _correct(y, probabilities)

    def evaluate(self, dataset) -> tuple[float, float, int]:
        """(sum of per-sample loss, correct, rows) over `dataset` on this worker."""
        loss_sum = correct = 0.0
        rows = 0
        for x, y in dataset:
            batch_loss, batch_correct = self._evaluate_batch(x, y)
            loss_sum += float(batch_loss)
            correct += float(batch_correct)
            rows += int(x.shape[0])
        return loss_sum, correct, rows

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


def _correct(y, probabilities):
    hits = tf.equal(tf.argmax(probabilities, axis=1), tf.argmax(y, axis=1))
    return tf.reduce_sum(tf.cast(hits, tf.float32))
