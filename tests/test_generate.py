"""The scale-data generator: deterministic, exact, realistic, and ingestible in every layout."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.config import Config
from pipeline.contract import FEATURE_DIM, LABEL, Layout
from pipeline.errors import ConfigError
from pipeline.generate import (
    ID,
    Augmentation,
    augment,
    load_base_digits,
    run_generate,
    to_record_batch,
)
from pipeline.ingest import run_ingest

ROWS = 600


@pytest.fixture(scope="module")
def base():
    return load_base_digits()


@pytest.fixture(scope="module")
def generated(spark, tmp_path_factory):
    """ROWS rows in each layout, seed 7, written by the Spark job's function."""
    root = tmp_path_factory.mktemp("generated")
    return {
        layout: run_generate(spark, Config(), ROWS, str(root / layout.value), layout, seed=7)
        for layout in Layout
    }


def _correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64) - a.mean(axis=1, keepdims=True)
    b = b.astype(np.float64) - b.mean(axis=1, keepdims=True)
    return (a * b).sum(axis=1) / np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1) + 1e-12)


def _best_shift_correlation(a: np.ndarray, b: np.ndarray, reach: int = 4) -> np.ndarray:
    """Correlation of each row of `a` with `b` moved by the best whole-pixel shift."""
    images = b.reshape(-1, 28, 28)
    best = np.full(len(a), -1.0)
    for dy in range(-reach, reach + 1):
        for dx in range(-reach, reach + 1):
            moved = np.roll(images, (dy, dx), axis=(1, 2)).reshape(len(b), -1)
            best = np.maximum(best, _correlation(a, moved))
    return best


def test_augment_is_a_function_of_seed_and_id_only(base):
    pixels, _ = base
    ids = np.arange(1000, 1300)
    first, sources = augment(pixels, ids, 3, Augmentation())
    shuffled = np.random.default_rng(0).permutation(len(ids))
    again, again_sources = augment(pixels, ids[shuffled], 3, Augmentation())
    np.testing.assert_array_equal(again, first[shuffled])
    np.testing.assert_array_equal(again_sources, sources[shuffled])
    other_seed, _ = augment(pixels, ids, 4, Augmentation())
    assert (other_seed != first).any(axis=1).mean() > 0.99


def test_augmented_digits_differ_but_keep_their_shape(base):
    pixels, labels = base
    out, sources = augment(pixels, np.arange(2000), 11, Augmentation())
    assert out.shape == (2000, FEATURE_DIM) and out.dtype == np.uint8
    assert (out != pixels[sources]).any(axis=1).mean() > 0.99
    # Every source digit is reachable, and labels are spread like the sample's.
    assert len(np.unique(labels[sources])) == 10
    own = _best_shift_correlation(out, pixels[sources])
    others = np.where(labels[(sources + 1) % len(labels)] != labels[sources])[0]
    foreign = _best_shift_correlation(out[others], pixels[(sources[others] + 1) % len(labels)])
    assert np.median(own) > 0.8
    assert np.median(own) > np.median(foreign) + 0.2


def test_without_distortion_the_digit_is_unchanged(base):
    pixels, _ = base
    still = Augmentation(
        max_shift=0,
        max_rotation=0,
        max_scale_change=0,
        thicker_probability=0,
        thinner_probability=0,
        noise_probability=0,
    )
    out, sources = augment(pixels, np.arange(50), 0, still)
    np.testing.assert_array_equal(out, pixels[sources])


@pytest.mark.parametrize("layout", list(Layout))
def test_record_batch_matches_the_spark_schema(spark, layout, base):
    from pyspark.sql.pandas.types import from_arrow_schema

    from pipeline.generate import spark_schema

    pixels, labels = base
    batch = to_record_batch(np.arange(3), pixels[:3], labels[:3], layout)
    expected = spark.createDataFrame([], spark_schema(layout)).schema
    got = from_arrow_schema(batch.schema)
    assert [(f.name, f.dataType) for f in got] == [(f.name, f.dataType) for f in expected]


def test_row_count_ids_and_determinism(spark, generated, tmp_path):
    result = generated[Layout.ARRAY]
    assert result.rows == ROWS
    table = pq.read_table(result.output.removeprefix("file:")).sort_by(ID)
    assert table.num_rows == ROWS
    assert table.column(ID).to_pylist() == list(range(ROWS))
    assert set(table.column(LABEL).to_pylist()) <= set(range(10))

    # Same seed, different partitioning: the same rows.
    config = Config().model_copy(
        update={"generate": Config().generate.model_copy(update={"min_rows_per_task": 100})}
    )
    again = run_generate(spark, config, ROWS, str(tmp_path / "again"), Layout.ARRAY, seed=7)
    assert again.files > result.files
    assert pq.read_table(again.output.removeprefix("file:")).sort_by(ID).equals(table)


def test_layouts_hold_the_same_digits(generated):
    tables = {
        layout: pq.read_table(r.output.removeprefix("file:")).sort_by(ID)
        for layout, r in generated.items()
    }
    array = np.stack(tables[Layout.ARRAY].column("pixels").to_numpy(zero_copy_only=False))
    columns = np.stack(
        [tables[Layout.COLUMNS].column(f"pixel{i}").to_numpy() for i in range(FEATURE_DIM)],
        axis=1,
    )
    np.testing.assert_array_equal(array, columns)
    assert array.min() >= 0 and array.max() <= 255
    for table in tables.values():
        assert table.column(LABEL).equals(tables[Layout.ARRAY].column(LABEL))


@pytest.mark.parametrize("layout", list(Layout))
def test_every_layout_ingests_without_rejects(spark, generated, tmp_path, layout):
    result = run_ingest(spark, Config(), generated[layout].output, str(tmp_path / "features"))
    assert result.layout == layout.value
    assert result.counts.rows_in == ROWS
    assert result.counts.rows_out == ROWS
    assert result.counts.rows_rejected == 0


def test_image_layout_decodes_to_the_array_layout(spark, generated, tmp_path):
    features = {}
    for layout in (Layout.IMAGE, Layout.ARRAY):
        out = run_ingest(spark, Config(), generated[layout].output, str(tmp_path / layout.value))
        rows = spark.read.parquet(out.output).orderBy(ID).collect()
        features[layout] = np.array([r["features"] for r in rows], dtype=np.float32)
    np.testing.assert_array_equal(features[Layout.IMAGE], features[Layout.ARRAY])


def test_invalid_row_count_is_refused(spark, tmp_path):
    with pytest.raises(ConfigError, match="--rows"):
        run_generate(spark, Config(), 0, str(tmp_path / "none"))
    assert not (tmp_path / "none").exists()


def test_generate_settings_are_validated():
    with pytest.raises(ConfigError, match=r"generate\.max_rotation"):
        Config().with_overrides({"generate": {"max_rotation": 400}})
    with pytest.raises(ConfigError, match="thicker_probability"):
        Config().with_overrides(
            {"generate": {"thicker_probability": 0.8, "thinner_probability": 0.5}}
        )
