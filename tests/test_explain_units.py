"""Integrated gradients and deletion curves on real digits from the sample."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.explain import IntegratedGradients, curve_area, deletion_curves

HELD_OUT = slice(5000, 5300)  # the fixture model trained on the first 5,000 digits


@pytest.fixture(scope="module")
def model(spark, trained_model_dir):
    from pipeline.artifact import model_from_bytes, read_model_dir
    from pipeline.storage import Storage

    metadata, model_bytes = read_model_dir(Storage(spark), trained_model_dir)
    return model_from_bytes(metadata, model_bytes)


@pytest.fixture(scope="module")
def held_out(sample_pixels):
    pixels, labels = sample_pixels
    return (pixels[HELD_OUT] / 255.0).astype(np.float32), labels[HELD_OUT]


@pytest.fixture(scope="module")
def explained(model, held_out):
    explainer = IntegratedGradients(model, steps=32)
    return explainer, explainer(held_out[0])


def test_attributions_add_up_to_the_change_in_probability(explained, held_out):
    _, attributions = explained
    x, _ = held_out
    assert attributions.values.shape == x.shape
    errors = attributions.completeness_error
    # The midpoint rule at 32 steps: the sums match f(x) - f(black) to within 0.02.
    assert errors.max() < 0.02, errors.max()
    gap = attributions.probabilities.max(axis=1) - attributions.target_at_baseline
    assert np.abs(gap).mean() > 0.3  # the check is not trivially about zeros


def test_fewer_steps_give_larger_completeness_errors(model, held_out, explained):
    _, fine = explained
    coarse = IntegratedGradients(model, steps=2)(held_out[0])
    assert coarse.completeness_error.mean() > 3 * fine.completeness_error.mean()


def test_the_true_class_can_be_explained_instead(explained, held_out):
    explainer, predicted = explained
    x, labels = held_out
    wrong = np.flatnonzero(predicted.target != labels)
    assert len(wrong) > 0, "the fixture model should make some mistakes on held-out digits"
    of_label = explainer(x[wrong], labels[wrong])
    assert (of_label.target == labels[wrong]).all()
    assert not np.allclose(of_label.values, predicted.values[wrong])
    assert of_label.completeness_error.max() < 0.02


def test_a_grey_baseline_keeps_completeness(model, held_out):
    x, _ = held_out
    attributions = IntegratedGradients(model, steps=32, baseline=0.5)(x[:50])
    assert attributions.completeness_error.max() < 0.02
    # Pixels equal to the baseline get no attribution.
    assert np.all(attributions.values[np.isclose(x[:50], 0.5)] == 0)


def test_explaining_writes_no_temporary_files(model, held_out, tmp_path, monkeypatch):
    """Nothing goes to the temporary folder, which a Spark worker, killed at its end,
    would never clean (autograph writes a module there for each function it converts)."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    explainer = IntegratedGradients(model, steps=2)
    explainer(held_out[0][:3])
    explainer.predict(held_out[0][:3])
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_one_row_is_explained_as_within_a_batch(explained, held_out):
    explainer, batch = explained
    x, _ = held_out
    alone = explainer(x[7:8])
    np.testing.assert_allclose(alone.values[0], batch.values[7], atol=1e-6)


def test_attributions_beat_random_pixels_on_deletion(explained, held_out):
    explainer, attributions = explained
    x, _ = held_out
    fractions = [0.0, 0.02, 0.05, 0.1, 0.2]
    curves = deletion_curves(
        explainer.predict, x, attributions.values, attributions.target, fractions, seed=1
    )
    assert curves.rows == len(x)
    assert curves.attribution[0] == pytest.approx(0.0, abs=1e-6)
    assert curves.attribution_area > 3 * curves.random_area, curves.as_dict()
    assert curves.attribution[-1] > 0.3


def test_curve_area_is_the_mean_height_over_the_range():
    assert curve_area([0.0, 0.5, 1.0], [0.0, 1.0, 1.0]) == pytest.approx(0.75)
    assert curve_area([0.1, 0.3], [0.2, 0.2]) == pytest.approx(0.2)


def test_first_layer_weights_are_read_without_keras(spark, trained_model_dir, model):
    from pipeline.artifact import read_model_dir
    from pipeline.explain.weights import first_layer_weights
    from pipeline.storage import Storage

    metadata, model_bytes = read_model_dir(Storage(spark), trained_model_dir)
    weights = first_layer_weights(metadata, model_bytes)
    np.testing.assert_array_equal(weights, model.get_layer("hidden_0").kernel.numpy())
