"""The explain job end to end on real digits: outputs, checks and pictures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.config import Config
from pipeline.contract import FEATURE_DIM, LABEL
from pipeline.errors import ConfigError
from pipeline.explain.run import CLASS_PLOT, ERRORS_PLOT, FIRST_LAYER_PLOT, run_explain

PNG = b"\x89PNG\r\n\x1a\n"


def _config(**explain) -> Config:
    return Config().with_overrides({"explain": {"faithfulness_rows": 300, **explain}})


@pytest.fixture(scope="module")
def explained(spark, ingested_sample, trained_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("explain") / "explanations"
    result = run_explain(spark, _config(), ingested_sample, trained_model_dir, str(out))
    return result, out


def test_every_row_gets_attributions_that_add_up(explained):
    result, out = explained
    table = pq.read_table(out)
    assert table.num_rows == result.counts.rows_out == 6000
    assert {"prediction", "confidence", "attribution", "completeness_error", LABEL} <= set(
        table.column_names
    )
    attributions = np.stack(table.column("attribution").to_numpy(zero_copy_only=False)[:50])
    assert attributions.shape == (50, FEATURE_DIM)
    report = json.loads((out / "_report.json").read_text())
    assert report["job"] == "explain" and report["status"] == "ok"
    completeness = report["completeness"]
    assert completeness["rows"] == 6000
    assert completeness["max_error"] < 0.02, completeness
    assert completeness["max_error"] == pytest.approx(
        max(table.column("completeness_error").to_pylist()), abs=1e-5
    )


def test_attributions_beat_random_pixels(explained):
    result, out = explained
    faithfulness = json.loads((out / "_report.json").read_text())["faithfulness"]
    assert faithfulness["rows"] == 300  # the bounded sample, spread over the tasks
    assert faithfulness["attribution_area"] > 3 * faithfulness["random_area"], faithfulness
    assert result.deletion.attribution_area == pytest.approx(faithfulness["attribution_area"])


def test_pictures_are_written(explained):
    result, out = explained
    for name in (CLASS_PLOT, ERRORS_PLOT, FIRST_LAYER_PLOT):
        data = (out / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000, name
    assert set(result.pictures) == {CLASS_PLOT, ERRORS_PLOT, FIRST_LAYER_PLOT}


def test_raw_input_with_top_pixels_only(spark, sample_file, trained_model_dir, tmp_path):
    import pyarrow as pa

    raw = tmp_path / "raw.parquet"
    pq.write_table(pq.read_table(sample_file).slice(5000, 400), raw)
    out = tmp_path / "explanations"
    config = _config(store_attributions=False, top_pixels=5, target="label", error_examples=4)
    result = run_explain(spark, config, str(raw), trained_model_dir, str(out))
    table = pq.read_table(out)
    assert "attribution" not in table.column_names
    assert table.num_rows == result.counts.rows_out == 400
    top = table.column("top_pixels").combine_chunks()
    assert isinstance(top.type, pa.ListType)
    first = top[0].as_py()
    assert len(first) == 5
    values = [item["value"] for item in first]
    assert values == sorted(values, reverse=True)
    # Explaining the true class: the explained class is the label on every row.
    assert table.column("explained_class").to_pylist() == table.column(LABEL).to_pylist()
    assert Path(out / ERRORS_PLOT).exists()


def test_explaining_the_true_class_needs_labels(
    spark, ingested_sample, trained_model_dir, tmp_path
):
    unlabelled = tmp_path / "unlabelled.parquet"
    spark.read.parquet(ingested_sample).drop(LABEL, "label_onehot").limit(10).write.parquet(
        str(unlabelled)
    )
    with pytest.raises(ConfigError, match=r"explain\.target=predicted"):
        run_explain(
            spark,
            _config(target="label"),
            str(unlabelled),
            trained_model_dir,
            str(tmp_path / "out"),
        )
