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
    ONNX_FILE,
    Metadata,
    model_from_bytes,
    model_to_bytes,
    new_metadata,
    read_model_dir,
    read_onnx_model,
    sha256_bytes,
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
        ONNX_FILE,
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


# --- model.onnx: exported beside model.keras, verified before ONNX Runtime sees it -------


def _written(spark, tmp_path, model_bytes: bytes, settings: TrainSettings | None = None) -> Path:
    model_dir = tmp_path / "written"
    metadata = new_metadata(model_bytes, settings or TrainSettings(), epochs_completed=1)
    write_model_dir(Storage(spark), str(model_dir), metadata, model_bytes)
    return model_dir


def _replant_onnx(model_dir: Path, onnx_bytes: bytes, **train_changes) -> None:
    """Replace model.onnx as an attacker would, with metadata.json rewritten to match it."""
    (model_dir / ONNX_FILE).write_bytes(onnx_bytes)
    metadata = json.loads((model_dir / METADATA_FILE).read_text())
    metadata["onnx_sha256"] = sha256_bytes(onnx_bytes)
    metadata["train"].update(train_changes)
    (model_dir / METADATA_FILE).write_text(json.dumps(metadata))


def test_onnx_export_gives_the_keras_probabilities_on_the_sample(
    spark, tmp_path, trained_model_dir, sample_pixels
):
    from pipeline.onnx_graph import session

    metadata, onnx_bytes = read_onnx_model(Storage(spark), trained_model_dir)
    keras_model = model_from_bytes(*read_model_dir(Storage(spark), trained_model_dir))
    pixels, _ = sample_pixels
    x = (pixels.astype(np.float64) / 255.0).astype(np.float32)  # all 6,000 digits

    found = session(onnx_bytes, threads=1)(x)
    expected = keras_model.predict(x, verbose=0)

    assert metadata.onnx_sha256 == sha256_bytes((Path(trained_model_dir) / ONNX_FILE).read_bytes())
    assert found.shape == (len(x), NUM_CLASSES)
    np.testing.assert_allclose(found, expected, atol=1e-5, rtol=0)
    assert (found.argmax(axis=1) == expected.argmax(axis=1)).mean() > 0.999


@pytest.mark.parametrize(
    "settings",
    [
        TrainSettings(hidden_units=[16, 8], activation=["tanh", "swish"], dropout=0.2),
        TrainSettings(hidden_units=[8], activation="gelu", l2=0.01),
        TrainSettings(hidden_units=[8, 8, 8], activation=["elu", "selu", "softplus"]),
        TrainSettings(hidden_units=[8, 8], activation=["sigmoid", "linear"]),
    ],
    ids=["tanh-swish-dropout", "gelu", "elu-selu-softplus", "sigmoid-linear"],
)
def test_every_architecture_the_pipeline_builds_exports(spark, tmp_path, settings):
    from pipeline.onnx_graph import session

    model_dir = _written(spark, tmp_path, model_to_bytes(build_model(settings)), settings)
    metadata, onnx_bytes = read_onnx_model(Storage(spark), str(model_dir))
    x = np.random.default_rng(1).random((64, FEATURE_DIM), dtype=np.float32)
    keras_model = model_from_bytes(metadata, (model_dir / MODEL_FILE).read_bytes())

    np.testing.assert_allclose(
        session(onnx_bytes)(x), keras_model.predict(x, verbose=0), atol=1e-5, rtol=0
    )


def test_export_that_differs_from_keras_is_not_published(
    spark, tmp_path, monkeypatch, reference_bytes
):
    from pipeline import onnx_graph

    real_build = onnx_graph.build_graph

    def off_by_a_little(settings, weights):
        weights = [np.array(w) for w in weights]
        weights[-1][0] += np.float32(1e-3)  # the output bias of class 0
        return real_build(settings, weights)

    monkeypatch.setattr(onnx_graph, "build_graph", off_by_a_little)
    with pytest.raises(ModelError, match=r"differs from Keras by .*refusing to publish"):
        _written(spark, tmp_path, reference_bytes)
    assert not (tmp_path / "written").exists()


def test_tampered_onnx_file_is_refused(spark, tmp_path, reference_bytes):
    model_dir = _written(spark, tmp_path, reference_bytes)
    data = bytearray((model_dir / ONNX_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (model_dir / ONNX_FILE).write_bytes(bytes(data))
    with pytest.raises(ModelError, match=r"model\.onnx does not match its metadata"):
        read_onnx_model(Storage(spark), str(model_dir))


def test_onnx_graph_of_another_architecture_is_refused(spark, tmp_path, reference_bytes):
    from pipeline.onnx_graph import build_graph

    model_dir = _written(spark, tmp_path, reference_bytes)
    wide = TrainSettings(hidden_units=[64])
    weights = build_model(wide).get_weights()
    # A consistent graph and checksum, but metadata.json records Dense(32): refused.
    _replant_onnx(model_dir, build_graph(wide, weights))
    with pytest.raises(ModelError, match=r"hidden_0/kernel of shape \(784, 32\).*refusing"):
        read_onnx_model(Storage(spark), str(model_dir))


@pytest.mark.parametrize("change", ["extra_op", "other_activation", "external_data"])
def test_onnx_graph_with_other_operators_is_refused(spark, tmp_path, reference_bytes, change):
    import onnx
    from onnx import TensorProto, helper

    model_dir = _written(spark, tmp_path, reference_bytes)
    model = onnx.load_model_from_string((model_dir / ONNX_FILE).read_bytes())
    nodes = model.graph.node
    if change == "extra_op":  # scale the probabilities after the softmax
        nodes[-1].output[0] = "softmax_out"
        model.graph.initializer.append(helper.make_tensor("two", TensorProto.FLOAT, [], [2.0]))
        nodes.append(helper.make_node("Mul", ["softmax_out", "two"], ["probabilities"]))
    elif change == "other_activation":  # Relu swapped for an operator the pipeline never writes
        relu = next(n for n in nodes if n.op_type == "Relu")
        relu.op_type = "LeakyRelu"
    else:  # weights read from a file beside the model
        kernel = model.graph.initializer[0]
        kernel.data_location = TensorProto.EXTERNAL
        kernel.external_data.add(key="location", value="/etc/passwd")
    _replant_onnx(model_dir, model.SerializeToString())
    with pytest.raises(ModelError, match="refusing"):
        read_onnx_model(Storage(spark), str(model_dir))


def test_model_dir_without_onnx_says_to_retrain(spark, tmp_path, reference_bytes):
    _plant(tmp_path / "model", reference_bytes)  # metadata as written before the export
    with pytest.raises(ModelError, match=r"written before models were exported to ONNX.*retrain"):
        read_onnx_model(Storage(spark), str(tmp_path / "model"))
