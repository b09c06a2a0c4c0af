"""The scoring stage: predictions, layouts, reruns, model safety, quarantine, the job."""

from __future__ import annotations

import itertools
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.artifact import METADATA_FILE, MODEL_FILE
from pipeline.config import Config
from pipeline.contract import (
    CONFIDENCE,
    FEATURE_DIM,
    LABEL,
    NUM_CLASSES,
    PREDICTION,
    PROBABILITIES,
    REJECT_REASON,
    RejectReason,
    pixel_columns,
)
from pipeline.errors import DataQualityError, InputDataError, ModelError
from pipeline.quarantine import REJECTED_DIR
from tests.faults import run_in_process, run_job

HELD_OUT = slice(5000, 6000)  # trained_model_dir trains on the first 5,000 digits
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def raw_inputs(tmp_path_factory, sample_file, sample_pixels) -> dict[str, str]:
    """The held-out digits with an `id` column, in each raw layout the ingest job reads."""
    pixels, labels = sample_pixels
    pixels, labels = pixels[HELD_OUT], labels[HELD_OUT]
    ids = pa.array(np.arange(len(labels), dtype=np.int64) + 5000)
    root = tmp_path_factory.mktemp("raw")
    paths = {name: str(root / f"{name}.parquet") for name in ("image", "array", "columns")}

    images = pq.read_table(sample_file).slice(HELD_OUT.start, len(labels))
    pq.write_table(images.add_column(0, "id", ids), paths["image"])
    flat = pa.array(pixels.reshape(-1).astype(np.int32))
    offsets = pa.array(np.arange(0, (len(labels) + 1) * FEATURE_DIM, FEATURE_DIM, dtype=np.int32))
    pq.write_table(
        pa.table(
            {
                "id": ids,
                "pixels": pa.ListArray.from_arrays(offsets, flat),
                "label": pa.array(labels),
            }
        ),
        paths["array"],
    )
    columns = {"id": ids, "label": pa.array(labels)}
    columns.update(
        {name: pa.array(pixels[:, i].astype(np.int16)) for i, name in enumerate(pixel_columns())}
    )
    pq.write_table(pa.table(columns), paths["columns"])
    return paths


@pytest.fixture(scope="module")
def ingested_holdout(spark, tmp_path_factory, raw_inputs) -> str:
    from pipeline.ingest import run_ingest

    out = str(tmp_path_factory.mktemp("ingested-holdout") / "features")
    run_ingest(spark, Config(), raw_inputs["array"], out)
    return out


@pytest.fixture(scope="module")
def scored(spark, tmp_path_factory, ingested_holdout, trained_model_dir):
    from pipeline.scoring import run_scoring

    out = str(tmp_path_factory.mktemp("scored") / "pred")
    return run_scoring(spark, Config(), ingested_holdout, trained_model_dir, out)


@pytest.fixture(scope="module")
def keras_model(spark, trained_model_dir):
    from pipeline.artifact import model_from_bytes, read_model_dir
    from pipeline.storage import Storage

    return model_from_bytes(*read_model_dir(Storage(spark), trained_model_dir))


def _predictions(spark, path: str):
    return spark.read.parquet(path).toPandas().sort_values("id").reset_index(drop=True)


def _probabilities(frame) -> np.ndarray:
    return np.stack(frame[PROBABILITIES].to_numpy())


def test_predictions_equal_in_memory_predict(spark, scored, keras_model, sample_pixels):
    pixels, labels = sample_pixels
    expected = keras_model.predict(
        (pixels[HELD_OUT].astype(np.float64) / 255.0).astype(np.float32), verbose=0
    )
    pred = _predictions(spark, scored.output)

    assert list(pred["id"]) == list(range(5000, 6000))
    np.testing.assert_allclose(_probabilities(pred), expected, atol=1e-5)
    assert (pred[PREDICTION].to_numpy() == expected.argmax(axis=1)).all()
    np.testing.assert_allclose(pred[CONFIDENCE].to_numpy(), expected.max(axis=1), atol=1e-5)
    assert (pred[LABEL].to_numpy() == labels[HELD_OUT]).all()
    assert scored.counts.rows_in == scored.counts.rows_out == 1000
    assert scored.evaluation.accuracy > 0.7  # a briefly trained model, on held-out digits


def test_output_schema_is_the_contract(spark, scored):
    schema = {f.name: f.dataType.simpleString() for f in spark.read.parquet(scored.output).schema}
    assert schema == {
        "id": "bigint",
        PREDICTION: "int",
        PROBABILITIES: "array<float>",
        CONFIDENCE: "float",
        LABEL: "int",
    }
    probabilities = _probabilities(_predictions(spark, scored.output))
    assert probabilities.shape == (1000, NUM_CLASSES)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("layout", ["image", "array", "columns"])
def test_raw_layouts_give_the_ingested_predictions(
    spark, tmp_path, scored, raw_inputs, trained_model_dir, layout
):
    from pipeline.scoring import run_scoring

    result = run_scoring(
        spark, Config(), raw_inputs[layout], trained_model_dir, str(tmp_path / "pred")
    )
    ingested = _predictions(spark, scored.output)
    raw = _predictions(spark, result.output)

    assert result.layout == layout
    assert list(raw["id"]) == list(ingested["id"])
    assert (raw[PREDICTION] == ingested[PREDICTION]).all()
    assert (raw[LABEL] == ingested[LABEL]).all()
    np.testing.assert_allclose(_probabilities(raw), _probabilities(ingested), atol=1e-6)
    assert result.evaluation.accuracy == scored.evaluation.accuracy


def test_rerun_replaces_pred_with_identical_content(
    spark, tmp_path, ingested_holdout, trained_model_dir
):
    from pipeline.scoring import run_scoring

    out = tmp_path / "pred"
    run_scoring(spark, Config(), ingested_holdout, trained_model_dir, str(out))
    first = _predictions(spark, str(out))
    first_files = sorted(p.name for p in out.glob("*.parquet"))
    run_scoring(spark, Config(), ingested_holdout, trained_model_dir, str(out))
    second = _predictions(spark, str(out))

    assert len(second) == 1000  # replaced, not appended
    assert first.drop(columns=[PROBABILITIES]).equals(second.drop(columns=[PROBABILITIES]))
    assert np.array_equal(_probabilities(first), _probabilities(second))
    assert len(list(out.glob("*.parquet"))) == len(first_files)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred"]  # no staging left behind
    assert json.loads((out / "_report.json").read_text())["status"] == "ok"


def test_file_reader_and_spark_reader_give_identical_predictions(
    spark, tmp_path, scored, ingested_holdout, trained_model_dir
):
    """The executors reading the ingest output's files score exactly what Spark reads."""
    from pipeline.scoring import run_scoring

    config = Config().with_overrides({"score": {"ingested_reader": "spark"}})
    through_spark = run_scoring(
        spark, config, ingested_holdout, trained_model_dir, str(tmp_path / "pred")
    )
    files = _predictions(spark, scored.output)
    jvm = _predictions(spark, through_spark.output)

    assert scored.report["score"]["ingested_reader"] == "files"
    # The executors wrote the files themselves; Spark reads them as it reads its own.
    assert (
        spark.read.parquet(scored.output).schema == spark.read.parquet(through_spark.output).schema
    )
    assert list(files.columns) == list(jvm.columns)
    assert list(files["id"]) == list(jvm["id"]) == list(range(5000, 6000))
    assert (files[PREDICTION] == jvm[PREDICTION]).all()
    assert (files[LABEL] == jvm[LABEL]).all()
    np.testing.assert_allclose(_probabilities(files), _probabilities(jvm), atol=1e-6)
    np.testing.assert_allclose(files[CONFIDENCE], jvm[CONFIDENCE], atol=1e-6)
    # The executors' NumPy sums and Spark's aggregates give the same evaluation.
    assert scored.report["evaluation"] == through_spark.report["evaluation"]
    assert scored.counts == through_spark.counts


def test_a_task_writes_whole_files_of_at_most_the_row_limit(tmp_path):
    import pyarrow.fs as pafs

    from pipeline.scoring.executor import write_parts

    fs = pafs.LocalFileSystem()
    batches = [pa.RecordBatch.from_pydict({"id": list(range(i, i + 7))}) for i in (0, 7, 14)]
    assert write_parts(fs, str(tmp_path), "part-00003", iter(batches), 5) == 21
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == [f"part-00003-c{n:03d}.snappy.parquet" for n in range(5)]
    assert [pq.read_metadata(tmp_path / f).num_rows for f in files] == [5, 5, 5, 5, 1]
    assert pq.read_table(tmp_path).column("id").to_pylist() == list(range(21))

    def failing():  # a task that fails part-way leaves no partial file behind
        yield batches[0]
        raise OSError("lost the input")

    with pytest.raises(OSError, match="lost the input"):
        write_parts(fs, str(tmp_path), "part-00004", failing(), 5)
    assert sorted(p.name for p in tmp_path.iterdir()) == [*files, "part-00004-c000.snappy.parquet"]
    # Its retry replaces the file it completed with the same name.
    assert write_parts(fs, str(tmp_path), "part-00004", iter(batches[:1]), 5) == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        *files,
        "part-00004-c000.snappy.parquet",
        "part-00004-c001.snappy.parquet",
    ]


def _as_ingest_output(source: str, target: Path, tables: list[pa.Table], row_group_rows: int):
    """`tables` written as the files of an ingest output, marked complete with `source`'s report."""
    target.mkdir(parents=True)
    for i, table in enumerate(tables):
        pq.write_table(table, target / f"part-{i:05d}.parquet", row_group_size=row_group_rows)
    shutil.copy(Path(source) / "_report.json", target / "_report.json")
    (target / "_SUCCESS").write_text("")


def test_many_files_and_row_groups_are_each_scored_once(
    spark, tmp_path, scored, ingested_holdout, trained_model_dir
):
    from pipeline.scoring import run_scoring

    table = pq.read_table(ingested_holdout)
    cuts = [0, 100, 101, 450, 1000]  # uneven files, one of a single row
    tables = [table.slice(a, b - a) for a, b in itertools.pairwise(cuts)]
    tables.append(table.slice(0, 0))  # an empty file: no row group to score
    many = tmp_path / "features"
    _as_ingest_output(ingested_holdout, many, tables, row_group_rows=64)
    assert sum(pq.ParquetFile(f).num_row_groups for f in many.glob("*.parquet")) > 10

    result = run_scoring(spark, Config(), str(many), trained_model_dir, str(tmp_path / "pred"))
    pred = _predictions(spark, result.output)
    expected = _predictions(spark, scored.output)

    assert result.counts.rows_in == result.counts.rows_out == len(pred) == 1000
    assert pred["id"].is_unique
    assert list(pred["id"]) == list(expected["id"])
    assert (pred[PREDICTION] == expected[PREDICTION]).all()
    np.testing.assert_allclose(_probabilities(pred), _probabilities(expected), atol=1e-6)


def test_split_partitions_are_fully_scored(spark, tmp_path, raw_inputs, trained_model_dir):
    """An ingest output with ``split=...`` folders: whole (split passed through) or one split."""
    from pipeline.evaluation import run_evaluation
    from pipeline.ingest import run_ingest
    from pipeline.scoring import run_scoring

    config = Config().with_overrides({"ingest": {"split": {"enabled": True, "by": "id"}}})
    features = tmp_path / "features"
    run_ingest(spark, config, raw_inputs["array"], str(features))
    assert {p.name for p in features.iterdir() if p.name.startswith("split=")} == {
        "split=train",
        "split=validation",
        "split=test",
    }
    ingested = spark.read.parquet(str(features)).select("id", "split").toPandas()
    by_split = ingested.sort_values("id").reset_index(drop=True)

    whole = run_scoring(spark, Config(), str(features), trained_model_dir, str(tmp_path / "all"))
    pred = _predictions(spark, whole.output)
    assert whole.counts.rows_in == len(pred) == 1000
    assert pred["id"].is_unique
    assert list(pred["id"]) == list(by_split["id"])
    assert list(pred["split"]) == list(by_split["split"])
    schema = {f.name: f.dataType.simpleString() for f in spark.read.parquet(whole.output).schema}
    assert schema["split"] == "string"

    test_part = features / "split=test"
    one = run_scoring(spark, Config(), str(test_part), trained_model_dir, str(tmp_path / "test"))
    test_pred = _predictions(spark, one.output)
    expected_ids = sorted(by_split.loc[by_split["split"] == "test", "id"])
    assert 0 < len(test_pred) == one.counts.rows_in == len(expected_ids)
    assert list(test_pred["id"]) == expected_ids
    assert "split" not in test_pred.columns  # as Spark reads that folder on its own
    merged = pred.set_index("id").loc[expected_ids]
    assert (merged[PREDICTION].to_numpy() == test_pred[PREDICTION].to_numpy()).all()

    # The report evaluates each split as well as all rows; evaluate recomputes the same.
    by_split = whole.report["evaluation_by_split"]
    assert set(by_split) == {"train", "validation", "test"}
    assert sum(e["rows_scored"] for e in by_split.values()) == whole.evaluation.rows == 1000
    for name, evaluation in by_split.items():
        rows = pred[pred["split"] == name]
        assert evaluation["rows_scored"] == len(rows)
        assert evaluation["accuracy"] == pytest.approx((rows[PREDICTION] == rows[LABEL]).mean())
    assert whole.by_split["test"].accuracy == pytest.approx(by_split["test"]["accuracy"])
    again = run_evaluation(spark, Config(), whole.output)
    assert again.report["evaluation_by_split"] == by_split
    assert "evaluation_by_split" not in one.report  # one split alone has no split column


def test_row_groups_are_planned_into_balanced_contiguous_tasks():
    from pipeline.scoring import group_tasks

    assert group_tasks([50_000] * 6, 2, 500_000) == ((0, 1, 2), (3, 4, 5))
    assert group_tasks([50_000] * 20, 2, 200_000) == tuple(
        tuple(range(i, i + 4)) for i in range(0, 20, 4)
    )
    assert group_tasks([100, 1, 1], 3, 10**6) == ((0,), (1,), (2,))
    assert group_tasks([10], 4, 1) == ((0,),)
    assert group_tasks([], 2, 5) == ()
    for rows in ([7, 3, 9, 1, 1, 12, 5], [1] * 50):
        tasks = group_tasks(rows, 3, 10**6)
        assert [i for task in tasks for i in task] == list(range(len(rows)))  # each once


def test_changed_input_file_is_refused(
    spark, tmp_path, monkeypatch, ingested_holdout, trained_model_dir
):
    """A file that changes between the plan and the read fails the job, naming the file."""
    from pipeline.scoring import job, run_scoring

    features = tmp_path / "features"
    _as_ingest_output(ingested_holdout, features, [pq.read_table(ingested_holdout)], 256)
    real_plan = job.plan_row_groups

    def plan_then_change(*args, **kwargs):
        plan = real_plan(*args, **kwargs)
        table = pq.read_table(features / "part-00000.parquet")
        pq.write_table(table.slice(0, 900), features / "part-00000.parquet", row_group_size=256)
        return plan

    monkeypatch.setattr(job, "plan_row_groups", plan_then_change)
    with pytest.raises(DataQualityError, match=r"part-00000.parquet was .*input changed"):
        run_scoring(spark, Config(), str(features), trained_model_dir, str(tmp_path / "pred"))
    assert not (tmp_path / "pred").exists()


def test_a_damaged_row_group_is_an_input_error_naming_the_file(
    spark, tmp_path, ingested_holdout, trained_model_dir
):
    """Pages that cannot be read under an intact footer: one line naming the file, exit 4's
    error, nothing published."""
    from pipeline.scoring import run_scoring

    features = tmp_path / "features"
    _as_ingest_output(ingested_holdout, features, [pq.read_table(ingested_holdout)], 256)
    raw = bytearray((features / "part-00000.parquet").read_bytes())
    raw[4:68] = bytes(64)  # the first page header, just after the leading magic bytes
    (features / "part-00000.parquet").write_bytes(bytes(raw))
    with pytest.raises(InputDataError) as refused:
        run_scoring(spark, Config(), str(features), trained_model_dir, str(tmp_path / "pred"))
    assert re.fullmatch(
        r"cannot read row group 0 of \S*part-00000\.parquet: .+ \(a damaged Parquet file\); "
        r"replace the file or rerun the job that wrote it",
        str(refused.value),
    )
    assert not (tmp_path / "pred").exists()


def _copy_model(model_dir: str, tmp_path: Path) -> Path:
    """A copy to damage, without Hadoop's .crc files (HDFS and S3 have none)."""
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy, ignore=shutil.ignore_patterns("*.crc"))
    return copy


def test_mismatched_model_is_refused(spark, tmp_path, ingested_holdout, trained_model_dir):
    from pipeline.scoring import run_scoring

    model = _copy_model(trained_model_dir, tmp_path)
    metadata = json.loads((model / METADATA_FILE).read_text())
    metadata["feature_dim"] = 100
    (model / METADATA_FILE).write_text(json.dumps(metadata))

    with pytest.raises(ModelError, match=r"takes 100 features.*the data has 784 features"):
        run_scoring(spark, Config(), ingested_holdout, str(model), str(tmp_path / "pred"))
    assert not (tmp_path / "pred").exists()


@pytest.mark.parametrize("damage", ["tampered", "truncated"])
def test_damaged_model_file_is_refused(
    spark, tmp_path, ingested_holdout, trained_model_dir, damage
):
    from pipeline.scoring import run_scoring

    model = _copy_model(trained_model_dir, tmp_path)
    data = bytearray((model / MODEL_FILE).read_bytes())
    if damage == "tampered":
        data[len(data) // 2] ^= 0xFF
    else:
        del data[len(data) // 2 :]
    (model / MODEL_FILE).write_bytes(bytes(data))

    with pytest.raises(ModelError, match=rf"{MODEL_FILE} does not match its metadata"):
        run_scoring(spark, Config(), ingested_holdout, str(model), str(tmp_path / "pred"))
    assert not (tmp_path / "pred").exists()


def test_model_file_failing_its_checksum_file_is_refused(
    spark, tmp_path, ingested_holdout, trained_model_dir
):
    from pipeline.scoring import run_scoring

    model = tmp_path / "model"
    # Hadoop's local file system writes a .crc beside each file it creates.
    jvm = spark.sparkContext._jvm
    local = jvm.org.apache.hadoop.fs.FileSystem.getLocal(
        spark.sparkContext._jsc.hadoopConfiguration()
    )
    local.setWriteChecksum(True)
    for name in (METADATA_FILE, MODEL_FILE):
        stream = local.create(jvm.org.apache.hadoop.fs.Path(str(model / name)))
        stream.write((Path(trained_model_dir) / name).read_bytes())
        stream.close()
    assert (model / f".{MODEL_FILE}.crc").exists()
    data = bytearray((model / MODEL_FILE).read_bytes())
    data[100] ^= 0xFF
    (model / MODEL_FILE).write_bytes(bytes(data))

    # The local file system checks Hadoop's .crc files as it reads: the edit fails there,
    # before the bytes reach the sha256 check (test_damaged_model_file_is_refused).
    with pytest.raises(ModelError, match="does not match its checksum file") as refused:
        run_scoring(spark, Config(), ingested_holdout, str(model), str(tmp_path / "pred"))
    assert f"{model}/{MODEL_FILE}" in str(refused.value)
    assert not (tmp_path / "pred").exists()


@pytest.fixture(scope="module")
def raw_with_bad_rows(tmp_path_factory, sample_pixels) -> str:
    """200 good held-out digits in the array layout, then four bad rows of four kinds."""
    pixels, labels = sample_pixels
    rows = [(5000 + i, pixels[5000 + i].tolist(), int(labels[5000 + i])) for i in range(200)]
    good = pixels[5000].tolist()
    rows += [
        (9001, good[:-1], 3),  # wrong_length
        (9002, [*good[:-1], 300], 3),  # pixel_out_of_range
        (9003, None, 3),  # pixels_null
        (9004, good, 12),  # label_out_of_range
    ]
    table = pa.table(
        {
            "id": pa.array([r[0] for r in rows], pa.int64()),
            "pixels": pa.array([r[1] for r in rows], pa.list_(pa.int32())),
            "label": pa.array([r[2] for r in rows], pa.int32()),
        }
    )
    path = str(tmp_path_factory.mktemp("bad") / "raw.parquet")
    pq.write_table(table, path)
    return path


def test_rejected_rows_are_counted_and_kept(spark, tmp_path, raw_with_bad_rows, trained_model_dir):
    from pipeline.scoring import run_scoring

    config = Config().with_overrides({"score": {"max_reject_fraction": 0.05}})
    out = tmp_path / "pred"
    result = run_scoring(spark, config, raw_with_bad_rows, trained_model_dir, str(out))

    expected = {
        RejectReason.WRONG_LENGTH.value: 1,
        RejectReason.PIXEL_OUT_OF_RANGE.value: 1,
        RejectReason.PIXELS_NULL.value: 1,
        RejectReason.LABEL_OUT_OF_RANGE.value: 1,
    }
    assert (result.counts.rows_in, result.counts.rows_out, result.counts.rows_rejected) == (
        204,
        200,
        4,
    )
    assert result.counts.rejected_by_reason == expected
    assert spark.read.parquet(str(out)).count() == 200
    rejected = spark.read.parquet(str(out / REJECTED_DIR)).toPandas().sort_values("id")
    assert list(rejected["id"]) == [9001, 9002, 9003, 9004]
    assert set(rejected.columns) == {"id", "pixels", "label", REJECT_REASON}
    report = json.loads((out / "_report.json").read_text())
    assert report["rows_rejected"] == 4
    assert report["rejected_by_reason"] == expected
    assert report["evaluation"]["rows_scored"] == 200


def test_too_many_rejected_rows_publish_no_predictions(
    spark, tmp_path, raw_with_bad_rows, trained_model_dir
):
    from pipeline.scoring import run_scoring

    config = Config().with_overrides({"score": {"max_reject_fraction": 0.01}})
    out = tmp_path / "pred"
    with pytest.raises(DataQualityError, match="4 of 204 rows rejected"):
        run_scoring(spark, config, raw_with_bad_rows, trained_model_dir, str(out))

    assert json.loads((out / "_report.json").read_text())["status"] == "failed"
    assert not list(out.glob("*.parquet"))
    assert spark.read.parquet(str(out / REJECTED_DIR)).count() == 4


def test_no_good_row_fails_and_publishes_no_predictions(
    spark, tmp_path, raw_with_bad_rows, trained_model_dir
):
    """Zero good rows fail (exit 5) even where every row may be rejected."""
    from pipeline.scoring import run_scoring

    bad_only = str(tmp_path / "bad.parquet")
    pq.write_table(pq.read_table(raw_with_bad_rows).slice(200), bad_only)
    config = Config().with_overrides({"score": {"max_reject_fraction": 1.0}})
    out = tmp_path / "pred"
    with pytest.raises(DataQualityError, match="none of the 4 rows passed validation") as failed:
        run_scoring(spark, config, bad_only, trained_model_dir, str(out))

    assert failed.value.exit_code == 5
    assert json.loads((out / "_report.json").read_text())["status"] == "failed"
    assert not (out / "_SUCCESS").exists()
    assert not list(out.glob("*.parquet"))
    assert spark.read.parquet(str(out / REJECTED_DIR)).count() == 4


def test_predictions_of_an_id_less_input_join_back_to_its_rows(
    spark, tmp_path, raw_inputs, trained_model_dir, keras_model, sample_pixels
):
    """Raw rows without ids get the row_id ingest gives them; an ingest output keeps it."""
    from pipeline.ingest import run_ingest
    from pipeline.scoring import run_scoring

    pixels, _ = sample_pixels
    raw = str(tmp_path / "no-ids.parquet")
    pq.write_table(pq.read_table(raw_inputs["array"]).drop(["id"]), raw)
    direct = run_scoring(spark, Config(), raw, trained_model_dir, str(tmp_path / "direct"))
    pred = spark.read.parquet(direct.output).toPandas().sort_values("row_id")

    # One file: row_id is the row's position in it, one prediction per input row.
    assert list(pred["row_id"]) == list(range(1000))
    expected = keras_model.predict(
        (pixels[HELD_OUT].astype(np.float64) / 255.0).astype(np.float32), verbose=0
    )
    np.testing.assert_allclose(_probabilities(pred), expected, atol=1e-5, rtol=0)

    features = str(tmp_path / "features")
    run_ingest(spark, Config(), raw, features)
    ingested = run_scoring(spark, Config(), features, trained_model_dir, str(tmp_path / "pred"))
    via_ingest = spark.read.parquet(ingested.output).toPandas().sort_values("row_id")
    assert "row_id" in ingested.report["id_columns"]
    assert list(via_ingest["row_id"]) == list(pred["row_id"])
    assert (via_ingest[PREDICTION].to_numpy() == pred[PREDICTION].to_numpy()).all()


def test_invalid_rows_in_an_ingest_output_are_refused(
    spark, tmp_path, ingested_holdout, trained_model_dir
):
    """An ingest output is not preprocessed again, so the executors check every batch."""
    from pipeline.scoring import run_scoring

    fake = tmp_path / "features"
    fake.mkdir()
    features = [[0.5] * FEATURE_DIM, [0.5] * (FEATURE_DIM - 1) + [2.0]]
    pq.write_table(
        pa.table({"features": pa.array(features, pa.list_(pa.float32())), "label": [1, 2]}),
        fake / "part-0.parquet",
    )
    (fake / "_SUCCESS").write_text("")
    report = json.loads((Path(ingested_holdout) / "_report.json").read_text())
    (fake / "_report.json").write_text(json.dumps(report))

    with pytest.raises(InputDataError, match=r"outside \[0, 1\].*rerun the ingest job"):
        run_scoring(spark, Config(), str(fake), trained_model_dir, str(tmp_path / "pred"))
    assert not (tmp_path / "pred").exists()


def test_model_is_built_once_per_worker(monkeypatch):
    """Batches after the first reuse the worker's cached model."""
    from pipeline.scoring import executor

    builds = []

    def fake_build(metadata_json, model_bytes, threads):
        builds.append(threads)
        return lambda x: np.full((len(x), NUM_CLASSES), 1.0 / NUM_CLASSES, np.float32)

    class Broadcast:
        value = ("{}", b"")

    monkeypatch.setattr(executor, "build_predictor", fake_build)
    monkeypatch.setattr(executor, "_PREDICTORS", {})
    column = pa.array([[0.25] * FEATURE_DIM] * 3, pa.list_(pa.float32()))
    batch = pa.RecordBatch.from_arrays([pa.array([1, 2, 3]), column], names=["id", "features"])

    outputs = []
    for _ in range(2):  # two tasks in the same worker
        outputs += list(
            executor.score_batches(
                iter([batch, batch]),
                broadcast=Broadcast(),
                key="k",
                threads=2,
                ids=("id",),
                label=None,
            )
        )

    assert builds == [2]
    assert len(outputs) == 4
    # A worker started ahead of the job (`inference.start_workers`) has it built already.
    executor.start_worker(iter([0]), broadcast=Broadcast(), key="ahead", threads=1)
    list(executor.score_batches(iter([batch]), broadcast=Broadcast(), key="ahead", threads=1,
                                ids=("id",), label=None))  # fmt: skip
    assert builds == [2, 1]
    assert outputs[0].column_names == ["id", PREDICTION, PROBABILITIES, CONFIDENCE]
    assert outputs[0].column(PREDICTION).type == pa.int32()
    assert outputs[0].column(CONFIDENCE).to_pylist() == pytest.approx([0.1] * 3)


def test_predict_on_a_dataframe_matches_the_job(spark, scored, ingested_holdout, trained_model_dir):
    from pipeline.scoring import predict

    features = spark.read.parquet(ingested_holdout)
    frame = predict(features, trained_model_dir)
    got = frame.toPandas().sort_values("id").reset_index(drop=True)
    job = _predictions(spark, scored.output)

    assert frame.columns == [*features.columns, PREDICTION, PROBABILITIES, CONFIDENCE]
    assert list(got["id"]) == list(job["id"])
    assert (got[PREDICTION] == job[PREDICTION]).all()
    np.testing.assert_allclose(_probabilities(got), _probabilities(job), atol=1e-6, rtol=0)
    np.testing.assert_allclose(got[CONFIDENCE], job[CONFIDENCE], atol=1e-6, rtol=0)


def test_predict_preprocesses_a_raw_layout_as_the_job_does(
    spark, scored, raw_with_bad_rows, trained_model_dir
):
    from pipeline.scoring import predict

    raw = spark.read.parquet(raw_with_bad_rows)
    got = predict(raw, trained_model_dir).toPandas().sort_values("id").reset_index(drop=True)
    job = _predictions(spark, scored.output).set_index("id")

    assert list(got.columns) == [
        *raw.columns,
        REJECT_REASON,
        PREDICTION,
        PROBABILITIES,
        CONFIDENCE,
    ]
    bad = got[got["id"] > 9000]
    assert list(bad[REJECT_REASON]) == [
        RejectReason.WRONG_LENGTH.value,
        RejectReason.PIXEL_OUT_OF_RANGE.value,
        RejectReason.PIXELS_NULL.value,
        RejectReason.LABEL_OUT_OF_RANGE.value,
    ]
    assert bad[PREDICTION].isna().all() and bad[PROBABILITIES].isna().all()
    good = got[got["id"] < 9000]
    assert len(good) == 200 and good[REJECT_REASON].isna().all()
    expected = job.loc[good["id"]]
    assert (good[PREDICTION].to_numpy() == expected[PREDICTION].to_numpy()).all()
    np.testing.assert_allclose(_probabilities(good), _probabilities(expected), atol=1e-6, rtol=0)


def test_features_matrix_is_a_view_of_the_arrow_values():
    from pipeline.scoring import features_matrix

    values = np.random.default_rng(0).random(4 * FEATURE_DIM, dtype=np.float32)
    column = pa.ListArray.from_arrays(
        pa.array(np.arange(0, 5 * FEATURE_DIM, FEATURE_DIM, dtype=np.int32)), pa.array(values)
    )
    sliced = column.slice(1, 2)
    x = features_matrix(sliced)

    assert x.shape == (2, FEATURE_DIM)
    assert np.array_equal(x, values[FEATURE_DIM : 3 * FEATURE_DIM].reshape(2, FEATURE_DIM))
    assert np.shares_memory(x, np.frombuffer(column.values.buffers()[1], np.float32))


@pytest.mark.slow
def test_spark_submit_score_and_evaluate(tmp_path, ingested_holdout, trained_model_dir):
    out = tmp_path / "pred"
    score = run_job(
        "score.py",
        "--input",
        ingested_holdout,
        "--model-dir",
        trained_model_dir,
        "--output",
        str(out),
        "--set",
        "spark.show_progress=false",
        conf=["spark.ui.enabled=false"],
        timeout=300,
    )
    assert score.returncode == 0, score.stderr[-3000:]
    report = json.loads((out / "_report.json").read_text())
    assert f"accuracy: {report['evaluation']['accuracy']:.4f}" in score.stdout
    assert (out / "_confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"

    argv = ["--predictions", str(out), "--set", "score.confidence_threshold=0.99"]
    assert run_in_process("evaluate.py", *argv) == 0
    again = json.loads((out / "_report.json").read_text())["evaluation"]
    assert again["accuracy"] == report["evaluation"]["accuracy"]
    assert again["confidence_threshold"] == 0.99
    confidence = pq.read_table(out, columns=[CONFIDENCE]).column(CONFIDENCE).to_numpy()
    below = int((confidence < np.float32(0.99)).sum())
    assert report["evaluation"]["rows_below_threshold"] < below  # the new threshold was used
    assert again["rows_below_threshold"] == below


_SCORE_WITHOUT_TF = """
import json, sys
from pipeline.config import Config, SparkSettings
from pipeline.scoring import run_scoring
from pipeline.session import build_session

spark = build_session(SparkSettings(
    master="local[1]", show_progress=False, log_level="ERROR", conf={"spark.ui.enabled": "false"}
), on_demand=True)  # as the score job has it

NAMES = ["tensorflow", "keras", "onnxruntime"]

def loaded(rows):
    import sys
    for _ in rows:
        pass
    yield {n: n in sys.modules for n in NAMES}

def loaded_batches(batches):
    import pyarrow as pa
    yield pa.RecordBatch.from_pylist(list(loaded(batches)))

found = {}
features, model_dir, out = sys.argv[1:4]
for reader in ("files", "spark"):  # both routes into the model
    config = Config().with_overrides({"score": {"ingested_reader": reader}})
    result = run_scoring(spark, config, features, model_dir, f"{out}-{reader}")
    session_made = spark.started  # the files route (first) runs RDD jobs alone
    # One core: the Python worker that scored the rows answers (onnxruntime is loaded
    # there). Spark keeps the workers of RDD jobs (files) apart from those of DataFrame
    # jobs (spark): the question goes by the same kind of job.
    if reader == "files":
        worker = spark.sparkContext.parallelize([0], 1).mapPartitions(loaded).first()
    else:
        worker = spark.range(1, numPartitions=1).mapInArrow(
            loaded_batches, "tensorflow boolean, keras boolean, onnxruntime boolean"
        ).first().asDict()
    found[reader] = {"rows": result.counts.rows_out, "worker": worker, "session": session_made}
found["driver"] = {n: n in sys.modules for n in ("tensorflow", "keras", "onnxruntime")}
print(json.dumps(found))
"""


@pytest.mark.slow
def test_scoring_imports_no_tensorflow(tmp_path, ingested_holdout, trained_model_dir):
    """Neither the driver nor the Python workers that score import TensorFlow, whichever
    reader feeds the model; the files route starts no SparkSession either."""
    import subprocess
    import sys

    from tests.faults import job_env

    env = job_env(PYTHONPATH=str(ROOT))
    args = [ingested_holdout, trained_model_dir, str(tmp_path / "pred")]
    run = subprocess.run(
        [sys.executable, "-c", _SCORE_WITHOUT_TF, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    for reader in ("files", "spark"):
        assert found[reader]["rows"] == 1000, reader
        worker = found[reader]["worker"]
        assert worker == {"tensorflow": False, "keras": False, "onnxruntime": True}, reader
    assert (found["files"]["session"], found["spark"]["session"]) == (False, True)
    assert found["driver"] == {"tensorflow": False, "keras": False, "onnxruntime": False}


def test_a_job_that_fails_before_scoring_unpersists_the_model(
    spark, tmp_path, ingested_holdout, trained_model_dir, monkeypatch
):
    """The model's broadcast goes however the job ends, a damaged footer found while planning
    (a long-lived session would otherwise keep one per failed job)."""
    from pipeline.scoring import job

    unpersisted, real = [], job.broadcast_model

    def broadcast(*args):
        model = real(*args)
        unpersist = model.handle.unpersist
        model.handle.unpersist = lambda *a: (unpersisted.append(True), unpersist(*a))
        return model

    features = tmp_path / "features"
    table = pq.read_table(ingested_holdout)
    _as_ingest_output(ingested_holdout, features, [table.slice(0, 500), table.slice(500)], 256)
    second = features / "part-00001.parquet"
    second.write_bytes(second.read_bytes()[:-100])  # its footer cut: the plan cannot read it
    monkeypatch.setattr(job, "broadcast_model", broadcast)
    with pytest.raises(InputDataError, match="part-00001"):
        job.run_scoring(spark, Config(), str(features), trained_model_dir, str(tmp_path / "p"))
    assert unpersisted == [True]
    assert not (tmp_path / "p").exists()


def test_score_job_exit_code_names_the_missing_model(spark, tmp_path, ingested_holdout, capsys):
    argv = ["--input", ingested_holdout, "--model-dir", str(tmp_path / "nope")]
    code = run_in_process("score.py", *argv, "--output", str(tmp_path / "pred"))

    assert code == ModelError.exit_code
    assert "no metadata.json" in capsys.readouterr().err


def test_evaluation_is_recomputable_from_pred(spark, scored):
    from pipeline.evaluation import run_evaluation

    pred = _predictions(spark, scored.output)
    accuracy = float((pred[PREDICTION] == pred[LABEL]).mean())
    assert scored.report["evaluation"]["accuracy"] == pytest.approx(accuracy, abs=1e-6)

    again = run_evaluation(spark, Config(), scored.output)

    assert again.report["evaluation"] == scored.report["evaluation"]
    assert again.report["rows_rejected"] == 0
    assert again.report["model_sha256"] == scored.report["model_sha256"]


def test_local_uris_locate_the_local_filesystem():
    """Spark's qualified local paths (spaces and '=' included) map to pyarrow's local paths."""
    from pipeline.rowgroups import LOCAL, arrow_uri, locate, partition_values

    assert locate("file:/tmp/a b/split=test/x.parquet") == (LOCAL, "/tmp/a b/split=test/x.parquet")
    assert locate("file:///tmp/x") == locate("/tmp/x") == (LOCAL, "/tmp/x")
    assert arrow_uri("s3a://bucket/x") == "s3://bucket/x"
    assert partition_values("file:/d", "file:/d/split=a%3Db/part-0.parquet") == {"split": "a=b"}
