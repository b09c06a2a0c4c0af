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


def test_the_steps_of_a_block_get_the_transforms_of_each_step_alone(digits):
    """The training loop augments the batches of many steps at once, ahead of the steps:
    each batch gets exactly what it gets when augmented alone at its step."""
    augment = make_augment(ON, seed=5, rank=1)
    block = digits[:60].reshape(3, 20, -1)
    together = augment.steps(block, tf.constant(40, tf.int64)).numpy()
    for i in range(3):
        alone = augment(block[i], tf.constant(40 + i, tf.int64)).numpy()
        np.testing.assert_allclose(together[i], alone, atol=1e-6)
    assert np.abs(together - block).max() > 0.5


# -- in the training loop ------------------------------------------------------------------


def _trainer(settings: TrainSettings, digits: np.ndarray, labels: np.ndarray):
    from pipeline.training.loop import Trainer

    trainer = Trainer(settings, workers=1)
    trainer.make_store(len(digits))
    trainer.fill_store([(digits, np.eye(10, dtype=np.float32)[labels])])
    return trainer


def _train(trainer, batches: np.ndarray) -> None:
    from pipeline.training.data import Segment

    trainer.train([Segment(None, batches)], len(batches))


@pytest.fixture(scope="module")
def training_rows(sample_pixels):
    pixels, labels = sample_pixels
    x = (pixels[:512].astype(np.float64) / 255.0).astype(np.float32)
    batches = np.random.default_rng(0).integers(0, 512, (12, 32)).astype(np.int32)
    return x, labels[:512], batches


def _plain_sgd(settings: TrainSettings, x, y, batches) -> list[np.ndarray]:
    """The reference model's SGD steps on the raw rows, written without the Trainer."""
    import keras

    from pipeline.model import build_model, build_optimizer

    model = build_model(settings)
    optimizer = build_optimizer(settings)
    optimizer.build(model.trainable_variables)

    @tf.function
    def step(xb, yb):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(
                keras.losses.categorical_crossentropy(yb, model(xb, training=True))
            )
        optimizer.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)

    for rows in batches:
        step(tf.constant(x[rows]), tf.constant(y[rows]))
    return [np.asarray(w) for w in model.get_weights()]


def test_off_trains_on_the_raw_rows_bit_for_bit(training_rows):
    x, labels, batches = training_rows
    y = np.eye(10, dtype=np.float32)[labels]
    # Bit for bit against a loop that is not XLA-compiled: XLA fuses the arithmetic in
    # another order (tests/test_training_xla.py compares the two within a tolerance).
    settings = TrainSettings(seed=3, steps_per_call=5, jit_compile=False)
    trainer = _trainer(settings, x, labels)
    _train(trainer, batches)
    expected = _plain_sgd(settings, x, y, batches)
    for got, want in zip(trainer.weights(), expected, strict=True):
        np.testing.assert_array_equal(got, want)

    on = settings.model_copy(update={"augment": ON})
    augmented = _trainer(on, x, labels)
    _train(augmented, batches)
    assert not np.array_equal(augmented.weights()[0], expected[0])


def test_training_batches_are_augmented_validation_never(training_rows, monkeypatch):
    """An augmentation that blanks every image: training sees blank batches (the first
    layer's weights get no gradient), validation still scores the raw rows."""
    x, labels, batches = training_rows
    import pipeline.training.augment as augment

    monkeypatch.setattr(augment, "affine_transform", lambda x, **_: tf.zeros_like(x))
    trainer = _trainer(TrainSettings(augment=ON, steps_per_call=5), x, labels)
    initial_kernel = trainer.weights()[0]
    _train(trainer, batches)
    weights = trainer.weights()
    np.testing.assert_array_equal(weights[0], initial_kernel)
    assert not np.array_equal(weights[3], np.zeros_like(weights[3]))  # the output bias trained

    y = np.eye(10, dtype=np.float32)[labels]
    loss_sum, correct, rows = trainer.evaluate([(x, y)])
    probabilities = trainer.model(x, training=False).numpy()
    expected_correct = float(np.sum(probabilities.argmax(1) == labels))
    blank = trainer.model(np.zeros_like(x), training=False).numpy()
    assert rows == len(x)
    assert correct == expected_correct
    assert expected_correct != float(np.sum(blank.argmax(1) == labels))
    expected_loss = -np.sum(np.log(probabilities[np.arange(len(x)), labels]))
    assert loss_sum == pytest.approx(expected_loss, rel=1e-4)


# -- in training jobs (Spark, TensorFlow worker processes) ---------------------------------


def _frame(spark, x: np.ndarray, labels: np.ndarray, parts: int):
    from pipeline.contract import FEATURES, LABEL_ONEHOT
    from pipeline.training.data import VALIDATION_FLAG

    y = np.eye(10, dtype=np.float32)[labels]
    rows = [(a.tolist(), b.tolist(), False) for a, b in zip(x, y, strict=True)]
    size = -(-len(rows) // parts)
    slices = [rows[i : i + size] for i in range(0, len(rows), size)]
    rdd = spark.sparkContext.parallelize(slices, parts).flatMap(lambda part: part)
    schema = f"{FEATURES} array<float>, {LABEL_ONEHOT} array<float>, {VALIDATION_FLAG} boolean"
    return spark.createDataFrame(rdd, schema)


@pytest.mark.slow
@pytest.mark.parametrize("sync", ["local_sgd", "exact"])
def test_two_workers_train_with_augmentation(spark, tmp_path, training_rows, sync):
    from pipeline.training import fit_partitions

    x, labels, _ = training_rows
    frame = _frame(spark, x, labels, parts=2)
    common = {"workers": 2, "sync": sync, "epochs": 1, "average_every": 4, "seed": 9}
    digests = {}
    for name, augment in (("off", AugmentSettings()), ("on", ON)):
        settings = TrainSettings(**common, augment=augment)
        fit = fit_partitions(spark, frame, settings, checkpoint_dir=str(tmp_path / name))
        assert [w["samples"] for w in fit.workers] == [8 * 32, 8 * 32]
        worker_digests = {w["weights_digest"] for w in fit.workers}
        assert len(worker_digests) == 1  # the workers end in agreement
        digests[name] = worker_digests.pop()
    assert digests["on"] != digests["off"]


@pytest.mark.slow
def test_one_worker_job_records_augmentation_and_ships_a_plain_model(spark, training_run):
    import json

    from pipeline.artifact import model_from_bytes, read_model_dir
    from pipeline.storage import Storage

    # The shared training job: one worker, augmentation on, validated on split=validation.
    result, model_dir = training_run.result, training_run.model_dir
    assert [h["epoch"] for h in result.history] == [1.0, 2.0]
    assert all(0.5 < h["val_accuracy"] <= 1.0 for h in result.history)

    recorded = json.loads((model_dir / "metadata.json").read_text())["train"]["augment"]
    asked = training_run.config.train.augment
    assert asked.enabled and (asked.max_rotation, asked.max_shear) == (10.0, 5.0)  # not defaults
    assert recorded == asked.model_dump(mode="json")
    # Augmentation lives in the training loop only: the model scoring loads is the
    # reference network, layer for layer.
    metadata, model_bytes = read_model_dir(Storage(spark), str(model_dir))
    model = model_from_bytes(metadata, model_bytes)
    assert [layer.name for layer in model.layers] == [
        "features",
        "hidden_0",
        "probabilities",
    ]


def test_streamed_windows_see_the_same_augmentation_as_the_in_memory_store(training_rows):
    """The draws follow the global step, not where a row sits in the store: the same
    rows per step train to the same weights whether the store holds the whole partition
    or one streamed window at a time."""
    from pipeline.training.data import Segment
    from pipeline.training.loop import Trainer

    x, labels, batches = training_rows
    y = np.eye(10, dtype=np.float32)[labels]
    settings = TrainSettings(augment=ON, steps_per_call=5)
    in_memory = _trainer(settings, x, labels)
    _train(in_memory, batches)

    streamed = Trainer(settings, workers=1)
    streamed.make_store(6 * 32)
    windows = []
    for half in (batches[:6], batches[6:]):
        rows = half.reshape(-1)
        positions = np.arange(len(rows), dtype=np.int32).reshape(half.shape)
        windows.append(Segment([(x[rows], y[rows])], positions))
    streamed.train(windows, len(batches))
    for a, b in zip(in_memory.weights(), streamed.weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    plain = _trainer(settings.model_copy(update={"augment": AugmentSettings()}), x, labels)
    _train(plain, batches)
    assert not np.array_equal(plain.weights()[0], streamed.weights()[0])
