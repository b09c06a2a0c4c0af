"""Training refuses data it cannot learn from, before any worker starts."""

from __future__ import annotations

import pytest
from pyspark.sql import functions as F

from pipeline.config import Config
from pipeline.contract import LABEL
from pipeline.errors import InputDataError
from pipeline.training import check_classes, class_counts, run_training


def test_a_dataset_with_one_class_is_refused(spark, ingested_sample, tmp_path):
    only_threes = str(tmp_path / "threes")
    spark.read.parquet(ingested_sample).filter(f"{LABEL} = 3").write.parquet(only_threes)
    with pytest.raises(InputDataError, match=r"one class only \(label 3, \d+ rows\)"):
        run_training(spark, Config(), only_threes, str(tmp_path / "model"))
    assert not (tmp_path / "model" / "metadata.json").exists()


def test_class_counts_come_from_the_label_or_the_onehot(spark, ingested_sample):
    df = spark.read.parquet(ingested_sample)
    by_label = class_counts(df)
    assert sum(by_label.values()) == 6000 and len(by_label) == 10
    assert class_counts(df.drop(LABEL)) == by_label


def test_check_classes():
    check_classes({"0": 5, "1": 3}, "x")
    with pytest.raises(InputDataError, match="no rows"):
        check_classes({}, "x")
    with pytest.raises(InputDataError, match="one class only"):
        check_classes({"7": 12}, "x")


def test_labels_alone_are_one_hot_encoded_for_training(spark, ingested_sample):
    from pipeline.config import TrainSettings
    from pipeline.contract import LABEL_ONEHOT
    from pipeline.training import prepare_training_data

    df = spark.read.parquet(ingested_sample).limit(50)
    expected = [row[LABEL_ONEHOT] for row in df.orderBy("features").collect()]
    derived = prepare_training_data(df.drop(LABEL_ONEHOT), TrainSettings())
    assert [row[LABEL_ONEHOT] for row in derived.orderBy("features").collect()] == expected


def test_workers_get_the_same_rows_in_the_same_order_however_the_input_is_split(
    spark, ingested_sample
):
    from pipeline.training.fit import repartition_in_a_fixed_order

    df = spark.read.parquet(ingested_sample).select("row_id", LABEL)

    def per_worker(data):
        fixed = repartition_in_a_fixed_order(data, 2)
        assert fixed.rdd.getNumPartitions() == 2
        return fixed.rdd.glom().map(lambda rows: [row["row_id"] for row in rows]).collect()

    expected = per_worker(df)
    assert sorted(len(rows) for rows in expected) == pytest.approx([3000, 3000], rel=0.1)
    assert per_worker(df.repartition(5)) == expected  # arrival order varies
    assert per_worker(df.coalesce(1).orderBy(F.desc("row_id"))) == expected


def test_the_schema_from_the_footers_is_the_one_spark_reads(spark, ingested_sample, tmp_path):
    """The training fingerprint records the input's schema; taken from the Parquet footers
    it must be Spark's own string, or a run could not resume from a checkpoint written when
    Spark read the schema. Files Spark did not write get it from their Arrow schema."""
    import glob

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.training.inputs import spark_schema

    first = sorted(glob.glob(f"{ingested_sample}/*.parquet"))[0]
    expected = spark.read.parquet(ingested_sample).schema.simpleString()
    assert spark_schema(pq.read_metadata(first)) == expected

    plain = tmp_path / "plain.parquet"
    pq.write_table(pq.read_table(first).replace_schema_metadata(None), plain)
    assert b"org.apache.spark.sql.parquet.row.metadata" not in (
        pq.read_metadata(plain).metadata or {}
    )
    assert spark_schema(pq.read_metadata(plain)) == expected
    narrow = tmp_path / "narrow.parquet"
    pq.write_table(pa.table({"features": [[0.5] * 3], "label": pa.array([1], pa.int64())}), narrow)
    assert (
        spark_schema(pq.read_metadata(narrow))
        == spark.read.parquet(str(narrow)).schema.simpleString()
    )
