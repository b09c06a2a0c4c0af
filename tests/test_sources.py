"""Reading inputs: Kaggle-layout CSV beside Parquet, wrong formats refused, Spark errors named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipeline.config import Config
from pipeline.contract import FEATURES, LABEL, REJECT_REASON, pixel_columns
from pipeline.errors import InputDataError
from pipeline.ingest import run_ingest
from pipeline.sources import translate_read_errors

N = 300  # real digits from the end of the sample


@pytest.fixture(scope="module")
def kaggle(sample_pixels) -> pd.DataFrame:
    """The last N sample digits in the Kaggle digit-recognizer layout: label, pixel0..783."""
    pixels, labels = sample_pixels
    frame = pd.DataFrame(pixels[-N:].astype(np.int32), columns=pixel_columns())
    frame.insert(0, LABEL, labels[-N:])
    return frame


def _ingest(spark, raw: str, out: Path, **ingest) -> tuple[pd.DataFrame, dict]:
    config = Config().with_overrides({"ingest": ingest}) if ingest else Config()
    run_ingest(spark, config, raw, str(out))
    return spark.read.parquet(str(out)).toPandas(), json.loads((out / "_report.json").read_text())


def _rows(df: pd.DataFrame) -> np.ndarray:
    """Label and features of each row, sorted (Kaggle files carry no id to join on)."""
    table = np.column_stack([df[LABEL].to_numpy(), np.stack(df[FEATURES].to_numpy())])
    return table[np.lexsort(table.T[::-1])]


def test_kaggle_csv_ingests_like_the_parquet_columns_layout(spark, kaggle, tmp_path):
    csv = tmp_path / "train.csv"
    kaggle.to_csv(csv, index=False)
    parquet = tmp_path / "train.parquet"
    kaggle.to_parquet(parquet, index=False)

    from_csv, csv_report = _ingest(spark, str(csv), tmp_path / "from-csv")
    from_parquet, parquet_report = _ingest(spark, str(parquet), tmp_path / "from-parquet")

    assert csv_report["layout"] == parquet_report["layout"] == "columns"
    assert (csv_report["rows_in"], csv_report["rows_out"], csv_report["rows_rejected"]) == (
        N,
        N,
        0,
    )
    np.testing.assert_array_equal(_rows(from_csv), _rows(from_parquet))


def test_bad_csv_rows_are_quarantined_with_their_reason(spark, kaggle, tmp_path):
    lines = kaggle.to_csv(index=False).splitlines()
    header, rows = lines[0], lines[1:]
    cells = rows[0].split(",")
    cells[5] = "x"  # not an integer pixel
    rows[0] = ",".join(cells)
    cells = rows[1].split(",")
    cells[9] = "300"  # out of the 0..255 range
    rows[1] = ",".join(cells)
    cells = rows[2].split(",")
    cells[0] = "12"  # not a digit
    rows[2] = ",".join(cells)
    csv = tmp_path / "bad.csv"
    csv.write_text("\n".join([header, *rows]) + "\n")

    features, report = _ingest(spark, str(csv), tmp_path / "out")

    assert (report["rows_in"], report["rows_out"], report["rows_rejected"]) == (N, N - 3, 3)
    rejected = spark.read.parquet(str(tmp_path / "out" / "_rejected")).toPandas()
    assert len(rejected) == 3 and len(features) == N - 3
    assert rejected[REJECT_REASON].notna().all()
    assert sorted(report["rejected_by_reason"].values()) == sorted(
        rejected[REJECT_REASON].value_counts().tolist()
    )
    assert set(rejected[LABEL].dropna().astype(int)) <= {12, *kaggle[LABEL].iloc[:2]}


def test_ingest_format_csv_reads_a_file_of_any_name(spark, kaggle, tmp_path):
    raw = tmp_path / "digits.txt"
    kaggle.head(50).to_csv(raw, index=False)
    with pytest.raises(InputDataError, match="not a Parquet file"):
        _ingest(spark, str(raw), tmp_path / "refused")
    features, report = _ingest(spark, str(raw), tmp_path / "out", format="csv")
    assert report["rows_out"] == 50 and len(features) == 50


def test_a_file_neither_parquet_nor_csv_is_refused_naming_both(spark, tmp_path):
    raw = tmp_path / "digits.json"
    raw.write_text('{"label": 1, "pixel0": 0}\n')
    with pytest.raises(InputDataError) as info:
        _ingest(spark, str(raw), tmp_path / "out")
    message = str(info.value)
    assert "digits.json is not a Parquet file" in message
    assert "Parquet and CSV" in message and "ingest.format=csv" in message
    assert "\n" not in message
    assert not (tmp_path / "out").exists()


def test_spark_errors_are_recognised_by_condition(spark, tmp_path):
    absent, empty = str(tmp_path / "absent"), str(tmp_path / "empty")
    with (
        pytest.raises(InputDataError, match=r"input not found: .*absent"),
        translate_read_errors(absent),
    ):
        spark.read.parquet(absent)
    (tmp_path / "empty").mkdir()
    with (
        pytest.raises(InputDataError, match="no Parquet files under"),
        translate_read_errors(empty),
    ):
        spark.read.parquet(empty)
    # another Spark error passes through unchanged
    from pyspark.errors import AnalysisException

    with pytest.raises(AnalysisException), translate_read_errors("x"):
        spark.range(1).select("no_such_column")


def test_scoring_reads_a_kaggle_csv_like_its_parquet(spark, kaggle, tmp_path, trained_model_dir):
    """The test file of the Kaggle competition has no label column: score it both ways."""
    from pipeline.contract import PROBABILITIES
    from pipeline.scoring import run_scoring

    unlabelled = kaggle.drop(columns=[LABEL])
    unlabelled.to_csv(tmp_path / "test.csv", index=False)
    unlabelled.to_parquet(tmp_path / "test.parquet", index=False)
    scored = {}
    for name in ("test.csv", "test.parquet"):
        result = run_scoring(
            spark, Config(), str(tmp_path / name), trained_model_dir, str(tmp_path / f"{name}-pred")
        )
        assert (result.counts.rows_in, result.counts.rows_out) == (N, N)
        frame = spark.read.parquet(result.output).toPandas()
        probabilities = np.stack(frame[PROBABILITIES].to_numpy())
        scored[name] = probabilities[np.lexsort(probabilities.T[::-1])]
    np.testing.assert_array_equal(scored["test.csv"], scored["test.parquet"])


def test_spark_parquet_is_read_with_its_recorded_schema_or_else_inferred(
    spark, split_features, tmp_path
):
    from pipeline.sources import _recorded_schema, read_spark_parquet, spark_parquet_schema
    from pipeline.storage import Storage

    storage = Storage(spark)
    inferred = spark.read.parquet(str(split_features))
    recorded = read_spark_parquet(spark, storage, str(split_features))
    assert _recorded_schema(storage, str(split_features)) is not None  # no inference job
    assert recorded.schema == inferred.schema  # the split folders' column included
    # ... and known without Spark: every column nullable, the split folders' column last.
    assert spark_parquet_schema(storage, str(split_features)) == inferred.schema
    counts = {r["split"]: r["count"] for r in recorded.groupBy("split").count().collect()}
    assert counts == {r["split"]: r["count"] for r in inferred.groupBy("split").count().collect()}

    # Parquet another tool wrote records no Spark schema: Spark infers it as before.
    other = tmp_path / "other"
    other.mkdir()
    inferred.limit(5).toPandas().to_parquet(other / "part-0.parquet")
    assert _recorded_schema(storage, str(other)) is None
    assert spark_parquet_schema(storage, str(other)) is None
    assert read_spark_parquet(spark, storage, str(other)).count() == 5


def test_an_ingest_outputs_source_knows_its_schema_before_spark_reads_it(
    spark, split_features, tmp_path, monkeypatch
):
    """Scoring an ingest output from its files plans from `good_schema` alone: the same
    schema Spark gives the good rows' columns, with no DataFrame built for it."""
    import pipeline.scoring.inputs as inputs
    from pipeline.config import IngestSettings

    built = []
    real = inputs.read_spark_parquet
    monkeypatch.setattr(inputs, "read_spark_parquet", lambda *a: built.append(1) or real(*a))
    source = inputs.read_source(spark, str(split_features), IngestSettings(), IngestSettings())
    assert source.ingested and source.has_label and source.good_schema is not None
    assert built == []
    assert source.good_schema == source.validated.select(*source.columns).schema
    assert built == [1]

    # Parquet another tool wrote: Spark reads its schema, and the good rows' agree.
    other = tmp_path / "other"
    shutil.copytree(split_features, other)
    for part in other.rglob("*.parquet"):
        pq.write_table(pq.read_table(part).replace_schema_metadata(None), part)  # no Spark schema
    source = inputs.read_source(spark, str(other), IngestSettings(), IngestSettings())
    assert source.good_schema == source.validated.select(*source.columns).schema
