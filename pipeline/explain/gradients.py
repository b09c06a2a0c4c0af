"""Integrated gradients of one class's probability, computed with `tf.GradientTape`.

For a digit x, a baseline x' and the probability f_c of class c, the attribution of
pixel i is (x_i - x'_i) times the mean gradient of f_c along the straight path from x'
to x, here by the midpoint rule over `steps` points (Sundararajan et al., 2017). The
attributions of a row add up to f_c(x) - f_c(x') up to the rule's error: the
*completeness* error, reported for every row.

TensorFlow is imported when an `IntegratedGradients` is built, which happens in the
executors (or in a test), never on import of this module.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.contract import FEATURE_DIM, NUM_CLASSES

# Path points evaluated in one TensorFlow call (rows x steps): bounds the interpolated
# batch to about 50 MB of float32 at 784 values a point.
_POINTS_PER_CALL = 16_384


@dataclass(frozen=True)
class Attributions:
    """Integrated gradients of a batch, with what completeness is checked against."""

    values: np.ndarray  # (n, FEATURE_DIM) float32
    target: np.ndarray  # (n,) int32: the class explained
    probabilities: np.ndarray  # (n, NUM_CLASSES) float32: f(x)
    target_at_baseline: np.ndarray  # (n,) float32: f_c(baseline)

    @property
    def completeness_error(self) -> np.ndarray:
        """|sum of attributions - (f_c(x) - f_c(baseline))| per row."""
        rows = np.arange(len(self.target))
        gap = self.probabilities[rows, self.target] - self.target_at_baseline
        return np.abs(self.values.sum(axis=1, dtype=np.float64) - gap).astype(np.float32)


class IntegratedGradients:
    """Integrated gradients of a Keras model's class probabilities, built once per worker.

    `model` maps (n, FEATURE_DIM) float32 inputs to (n, NUM_CLASSES) probabilities.
    `baseline` is the value of every pixel of the baseline image (0.0: black).
    """

    def __init__(self, model, steps: int = 32, baseline: float = 0.0, threads: int = 1) -> None:
        from pipeline.tf_runtime import tensorflow

        tf = tensorflow(threads)
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        self.steps = int(steps)
        self.baseline = float(baseline)
        alphas = tf.constant((np.arange(steps) + 0.5) / steps, tf.float32)
        signature = [
            tf.TensorSpec([None, FEATURE_DIM], tf.float32),
            tf.TensorSpec([None], tf.int32),
        ]

        # XLA fuses the path's points into one compiled program: about 1.4x faster on CPU.
        # No autograph (no Python control flow here): it would write a module to the
        # temporary folder for each function, which a Spark worker, killed at its end,
        # never deletes.
        @tf.function(input_signature=signature, jit_compile=True, autograph=False)
        def path_gradients(x, target):
            # (steps, n, 784) points on the path, flattened into one batch for the model.
            base = tf.fill(tf.shape(x), self.baseline)
            points = base[None] + alphas[:, None, None] * (x - base)[None]
            flat = tf.reshape(points, [-1, FEATURE_DIM])
            classes = tf.tile(target, [steps])
            with tf.GradientTape() as tape:
                tape.watch(flat)
                probabilities = model(flat, training=False)
                chosen = tf.gather(probabilities, classes[:, None], batch_dims=1)
            gradients = tape.gradient(chosen, flat)
            mean = tf.reduce_mean(tf.reshape(gradients, [steps, -1, FEATURE_DIM]), axis=0)
            return mean * (x - base)

        @tf.function(input_signature=signature[:1], autograph=False)
        def forward(x):
            return model(x, training=False)

        self._path_gradients = path_gradients
        self._forward = forward

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities of (n, FEATURE_DIM) float32 inputs."""
        if not len(x):
            return np.zeros((0, NUM_CLASSES), np.float32)
        return self._forward(np.ascontiguousarray(x, np.float32)).numpy()

    def __call__(self, x: np.ndarray, target: np.ndarray | None = None) -> Attributions:
        """Attributions of each row of `x` to the probability of `target` (default: the
        predicted class)."""
        x = np.ascontiguousarray(x, np.float32)
        probabilities = self.predict(x)
        if target is None:
            target = probabilities.argmax(axis=1)
        target = np.asarray(target, np.int32)
        values = np.empty_like(x)
        chunk = max(1, _POINTS_PER_CALL // self.steps)
        for start in range(0, len(x), chunk):
            part = slice(start, start + chunk)
            rows = len(x[part])
            # Every call gets `chunk` rows (the last one padded): XLA compiles one shape.
            pad = ((0, chunk - rows), (0, 0))
            padded = self._path_gradients(
                np.pad(x[part], pad), np.pad(target[part], pad[0])
            ).numpy()
            values[part] = padded[:rows]
        at_baseline = self.predict(np.full((1, FEATURE_DIM), self.baseline, np.float32))[0]
        return Attributions(values, target, probabilities, at_baseline[target])
