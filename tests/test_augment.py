"""Augmentation of training batches (pipeline.training.augment): no Spark, a few seconds."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import AugmentSettings, Config, TrainSettings
from pipeline.contract import IMAGE_SIDE
from pipeline.errors import ConfigError

tf = pytest.importorskip("tensorflow")

from pipeline.training.augment import affine_transform, make_augment  # noqa: E402

ON = AugmentSettings(enabled=True, max_shear=10.0)


@pytest.fixture(scope="module")
def digits(sample_pixels) -> np.ndarray:
    """64 real digits of the sample as the training loop sees them: float32 in [0, 1]."""
    pixels, _ = sample_pixels
    return (pixels[:64].astype(np.float64) / 255.0).astype(np.float32)


def _fixed(n: int, angle=0.0, scale=1.0, shear=0.0, dx=0.0, dy=0.0) -> dict:
    return {
        name: np.full(n, value, np.float32)
        for name, value in dict(angle=angle, scale=scale, shear=shear, dx=dx, dy=dy).items()
    }


def test_off_by_default_and_then_no_function():
    assert Config().train.augment.enabled is False
    assert TrainSettings().augment == AugmentSettings()
    assert make_augment(TrainSettings().augment, seed=42, rank=0) is None


def test_settings_checked_at_load():
    with pytest.raises(ConfigError, match=r"train\.augment\.max_rotation"):
        Config().with_overrides({"train": {"augment": {"max_rotation": -1}}})
    with pytest.raises(ConfigError, match=r"train\.augment\.rotation"):
        Config().with_overrides({"train": {"augment": {"rotation": 5}}})


def test_changes_the_batch_reproducibly_per_seed_rank_and_step(digits):
    x = tf.constant(digits)
    augment = make_augment(ON, seed=42, rank=0)
    first = augment(x, tf.constant(7, tf.int64)).numpy()
    assert first.shape == digits.shape
    assert np.abs(first - digits).max() > 0.5
    # The same step again, and a freshly built function: the same pixels.
    np.testing.assert_array_equal(first, augment(x, tf.constant(7, tf.int64)).numpy())
    again = make_augment(ON, seed=42, rank=0)(x, tf.constant(7, tf.int64)).numpy()
    np.testing.assert_array_equal(first, again)
    # Another step, another worker, another seed: other transforms.
    others = [
        augment(x, tf.constant(8, tf.int64)),
        make_augment(ON, seed=42, rank=1)(x, tf.constant(7, tf.int64)),
        make_augment(ON, seed=43, rank=0)(x, tf.constant(7, tf.int64)),
    ]
    for other in others:
        assert np.abs(other.numpy() - first).max() > 0.1


def test_step_may_be_a_keras_variable(digits):
    import keras

    step = keras.Variable(3, dtype="int64", trainable=False)
    augment = make_augment(ON, seed=1, rank=0)
    np.testing.assert_array_equal(
        augment(digits, step).numpy(), augment(digits, tf.constant(3, tf.int64)).numpy()
    )


def test_a_pure_shift_moves_a_real_digit_exactly(digits):
    n = len(digits)
    moved = affine_transform(digits, **_fixed(n, dx=2.0, dy=-1.0)).numpy()
    images = digits.reshape(n, IMAGE_SIDE, IMAGE_SIDE)
    expected = np.zeros_like(images)
    expected[:, :-1, 2:] = images[:, 1:, :-2]  # two columns right, one row up, zero fill
    np.testing.assert_array_equal(moved.reshape(images.shape), expected)
    # The identity leaves every pixel as it was.
    np.testing.assert_array_equal(affine_transform(digits, **_fixed(n)).numpy(), digits)


def test_a_quarter_turn_is_a_clockwise_rotation(digits):
    n = len(digits)
    turned = affine_transform(digits, **_fixed(n, angle=np.pi / 2)).numpy()
    images = digits.reshape(n, IMAGE_SIDE, IMAGE_SIDE)
    expected = np.rot90(images, k=-1, axes=(1, 2)).reshape(n, -1)
    np.testing.assert_allclose(turned, expected, atol=1e-5)


def test_scaling_up_about_the_centre_enlarges_the_digit(digits):
    n = len(digits)
    bigger = affine_transform(digits, **_fixed(n, scale=1.2)).numpy()
    # Ink mass grows with the area: about 1.2 squared.
    ratio = bigger.sum() / digits.sum()
    assert 1.3 < ratio < 1.6


def test_output_in_range_and_ink_mass_kept(digits):
    augment = make_augment(AugmentSettings(enabled=True, max_scale_change=0.0), seed=0, rank=0)
    for step in range(5):
        out = augment(digits, tf.constant(step, tf.int64)).numpy()
        assert out.min() >= 0.0 and out.max() <= 1.0
        # Rotation and shift move ink, they do not make or lose it (the digits sit inside
        # a margin wider than the largest shift).
        ratio = out.sum(axis=1) / digits.sum(axis=1)
        assert np.all(np.abs(ratio - 1.0) < 0.05), ratio


def test_compiles_inside_an_xla_training_loop(digits):
    augment = make_augment(ON, seed=5, rank=2)
    store = tf.constant(digits)

    @tf.function(jit_compile=True)
    def loop(first_step):
        total = tf.zeros((32, digits.shape[1]))
        for i in tf.range(3):
            batch = tf.gather(store, tf.range(32) + 16 * i)
            total += augment(batch, first_step + tf.cast(i, tf.int64))
        return total

    fused = loop(tf.constant(10, tf.int64)).numpy()
    one_by_one = sum(
        augment(digits[16 * i : 16 * i + 32], tf.constant(10 + i, tf.int64)).numpy()
        for i in range(3)
    )
    np.testing.assert_allclose(fused, one_by_one, atol=1e-5)
    assert np.abs(fused - sum(digits[16 * i : 16 * i + 32] for i in range(3))).max() > 0.1
