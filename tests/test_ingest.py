"""The ingest stage on real digits: layouts, quarantine, counts, bad input, atomic output."""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.config import Config
from pipeline.contract import FEATURE_DIM, FEATURES, LABEL, LABEL_ONEHOT, REJECT_REASON, SPLIT
from pipeline.errors import DataQualityError, InputDataError
from pipeline.ingest import read_features, run_ingest

N = 400  # held-out digits used by the layout tests: the last rows of the sample


def _png(array: np.ndarray, mode: str = "L") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).convert(mode).save(buffer, format="PNG")
    return buffer.getvalue()


def _write(tmp_path: Path, name: str, table: pa.Table) -> str:
    path = tmp_path / f"{name}.parquet"
    pq.write_table(table, path)
    return str(path)


def _read(spark, path: str) -> pd.DataFrame:
    return spark.read.parquet(path).toPandas()


def _ingest(spark, raw: str, out: Path, **ingest) -> tuple:
    config = Config().with_overrides({"ingest": ingest}) if ingest else Config()
    result = run_ingest(spark, config, raw, str(out))
    return result, json.loads((out / "_report.json").read_text())


@pytest.fixture(scope="module")
def held_out(sample_file, sample_pixels):
    """The last N digits of the sample: their PNG rows, decoded pixels and labels, with ids."""
    table = pq.read_table(sample_file).slice(6000 - N, N)
    ids = pa.array(np.arange(N, dtype=np.int64))
    pixels, labels = sample_pixels[0][-N:], sample_pixels[1][-N:]
    return table.append_column("id", ids), pixels, labels


def _features_by_id(df: pd.DataFrame) -> np.ndarray:
    df = df.sort_values("id")
    return np.stack(df[FEATURES].to_numpy()).astype(np.float32)


def test_every_layout_gives_identical_features(spark, tmp_path, held_out):
    images, pixels, labels = held_out
    ids = np.arange(N, dtype=np.int64)
    raws = {
        "image": images,
        "array_int": pa.table(
            {"id": ids, "pixels": list(pixels.astype(np.int32)), "label": labels}
        ),
        "array_float": pa.table({"id": ids, "pixels": list(pixels / 255.0), "label": labels}),
        "columns": pa.table(
            {"id": ids, "label": labels.astype(str)}  # Kaggle-style, string labels
            | {f"pixel{i}": pixels[:, i].astype(np.int64) for i in range(FEATURE_DIM)}
        ),
    }
    expected_layouts = {
        "image": "image",
        "array_int": "array",
        "array_float": "array",
        "columns": "columns",
    }
    outputs = {}
    for name, table in raws.items():
        result, report = _ingest(spark, _write(tmp_path, name, table), tmp_path / f"out_{name}")
        assert result.layout == expected_layouts[name]
        assert (report["rows_in"], report["rows_out"], report["rows_rejected"]) == (N, N, 0)
        outputs[name] = _read(spark, str(tmp_path / f"out_{name}"))

    reference = _features_by_id(outputs["image"])
    assert reference.shape == (N, FEATURE_DIM)
    np.testing.assert_array_equal(reference, (pixels / 255.0).astype(np.float32))
    for name, df in outputs.items():
        np.testing.assert_array_equal(_features_by_id(df), reference, err_msg=name)
        df = df.sort_values("id")
        np.testing.assert_array_equal(df[LABEL].to_numpy(), labels)
        onehot = np.stack(df[LABEL_ONEHOT].to_numpy())
        np.testing.assert_array_equal(onehot.argmax(axis=1), labels)
        np.testing.assert_array_equal(onehot.sum(axis=1), np.ones(N))
    assert set(outputs["image"].columns) == {"id", FEATURES, LABEL, LABEL_ONEHOT}


def test_dirty_array_rows_are_quarantined_with_their_reasons(spark, tmp_path, sample_pixels):
    good = list(sample_pixels[0][:20] / 255.0)

    def pix(**changes):
        row = list(good[0])
        for index, value in changes.items():
            row[int(index[1:])] = value
        return row

    cases = [  # (label, pixels, expected reason)
        (None, good[1], "label_null"),
        ("seven", good[2], "label_invalid"),
        ("3.5", good[2], "label_invalid"),
        ("12", good[3], "label_out_of_range"),
        ("-1", good[3], "label_out_of_range"),
        ("4", None, "pixels_null"),
        ("4", good[4][:783].tolist(), "wrong_length"),
        ("4", [*list(good[4]), 0.0], "wrong_length"),
        ("5", pix(p10=None), "null_element"),
        ("5", pix(p0=math.nan), "not_finite"),
        ("5", pix(p783=math.inf), "not_finite"),
        ("5", pix(p5=-math.inf), "not_finite"),
        ("6", pix(p100=1.5), "pixel_out_of_range"),
        ("6", pix(p100=-0.01), "pixel_out_of_range"),
    ]
    goods = [
        (str(label), list(row), None)
        for label, row in zip(sample_pixels[1][:20], good, strict=False)
    ]
    rows = cases + goods
    table = pa.table(
        {
            "row_id": np.arange(len(rows), dtype=np.int64),
            "label": pa.array([r[0] for r in rows], pa.string()),
            "pixels": pa.array([r[1] for r in rows], pa.list_(pa.float64())),
        }
    )
    out = tmp_path / "out"
    result, report = _ingest(spark, _write(tmp_path, "dirty", table), out, max_reject_fraction=1.0)

    expected = pd.Series([r[2] for r in cases]).value_counts().to_dict()
    assert report["rejected_by_reason"] == expected
    assert (report["rows_in"], report["rows_out"], report["rows_rejected"]) == (
        len(rows),
        len(goods),
        len(cases),
    )
    assert report["rows_in"] == report["rows_out"] + report["rows_rejected"]

    rejected = _read(spark, str(out / "_rejected")).sort_values("row_id")
    assert rejected[REJECT_REASON].tolist() == [r[2] for r in cases]
    assert set(rejected.columns) == {"row_id", "label", "pixels", REJECT_REASON}  # originals kept
    assert rejected["label"].tolist()[:3] == [None, "seven", "3.5"]
    accepted = _read(spark, str(out))
    assert sorted(accepted["row_id"]) == list(range(len(cases), len(rows)))
    assert result.counts.rows_rejected == len(cases)


def test_dirty_images_are_quarantined_with_their_reasons(spark, tmp_path, sample_pixels):
    digit = sample_pixels[0][0].reshape(28, 28)
    big = np.zeros((32, 32), dtype=np.uint8)
    cases = [
        ({"bytes": _png(digit), "path": None}, 11, "label_out_of_range"),
        (None, 1, "pixels_null"),
        ({"bytes": None, "path": "x.png"}, 1, "pixels_null"),
        ({"bytes": b"\x89PNG not really", "path": None}, 2, "image_undecodable"),
        ({"bytes": _png(digit)[:60], "path": None}, 2, "image_undecodable"),
        ({"bytes": _png(big), "path": None}, 3, "image_wrong_size"),
        ({"bytes": _png(digit), "path": None}, None, "label_null"),
    ]
    accepted_cases = [
        ({"bytes": _png(digit), "path": None}, 5),
        ({"bytes": _png(digit, "RGB"), "path": None}, 5),  # colour converts to grayscale
        ({"bytes": _png(digit, "LA"), "path": None}, 5),
    ]
    images = [c[0] for c in cases] + [c[0] for c in accepted_cases]
    labels = [c[1] for c in cases] + [c[1] for c in accepted_cases]
    table = pa.table(
        {
            "id": np.arange(len(images), dtype=np.int64),
            "image": pa.array(images, pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
            "label": pa.array(labels, pa.int64()),
        }
    )
    out = tmp_path / "out"
    _, report = _ingest(
        spark, _write(tmp_path, "dirty_images", table), out, max_reject_fraction=1.0
    )
    assert report["rows_out"] == len(accepted_cases)
    assert report["rejected_image_sizes"] == {"32x32": 1}
    rejected = _read(spark, str(out / "_rejected")).sort_values("id")
    assert rejected[REJECT_REASON].tolist() == [c[2] for c in cases]
    accepted = _read(spark, str(out))
    features = np.stack(accepted.sort_values("id")[FEATURES].to_numpy())
    expected = (digit.reshape(-1) / 255.0).astype(np.float32)
    for row in features:
        np.testing.assert_array_equal(row, expected)


def test_null_pixel_column_is_a_null_element(spark, tmp_path, sample_pixels):
    pixels = sample_pixels[0][:3].astype(np.float64)
    columns = {f"pixel{i}": pixels[:, i].tolist() for i in range(FEATURE_DIM)}
    columns["pixel7"] = [None, 0.0, 0.0]
    columns["pixel9"] = [0.0, 300.0, 0.0]  # float columns declared on the 0-255 scale
    table = pa.table({"label": [1, 2, 3], **columns})
    out = tmp_path / "out"
    _, report = _ingest(
        spark, _write(tmp_path, "cols", table), out, max_reject_fraction=1.0, pixel_max=255
    )
    assert report["rejected_by_reason"] == {"null_element": 1, "pixel_out_of_range": 1}
    assert report["pixel_max"] == 255


def test_too_many_rejects_fail_and_publish_no_features(spark, tmp_path, sample_pixels):
    rows = [
        (int(label), list(p / 255.0))
        for label, p in zip(sample_pixels[1][:18], sample_pixels[0], strict=False)
    ]
    rows += [(99, list(sample_pixels[0][0] / 255.0))] * 2  # 10 % bad, above the 5 % default
    table = pa.table({"label": [r[0] for r in rows], "pixels": [r[1] for r in rows]})
    out = tmp_path / "out"
    with pytest.raises(DataQualityError, match=r"2 of 20 rows rejected.*label_out_of_range 2"):
        run_ingest(spark, Config(), _write(tmp_path, "mostly_ok", table), str(out))
    assert not (out / "_SUCCESS").exists()
    assert [p.name for p in out.iterdir() if not p.name.startswith((".", "_"))] == []
    assert json.loads((out / "_report.json").read_text())["status"] == "failed"
    assert _read(spark, str(out / "_rejected")).shape[0] == 2
    with pytest.raises(InputDataError, match="not a complete ingest output"):
        read_features(spark, str(out))


def test_missing_label_column_is_refused_before_any_output(spark, tmp_path, sample_file):
    out = tmp_path / "out"
    config = Config().with_overrides({"ingest": {"label_column": "digit"}})
    with pytest.raises(InputDataError) as caught:
        run_ingest(spark, config, sample_file, str(out))
    message = str(caught.value)
    assert "no label column 'digit'" in message
    assert "image, label" in message  # the columns found
    assert "ingest.label_column" in message  # the key to change
    assert not out.exists()


def test_unrecognised_layout_is_refused_with_the_keys_to_set(spark, tmp_path):
    table = pa.table({"label": [1, 2], "values": ["a", "b"]})
    out = tmp_path / "out"
    with pytest.raises(InputDataError) as caught:
        run_ingest(spark, Config(), _write(tmp_path, "odd", table), str(out))
    for key in ("ingest.image_column", "ingest.array_column", "ingest.layout", "label, values"):
        assert key in str(caught.value)
    assert not out.exists()


def test_corrupt_file_is_named_and_nothing_is_published(spark, tmp_path, sample_file):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "part-0.parquet").write_bytes(Path(sample_file).read_bytes())
    (raw / "part-1.parquet").write_bytes(b"PAR1" + os.urandom(200) + b"PAR1")
    out = tmp_path / "out"
    with pytest.raises(InputDataError, match=r"part-1\.parquet"):
        run_ingest(spark, Config(), str(raw), str(out))
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["raw"]  # no staging left behind


def test_missing_input_is_named(spark, tmp_path):
    with pytest.raises(InputDataError, match="input not found"):
        run_ingest(spark, Config(), str(tmp_path / "nothing"), str(tmp_path / "out"))


def test_empty_input_is_refused(spark, tmp_path):
    table = pa.table(
        {"label": pa.array([], pa.int64()), "pixels": pa.array([], pa.list_(pa.float64()))}
    )
    out = tmp_path / "out"
    with pytest.raises(InputDataError, match="no rows"):
        run_ingest(spark, Config(), _write(tmp_path, "empty", table), str(out))
    assert not out.exists()


def test_rerun_replaces_the_output(spark, tmp_path, held_out):
    images = held_out[0].slice(0, 50)
    raw = _write(tmp_path, "raw", images)
    out = tmp_path / "out"
    _ingest(spark, raw, out)
    first = _read(spark, str(out)).sort_values("id")
    _ingest(spark, raw, out)
    second = _read(spark, str(out)).sort_values("id")
    assert len(second) == 50
    np.testing.assert_array_equal(np.stack(first[FEATURES]), np.stack(second[FEATURES]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "raw.parquet"]
    assert not (out / "_rejected").exists()  # clean data: no empty reject dataset to glob


def test_zero_good_rows_fail_whatever_the_threshold(spark, tmp_path, sample_pixels):
    pixels, labels = sample_pixels[0][:30], sample_pixels[1][:30]
    # Floats on the 0-255 scale: with the float default ingest.pixel_max = 1, every row is
    # out of range, and the message names the setting and the scale that fits.
    table = pa.table({"label": labels, "pixels": list(pixels.astype(np.float64))})
    out = tmp_path / "out"
    with pytest.raises(DataQualityError) as caught:
        _ingest(spark, _write(tmp_path, "float255", table), out, max_reject_fraction=1.0)
    message = str(caught.value)
    assert caught.value.exit_code == 5
    assert "none of the 30 rows passed validation: pixel_out_of_range 30" in message
    assert "values up to 255, above ingest.pixel_max = 1" in message
    assert "set ingest.pixel_max=255" in message
    assert "raise ingest.max_reject_fraction" not in message
    report = json.loads((out / "_report.json").read_text())
    assert (report["status"], report["rows_out"]) == ("failed", 0)
    assert report["rejected_pixel_range"][1] == 255.0
    assert not (out / "_SUCCESS").exists()
    assert not list(out.glob("*.parquet"))

    result, report = _ingest(spark, _write(tmp_path, "float255", table), out, pixel_max=255)
    assert result.counts.rows_out == 30  # the advice works
    features = np.stack(_read(spark, str(out)).sort_values("row_id")[FEATURES])
    np.testing.assert_array_equal(features, (pixels / 255.0).astype(np.float32))


def test_wrong_size_images_are_reported_or_resized(spark, tmp_path, held_out):
    images, pixels, labels = held_out
    n = 40
    # Each digit at twice its size: a box filter gives the original pixels back.
    doubled = [
        {"bytes": _png(np.kron(p.reshape(28, 28), np.ones((2, 2), np.uint8))), "path": None}
        for p in pixels[:n]
    ]
    odd = [{"bytes": _png(np.zeros((20, 24), np.uint8)), "path": None}] * 2
    table = pa.table(
        {
            "image": pa.array(doubled + odd, images.schema.field("image").type),
            "label": labels[: n + 2],
        }
    )
    raw = _write(tmp_path, "big", table)
    out = tmp_path / "out"
    with pytest.raises(DataQualityError) as caught:
        _ingest(spark, raw, out)
    assert "40 rows are 56×56, 2 rows are 24×20" in str(caught.value)
    assert "ingest.resize" in str(caught.value)
    report = json.loads((out / "_report.json").read_text())
    assert report["rejected_image_sizes"] == {"56x56": 40, "24x20": 2}

    result, report = _ingest(spark, raw, out, resize="box")
    assert result.counts.rows_out == n + 2
    assert report["preprocessing"]["resize"] == "box"  # what scoring applies to raw input
    features = np.stack(_read(spark, str(out)).sort_values("row_id")[FEATURES])
    np.testing.assert_array_equal(features[:n], (pixels[:n] / 255.0).astype(np.float32))


def test_an_input_without_ids_gets_a_stable_row_id(spark, tmp_path, held_out):
    images, pixels, labels = held_out
    raw = tmp_path / "raw"
    raw.mkdir()
    no_ids = images.drop_columns(["id"])
    pq.write_table(no_ids.slice(0, 30), raw / "a.parquet", row_group_size=7)
    pq.write_table(no_ids.slice(30, 20), raw / "b.parquet")
    outs = [tmp_path / "out1", tmp_path / "out2"]
    for out in outs:
        _ingest(spark, str(raw), out)
    first, second = (_read(spark, str(out)).sort_values("row_id") for out in outs)
    # file number * 2**32 + position in the file, the files in path order
    expected = [*range(30), *(2**32 + i for i in range(20))]
    assert first["row_id"].tolist() == expected
    assert second["row_id"].tolist() == expected
    np.testing.assert_array_equal(
        np.stack(first[FEATURES]), (pixels[:50] / 255.0).astype(np.float32)
    )
    assert first[LABEL].tolist() == labels[:50].tolist()


def test_split_is_deterministic_and_close_to_the_fractions(spark, tmp_path, sample_file):
    split = {"enabled": True, "by": "row", "train": 0.7, "validation": 0.1, "test": 0.2}
    outs = []
    for run in range(2):
        out = tmp_path / f"out{run}"
        _ingest(spark, sample_file, out, split=split)
        assert {p.name for p in out.iterdir() if p.name.startswith("split=")} == {
            "split=train",
            "split=validation",
            "split=test",
        }
        df = spark.read.parquet(str(out)).select(SPLIT, LABEL, FEATURES).toPandas()
        outs.append(df)
    counts = outs[0][SPLIT].value_counts()
    assert counts.sum() == 6000
    assert abs(counts["train"] / 6000 - 0.7) < 0.03
    assert abs(counts["test"] / 6000 - 0.2) < 0.03

    def keyed(df):
        return sorted(
            zip(df[SPLIT], df[LABEL], (row.tobytes() for row in df[FEATURES]), strict=False)
        )

    assert keyed(outs[0]) == keyed(outs[1])


def test_scoring_resizes_raw_images_as_ingest_did(spark, tmp_path, held_out, trained_model_dir):
    from pipeline.artifact import read_model_dir, write_model_dir
    from pipeline.config import IngestSettings
    from pipeline.scoring import run_scoring
    from pipeline.storage import Storage

    storage = Storage(spark)
    metadata, model_bytes = read_model_dir(storage, trained_model_dir)
    model = str(tmp_path / "model")  # the model, as if trained on features ingested with resize
    resized = metadata.model_copy(update={"preprocessing": IngestSettings(resize="box")})
    write_model_dir(storage, model, resized, model_bytes)

    images, pixels, _ = held_out
    small = images.slice(0, 40)
    doubled = [
        {"bytes": _png(np.kron(p.reshape(28, 28), np.ones((2, 2), np.uint8))), "path": None}
        for p in pixels[:40]
    ]
    big = small.set_column(
        small.schema.get_field_index("image"),
        "image",
        pa.array(doubled, small.schema.field("image").type),
    )
    scored = {}
    for name, table in (("small", small), ("big", big)):
        result = run_scoring(
            spark, Config(), _write(tmp_path, name, table), model, str(tmp_path / f"pred-{name}")
        )
        assert result.counts.rows_out == 40
        assert result.report["preprocessing"]["layout"] == "image"
        scored[name] = _read(spark, result.output).sort_values("id")
    np.testing.assert_array_equal(
        np.stack(scored["small"]["probabilities"]), np.stack(scored["big"]["probabilities"])
    )
