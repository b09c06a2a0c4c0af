"""The training loop compiled with XLA (``train.jit_compile``): no Spark, a few seconds."""

from __future__ import annotations

import os

import numpy as np
import pytest

from pipeline.config import AugmentSettings, TrainSettings

tf = pytest.importorskip("tensorflow")

from pipeline.training.data import Segment  # noqa: E402
from pipeline.training.loop import Trainer  # noqa: E402

ROWS, BATCH, EPOCHS = 512, 32, 2


@pytest.fixture(scope="module")
def rows(sample_pixels):
    pixels, labels = sample_pixels
    x = (pixels[:ROWS].astype(np.float64) / 255.0).astype(np.float32)
    return x, np.eye(10, dtype=np.float32)[labels[:ROWS]]


def _trainer(settings: TrainSettings) -> Trainer:
    import keras

    keras.utils.set_random_seed(settings.seed)  # as the worker does: same initial weights
    return Trainer(settings, workers=1)


def _trained(settings: TrainSettings, x: np.ndarray, y: np.ndarray) -> Trainer:
    """Two epochs over the rows, each in its own shuffled order, 8 steps per call."""
    trainer = _trainer(settings)
    trainer.make_store(len(x))
    trainer.fill_store([(x, y)])
    rng = np.random.default_rng(1)
    for _ in range(EPOCHS):
        order = rng.permutation(len(x)).astype(np.int32).reshape(-1, BATCH)
        trainer.train([Segment(None, order)], len(order))
    return trainer


@pytest.mark.parametrize("augment", [False, True], ids=["plain", "augmented"])
def test_xla_trains_to_the_weights_of_the_plain_loop(rows, augment):
    x, y = rows
    settings = TrainSettings(
        seed=4, steps_per_call=8, augment=AugmentSettings(enabled=augment, max_shear=10.0)
    )
    compiled = _trained(settings.model_copy(update={"jit_compile": True}), x, y)
    plain = _trained(settings.model_copy(update={"jit_compile": False}), x, y)
    assert compiled.jit_compile and not plain.jit_compile

    initial = _trainer(settings).weights()
    for on, off, before in zip(compiled.weights(), plain.weights(), initial, strict=True):
        assert np.abs(off - before).max() > 1e-3  # training moved the weights
        np.testing.assert_allclose(on, off, rtol=0, atol=1e-4)
    assert compiled.evaluate([(x, y)]) == pytest.approx(plain.evaluate([(x, y)]), rel=1e-4)


def test_xla_is_used_alone_and_under_local_sgd_never_under_exact():
    assert TrainSettings().jit_compile  # on by default
    assert TrainSettings(workers=1, sync="exact").compiles_with_xla()  # one worker: no sync
    assert TrainSettings(workers=2, sync="local_sgd").compiles_with_xla()
    assert not TrainSettings(workers=2, sync="exact").compiles_with_xla()
    assert not TrainSettings(workers=1, jit_compile=False).compiles_with_xla()
    assert Trainer(TrainSettings(sync="local_sgd"), workers=2).jit_compile
    assert not Trainer(TrainSettings(jit_compile=False), workers=1).jit_compile


def test_local_sgd_workers_step_at_the_learning_rate_times_the_workers():
    """Averaging N workers' weights averages their steps: under local SGD each worker's
    optimizer starts at learning_rate x N, unless scale_learning_rate is off; exact SGD
    (N workers at batch b = one at batch N*b) and one worker keep learning_rate."""
    assert TrainSettings(workers=2).worker_learning_rate() == pytest.approx(0.02)
    three = TrainSettings(workers=3, learning_rate=0.05)
    assert three.worker_learning_rate() == pytest.approx(0.15)
    assert TrainSettings(workers=2, sync="exact").worker_learning_rate() == 0.01
    assert TrainSettings(workers=2, scale_learning_rate=False).worker_learning_rate() == 0.01
    assert TrainSettings(workers=1).worker_learning_rate() == 0.01
    # The trainer is told its workers (a worker's settings may say 1).
    assert float(Trainer(TrainSettings(), workers=2).optimizer.learning_rate) == pytest.approx(0.02)
    assert float(_trainer(TrainSettings()).optimizer.learning_rate) == pytest.approx(0.01)


def test_a_multi_worker_run_names_its_sync_mode_and_the_other_ones_cost():
    from pipeline.training.fit import SYNC_BENCHMARK, sync_message

    local = sync_message(TrainSettings(workers=2))
    assert local.startswith("2 workers, train.sync=local_sgd (local SGD, weights averaged")
    assert "XLA on" in local and "--set train.sync=exact for exact" in local
    assert f"exact at {SYNC_BENCHMARK['exact'][0]:.2f}x" in local
    assert "learning rate 0.01 x 2 workers = 0.02, see train.scale_learning_rate" in local
    unscaled = sync_message(TrainSettings(workers=2, scale_learning_rate=False))
    assert "learning rate" not in unscaled
    exact = sync_message(TrainSettings(workers=2, sync="exact"))
    assert "train.sync=exact (exact synchronous SGD" in exact
    assert "XLA off, it cannot compile the all-reduce on CPU" in exact
    assert "--set train.sync=local_sgd for local SGD" in exact


def test_compiles_at_the_quick_optimisation_level_unless_the_user_set_one(monkeypatch):
    from pipeline.tf_runtime import XLA_OPTIMIZATION, prefer_quick_xla_compiles

    monkeypatch.delenv("XLA_FLAGS", raising=False)
    prefer_quick_xla_compiles()
    assert os.environ["XLA_FLAGS"] == XLA_OPTIMIZATION

    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/dump")
    prefer_quick_xla_compiles()
    assert os.environ["XLA_FLAGS"] == f"--xla_dump_to=/tmp/dump {XLA_OPTIMIZATION}"

    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=3")
    prefer_quick_xla_compiles()
    assert os.environ["XLA_FLAGS"] == "--xla_backend_optimization_level=3"


@pytest.mark.parametrize("augment", [False, True], ids=["plain", "augmented"])
def test_every_call_has_one_shape_compiled_ahead_without_changing_the_model(rows, augment):
    """Short calls (an epoch's last, local SGD's before an average) are padded to the
    call's shape: XLA compiles one shape, before the rows are in the store, and the
    padding trains nothing."""
    x, y = rows
    settings = TrainSettings(
        seed=4, steps_per_call=8, augment=AugmentSettings(enabled=augment, max_shear=10.0)
    )
    order = np.random.default_rng(2).permutation(len(x))[: 13 * BATCH].astype(np.int32)
    batches = order.reshape(13, BATCH)

    ahead = _trainer(settings)
    initial = ahead.weights(), ahead.optimizer_state()
    ahead.make_store(len(x))
    ahead.compile_ahead()  # on the empty store
    for now, before in zip(
        [*ahead.weights(), *ahead.optimizer_state()], [*initial[0], *initial[1]], strict=True
    ):
        np.testing.assert_array_equal(now, before)
    name = "_train_augmented" if augment else "_train_steps"
    compiled, seen = getattr(ahead, name), []

    def recorded(batches, count, *features):
        seen.append((tuple(batches.shape), int(count)))
        return compiled(batches, count, *features)

    setattr(ahead, name, recorded)
    ahead.fill_store([(x, y)])
    ahead.train([Segment(None, batches)], 13)
    assert seen == [((8, BATCH), 8), ((8, BATCH), 5)]

    # The count is an input of the one compiled program, not a constant XLA bakes in
    # (as for `tf.range(count)`: one program per count).
    padded = ahead._padded(batches[:5])
    features = tf.zeros((8, BATCH, 784)) if augment else None

    def program(count: int) -> str:
        return compiled.experimental_get_compiler_ir(padded, tf.constant(count), features)(
            stage="hlo"
        )

    assert program(5) == program(8)

    # The same 13 steps in one call of 13: the same weights.
    whole = _trainer(settings.model_copy(update={"steps_per_call": 13}))
    whole.make_store(len(x))
    whole.fill_store([(x, y)])
    whole.train([Segment(None, batches)], 13)
    for a, b, before in zip(ahead.weights(), whole.weights(), initial[0], strict=True):
        assert np.abs(a - before).max() > 1e-4  # the steps moved the weights
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("evaluate", [False, True])
def test_compiling_ahead_traces_the_evaluation_only_when_asked(rows, evaluate):
    """A worker without validation rows (`compile_ahead(evaluate=False)`) traces no
    evaluation; the training call is compiled either way."""
    trainer = _trainer(TrainSettings(seed=4, steps_per_call=8))
    trainer.make_store(len(rows[0]))
    trainer.compile_ahead(evaluate=evaluate)
    assert trainer._train_steps.experimental_get_tracing_count() == 1
    assert trainer._evaluate_batch.experimental_get_tracing_count() == int(evaluate)
