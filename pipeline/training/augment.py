"""Random affine transforms of training batches, compiled with XLA.

Each sample of a batch is rotated, scaled, sheared and shifted about the image centre by
its own random amounts (``train.augment.*``), bilinear-sampled with zero fill outside the
image. Only training batches pass through here: validation and scoring never do. The
training loop (`pipeline.training.loop.Trainer.train`) augments the batches of its next
call on a second thread while the current call trains.

Built from plain TensorFlow ops that XLA compiles (stateless random draws, elementwise
arithmetic, four ``tf.gather`` over the flattened batch); ``ImageProjectiveTransformV3``,
the kernel behind Keras' image layers, has no XLA kernel and runs per sample. The draws
are a pure function of (``train.seed``, worker rank, global step): the same step of the
same worker sees the same transforms in every sync mode, on the in-memory and the
streamed path, alone or with the steps around it, and after a resume from a checkpoint.

Imported only in the worker's TensorFlow process.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from pipeline.config import AugmentSettings
from pipeline.contract import FEATURE_DIM, IMAGE_SIDE

# Zero border around each image: one row/column before it and two after, so that every
# clipped source coordinate in [-1, IMAGE_SIDE] has both bilinear neighbours in range.
_PADDED = IMAGE_SIDE + 3
_CENTRE = (IMAGE_SIDE - 1) / 2.0
# Draws per sample, one column each of a single stateless uniform tensor.
_ANGLE, _SCALE, _SHEAR, _DX, _DY, _DRAWS = range(6)
# Row and column of each flattened pixel (NumPy: made graph constants where used, so no
# tensor is created at import, before the worker has configured TensorFlow).
_ROWS, _COLS = (a.reshape(1, -1) for a in np.mgrid[0:IMAGE_SIDE, 0:IMAGE_SIDE].astype(np.float32))


class Augment:
    """One worker's augmentation: ``augment(x, step)`` transforms one batch, and
    ``augment.steps(x, first_step)`` the batches of consecutive steps at once.

    Both are compiled with XLA on their own, so they are fused even inside a training
    loop that is not. Each step's draws depend only on (seed, rank, step): a batch gets
    the same transforms whether it is augmented alone or with the steps around it.
    """

    def __init__(self, settings: AugmentSettings, seed: int, rank: int) -> None:
        self._seed, self._rank = seed, rank
        self._scales = {
            _ANGLE: math.radians(settings.max_rotation),
            _SCALE: float(settings.max_scale_change),
            _SHEAR: math.radians(settings.max_shear),
            _DX: float(settings.max_shift),
            _DY: float(settings.max_shift),
        }
        self._one = tf.function(self._one_fn, jit_compile=True, autograph=False)
        self._steps = tf.function(self._steps_fn, jit_compile=True)

    def __call__(self, x, step) -> tf.Tensor:
        """`x`, a (batch, 784) float32 batch of pixels in [0, 1], transformed as at the
        worker's global `step` (an integer scalar tensor)."""
        # A Keras variable (the optimizer's step counter) may be passed: tf.function
        # cannot take one as an argument.
        return self._one(x, tf.cast(tf.convert_to_tensor(step), tf.int64))

    def steps(self, x, first_step) -> tf.Tensor:
        """`x`, (steps, batch, 784): batch i transformed as at step `first_step` + i."""
        return self._steps(x, tf.cast(tf.convert_to_tensor(first_step), tf.int64))

    def _draws(self, batch, step) -> tf.Tensor:
        seed = step_seed(self._seed, self._rank, step)
        return tf.random.stateless_uniform(
            (batch, _DRAWS), seed, minval=-1.0, maxval=1.0, alg="philox"
        )

    def _transform(self, x, draws) -> tf.Tensor:
        amount = {k: draws[:, k] * scale for k, scale in self._scales.items()}
        return affine_transform(
            x,
            angle=amount[_ANGLE],
            scale=1.0 + amount[_SCALE],
            shear=amount[_SHEAR],
            dx=amount[_DX],
            dy=amount[_DY],
        )

    def _one_fn(self, x, step):
        return self._transform(x, self._draws(tf.shape(x)[0], step))

    def _steps_fn(self, x, first_step):
        steps, batch = tf.shape(x)[0], tf.shape(x)[1]
        draws = tf.map_fn(
            lambda i: self._draws(batch, first_step + i),
            tf.range(tf.cast(steps, tf.int64)),
            fn_output_signature=tf.float32,
        )
        flat = self._transform(tf.reshape(x, (-1, FEATURE_DIM)), tf.reshape(draws, (-1, _DRAWS)))
        return tf.reshape(flat, tf.shape(x))


def make_augment(settings: AugmentSettings, seed: int, rank: int) -> Augment | None:
    """The augmentation of this worker (`Augment`), or None when augmentation is off."""
    if not settings.enabled:
        return None
    return Augment(settings, seed, rank)


def step_seed(seed: int, rank: int, step) -> tf.Tensor:
    """The stateless seed of one worker's step: distinct for every (seed, rank, step)."""
    step = tf.cast(step, tf.int64)
    return tf.stack([tf.constant(seed, tf.int64), tf.constant(rank, tf.int64) * 2**40 + step])


def affine_transform(x, angle, scale, shear, dx, dy) -> tf.Tensor:
    """Each flattened image of `x` transformed by its own parameters (one per sample).

    The digit is sheared along x (by angle `shear`), scaled by `scale`, rotated by
    `angle` (radians; positive turns it clockwise as displayed, rows growing downwards),
    all about the image centre, then moved `dx` pixels right and `dy` down. Each output
    pixel is the bilinear interpolation of the input at its inverse image, zero outside.
    """
    x = tf.convert_to_tensor(x, tf.float32)
    batch = tf.shape(x)[0]
    side = IMAGE_SIDE
    column = lambda v: tf.reshape(tf.cast(v, tf.float32), (-1, 1))  # noqa: E731
    angle, scale, shear, dx, dy = map(column, (angle, scale, shear, dx, dy))

    # The inverse map, output -> source, per sample: unshift, unrotate and unscale,
    # unshear; as source = (p, q; s, t) . (output - centre - shift) + centre.
    cos, sin = tf.cos(angle) / scale, tf.sin(angle) / scale
    tan = tf.tan(shear)
    p, q = cos + tan * sin, sin - tan * cos
    s, t = -sin, cos
    cx, cy = _CENTRE + dx, _CENTRE + dy
    cols, rows = tf.constant(_COLS), tf.constant(_ROWS)
    source_x = p * cols + q * rows + (_CENTRE - p * cx - q * cy)
    source_y = s * cols + t * rows + (_CENTRE - s * cx - t * cy)
    source_x = tf.clip_by_value(source_x, -1.0, float(side))
    source_y = tf.clip_by_value(source_y, -1.0, float(side))

    x0, y0 = tf.floor(source_x), tf.floor(source_y)
    wx, wy = source_x - x0, source_y - y0
    # Flat position of each top-left neighbour in the padded batch, exact in float32.
    offsets = tf.cast(tf.range(batch) * (_PADDED * _PADDED) + _PADDED + 1, tf.float32)
    top_left = tf.cast(y0 * _PADDED + x0 + offsets[:, None], tf.int32)
    images = tf.reshape(x, (batch, side, side))
    padded = tf.reshape(tf.pad(images, [[0, 0], [1, 2], [1, 2]]), (-1,))
    # Four gathers of (batch, 784) rather than one of stacked corners: XLA on CPU emits a
    # plain loop for each, and the stacked form cost several times more.
    top = tf.gather(padded, top_left) * (1 - wx) + tf.gather(padded, top_left + 1) * wx
    bottom_left = top_left + _PADDED
    bottom = tf.gather(padded, bottom_left) * (1 - wx) + tf.gather(padded, bottom_left + 1) * wx
    # Weights are non-negative and sum to one: only rounding can pass 1.
    return tf.minimum(top * (1 - wy) + bottom * wy, 1.0)
