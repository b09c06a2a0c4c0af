"""Random affine transforms of training batches, inside the compiled training step.

Each sample of a batch is rotated, scaled, sheared and shifted about the image centre by
its own random amounts (``train.augment.*``), bilinear-sampled with zero fill outside the
image. Only training batches pass through here: validation and scoring never do.

Built from plain TensorFlow ops that XLA compiles (stateless random draws, elementwise
arithmetic, one ``tf.gather`` over the flattened batch); ``ImageProjectiveTransformV3``,
the kernel behind Keras' image layers, has no XLA kernel and runs per sample. The draws
are a pure function of (``train.seed``, worker rank, global step): the same step of the
same worker sees the same transforms in every sync mode, on the in-memory and the
streamed path, and after a resume from a checkpoint.

Imported only in the worker's TensorFlow process.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import tensorflow as tf

from pipeline.config import AugmentSettings
from pipeline.contract import IMAGE_SIDE

# Zero border around each image: one row/column before it and two after, so that every
# clipped source coordinate in [-1, IMAGE_SIDE] has both bilinear neighbours in range.
_PADDED = IMAGE_SIDE + 3
_CENTRE = (IMAGE_SIDE - 1) / 2.0
# Draws per sample, one column each of a single stateless uniform tensor.
_ANGLE, _SCALE, _SHEAR, _DX, _DY, _DRAWS = range(6)
# Row and column of each flattened pixel (NumPy: made graph constants where used, so no
# tensor is created at import, before the worker has configured TensorFlow).
_ROWS, _COLS = (a.reshape(1, -1) for a in np.mgrid[0:IMAGE_SIDE, 0:IMAGE_SIDE].astype(np.float32))


def make_augment(
    settings: AugmentSettings, seed: int, rank: int
) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor] | None:
    """``augment(x, step)`` for this worker, or None when augmentation is off.

    `x` is a (batch, 784) float32 batch of pixels in [0, 1]; `step` the worker's global
    step (an integer scalar tensor). The function is compiled with XLA on its own, so it
    is fused even inside a training loop that is not.
    """
    if not settings.enabled:
        return None
    rotation = math.radians(settings.max_rotation)
    shear = math.radians(settings.max_shear)
    shift = float(settings.max_shift)
    scale = float(settings.max_scale_change)

    @tf.function(jit_compile=True, autograph=False)
    def compiled(x, step):
        batch = tf.shape(x)[0]
        draws = tf.random.stateless_uniform(
            (batch, _DRAWS), step_seed(seed, rank, step), minval=-1.0, maxval=1.0, alg="philox"
        )
        return affine_transform(
            x,
            angle=draws[:, _ANGLE] * rotation,
            scale=1.0 + draws[:, _SCALE] * scale,
            shear=draws[:, _SHEAR] * shear,
            dx=draws[:, _DX] * shift,
            dy=draws[:, _DY] * shift,
        )

    def augment(x, step):
        # A Keras variable (the optimizer's step counter) is read here: tf.function
        # cannot take one as an argument.
        return compiled(x, tf.cast(tf.convert_to_tensor(step), tf.int64))

    return augment


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
