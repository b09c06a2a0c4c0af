"""The model directory: round trip, and hostile or broken files refused before anything runs."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.artifact import (
    METADATA_FILE,
    MODEL_FILE,
    Metadata,
    model_from_bytes,
    model_to_bytes,
    new_metadata,
    read_model_dir,
    write_model_dir,
)
from pipeline.config import TrainSettings
from pipeline.contract import FEATURE_DIM, NUM_CLASSES
from pipeline.errors import ModelError
from pipeline.model import build_model
from pipeline.storage import Storage


def _metadata(model_bytes: bytes, **changes) -> Metadata:
    return new_metadata(model_bytes, TrainSettings(), epochs_completed=1, **changes)


def _rezip(model_bytes: bytes, replace: dict[str, bytes]) -> bytes:
    source = zipfile.ZipFile(io.BytesIO(model_bytes))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as target:
        for name in source.namelist():
            target.writestr(name, replace.get(name, source.read(name)))
        for name in set(replace) - set(source.namelist()):
            target.writestr(name, replace[name])
    return out.getvalue()


def _plant(model_dir: Path, model_bytes: bytes, metadata: dict | None = None) -> None:
    """Write a model directory as an attacker would: files of their choosing."""
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / MODEL_FILE).write_bytes(model_bytes)
    meta = metadata or json.loads(_metadata(model_bytes).model_dump_json())
    (model_dir / METADATA_FILE).write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def reference_bytes() -> bytes:
    return model_to_bytes(build_model(TrainSettings()))


def test_round_trip_gives_the_same_predictions(spark, tmp_path, reference_bytes):
    model_dir = str(tmp_path / "model")
    write_model_dir(
        Storage(spark),
        model_dir,
        _metadata(reference_bytes),
        reference_bytes,
        {"history.png": b"png"},
    )
    metadata, loaded_bytes = read_model_dir(Storage(spark), model_dir)
    assert loaded_bytes == reference_bytes
    original = build_model(TrainSettings())
    rebuilt = model_from_bytes(metadata, loaded_bytes)
    x = np.random.default_rng(0).random((16, FEATURE_DIM), dtype=np.float32)
    np.testing.assert_allclose(
        rebuilt.predict(x, verbose=0), original.predict(x, verbose=0), atol=1e-6
    )
    assert sorted(p.name for p in Path(model_dir).iterdir()) == [
        "history.png",
        METADATA_FILE,
        MODEL_FILE,
    ]


def test_lambda_layer_is_refused_and_never_runs(spark, tmp_path):
    import keras

    marker = tmp_path / "lambda-ran"
    inputs = keras.Input((FEATURE_DIM,))
    hidden = keras.layers.Dense(32, activation="relu", name="hidden_0")(inputs)
    # A function whose only trace would be the marker file, were it ever called.
    payload = eval(f"lambda x: (open({str(marker)!r}, 'w').write('ran'), x)[1]")
    hidden = keras.layers.Lambda(payload)(hidden)
    outputs = keras.layers.Dense(NUM_CLASSES, activation="softmax", name="probabilities")(hidden)
    hostile = model_to_bytes(keras.Model(inputs, outputs))
    marker.unlink()  # building the model ran it once; loading must not run it again
    _plant(tmp_path / "model", hostile)
    with pytest.raises(ModelError, match=r"Lambda.*refusing"):
        read_model_dir(Storage(spark), str(tmp_path / "model"))
    with pytest.raises(ModelError, match="Lambda"):
        model_from_bytes(_metadata(hostile), hostile)
    assert not marker.exists()


def test_config_calling_an_arbitrary_function_is_refused(spark, tmp_path, reference_bytes):
    config = json.loads(zipfile.ZipFile(io.BytesIO(reference_bytes)).read("config.json"))
    dense = config["config"]["layers"][1]["config"]
    dense["activation"] = {
        "module": "os",
        "class_name": "system",
        "config": f"touch {tmp_path / 'pwned'}",
        "registered_name": "system",
    }
    hostile = _rezip(reference_bytes, {"config.json": json.dumps(config).encode()})
    _plant(tmp_path / "model", hostile)
    with pytest.raises(ModelError, match=r"os\.system"):
        read_model_dir(Storage(spark), str(tmp_path / "model"))
    assert not (tmp_path / "pwned").exists()


def test_extra_files_in_the_archive_are_refused(spark, tmp_path, reference_bytes):
    hostile = _rezip(reference_bytes, {"payload.py": b"import os"})
    _plant(tmp_path / "model", hostile)
    with pytest.raises(ModelError, match="unexpected files"):
        read_model_dir(Storage(spark), str(tmp_path / "model"))


def test_weights_changed_without_the_checksum_are_refused(spark, tmp_path, reference_bytes):
    other = model_to_bytes(build_model(TrainSettings(seed=7)))
    _plant(tmp_path / "model", other, json.loads(_metadata(reference_bytes).model_dump_json()))
    with pytest.raises(ModelError, match=r"model\.keras does not match its metadata"):
        read_model_dir(Storage(spark), str(tmp_path / "model"))


def test_truncated_model_file_is_refused_naming_it(spark, tmp_path, reference_bytes):
    _plant(tmp_path / "model", reference_bytes)
    (tmp_path / "model" / MODEL_FILE).write_bytes(reference_bytes[: len(reference_bytes) // 2])
    with pytest.raises(ModelError, match=r"model\.keras does not match"):
        read_model_dir(Storage(spark), str(tmp_path / "model"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model_file": "../../outside/model.keras"}, "model_file"),
        ({"weights_path": "/etc/passwd"}, "weights_path"),
        ({"feature_dim": "many"}, "feature_dim"),
    ],
)
def test_metadata_with_paths_or_unknown_fields_is_refused(
    spark, tmp_path, reference_bytes, change, message
):
    metadata = json.loads(_metadata(reference_bytes).model_dump_json())
    metadata.update(change)
    _plant(tmp_path / "model", reference_bytes, metadata)
    with pytest.raises(ModelError, match=message):
        read_model_dir(Storage(spark), str(tmp_path / "model"))


def test_model_that_does_not_fit_the_data_is_refused(spark, tmp_path, reference_bytes):
    metadata = json.loads(_metadata(reference_bytes).model_dump_json())
    metadata["feature_dim"] = 100
    _plant(tmp_path / "model", reference_bytes, metadata)
    with pytest.raises(ModelError, match=r"takes 100 features.*the data has 784 features"):
        read_model_dir(Storage(spark), str(tmp_path / "model"))


def test_missing_metadata_is_refused(spark, tmp_path, reference_bytes):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / MODEL_FILE).write_bytes(reference_bytes)
    with pytest.raises(ModelError, match="not a complete model directory"):
        read_model_dir(Storage(spark), str(tmp_path / "model"))
