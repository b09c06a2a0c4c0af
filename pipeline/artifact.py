"""The model directory: written by training, verified before anything loads it.

``MODEL/`` holds ``model.keras`` (the artifact of record: weights; its embedded
architecture is never read), ``model.onnx`` (the same network for scoring without
TensorFlow), ``metadata.json`` and ``history.png``. Loading rebuilds the architecture from
the validated metadata and reads only the weights, after checking the file's sha256:
Keras ``safe_mode`` is not a security boundary. The ONNX file is accepted only when its
sha256 matches and it is exactly the graph `pipeline.onnx_graph` builds for the recorded
architecture; it is written only when it gives Keras's probabilities within
`ONNX_TOLERANCE`.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pipeline.config import IngestSettings, TrainSettings
from pipeline.contract import FEATURE_DIM, NUM_CLASSES
from pipeline.errors import ModelError
from pipeline.outputs import MODEL, publish

MODEL_FILE = "model.keras"
ONNX_FILE = "model.onnx"
METADATA_FILE = "metadata.json"
HISTORY_PLOT = "history.png"
CHECKPOINTS_DIR = "checkpoints"

# Largest difference allowed between ONNX Runtime's and Keras's probabilities at export.
ONNX_TOLERANCE = 1e-5
_PROBE_ROWS = 256


class Metadata(BaseModel):
    """What ``metadata.json`` must hold. Anything else in it is refused."""

    model_config = ConfigDict(extra="forbid")

    format_version: int = 1
    feature_dim: int
    classes: int
    model_file: str = MODEL_FILE
    model_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    # None in model directories written before the ONNX export.
    onnx_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    preprocessing: IngestSettings
    train: TrainSettings
    workers: int = Field(ge=1)
    # How the workers kept in step ("single", "exact", "local_sgd") and whether the steps
    # ran XLA-compiled; None in model directories written before they were recorded.
    sync_mode: Literal["single", "exact", "local_sgd"] | None = None
    xla: bool | None = None
    epochs_completed: int = Field(ge=0)
    history: list[dict[str, float]] = Field(default_factory=list)
    samples_per_second: float | None = None
    training_seconds: float | None = None
    # Seconds of each phase of the training job (`pipeline.training.run.job_phases`).
    phases: dict[str, float] | None = None
    data: dict[str, Any] = Field(default_factory=dict)
    # The training data's profile (pipeline.monitoring.drift), which scoring compares with.
    profile: dict[str, Any] | None = None
    # Softmax temperature fitted on validation data (train.calibrate); scoring applies it.
    temperature: float | None = Field(None, gt=0)
    # Validation loss rising while training loss fell (pipeline.training.overfitting).
    overfitting: dict[str, Any] | None = None
    seed: int
    versions: dict[str, str] = Field(default_factory=dict)
    created: str | None = None

    @field_validator("model_file")
    @classmethod
    def _plain_file_name(cls, value: str) -> str:
        if value != MODEL_FILE:
            raise ValueError(f"must be {MODEL_FILE!r}: the model file lives in the model directory")
        return value


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def new_metadata(model_bytes: bytes, train: TrainSettings, **fields: Any) -> Metadata:
    """Metadata for freshly built `model_bytes`: the data contract's shape, its checksum,
    the train settings and seed; `fields` sets the rest (preprocessing, workers, history...)."""
    defaults: dict[str, Any] = {
        "preprocessing": IngestSettings(),
        "workers": 1,
        "epochs_completed": 0,
        "seed": train.seed,
    }
    return Metadata(
        feature_dim=FEATURE_DIM,
        classes=NUM_CLASSES,
        model_sha256=sha256_bytes(model_bytes),
        train=train,
        **{**defaults, **fields},
    )


def parse_metadata(text: str, where: str) -> Metadata:
    """Validated metadata from the text of ``metadata.json``, or `ModelError`."""
    try:
        return Metadata.model_validate(json.loads(text))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{where} is not valid JSON: {exc}") from None
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise ModelError(f"{where} is not valid model metadata: {problems}") from None


def check_fits(
    metadata: Metadata, where: str, feature_dim: int = FEATURE_DIM, classes: int = NUM_CLASSES
) -> None:
    """Refuse a model whose input or output size differs from the data's."""
    if metadata.feature_dim != feature_dim or metadata.classes != classes:
        raise ModelError(
            f"model in {where} takes {metadata.feature_dim} features and predicts "
            f"{metadata.classes} classes; the data has {feature_dim} features and "
            f"{classes} classes"
        )


def check_checksum(metadata: Metadata, model_bytes: bytes, where: str) -> None:
    """Refuse model bytes whose sha256 is not the one recorded in the metadata."""
    _check_sha256(model_bytes, metadata.model_sha256, f"{where}/{MODEL_FILE}")


def _check_sha256(data: bytes, expected: str | None, path: str) -> None:
    actual = sha256_bytes(data)
    if actual != expected:
        raise ModelError(
            f"{path} does not match its metadata (sha256 {actual[:12]}..., expected "
            f"{str(expected)[:12]}...): the file was changed or truncated; refusing to load it"
        )


# What a model archive may name: the layers `build_model` uses and Keras's own
# initializers, regularizers, losses, metrics and optimizer. Anything else (a Lambda
# layer, a function from another module, a custom object) is refused unread.
_ALLOWED_OBJECTS = {
    ("keras", "DTypePolicy"),
    ("keras.src.models.functional", "Functional"),
    ("keras.layers", "InputLayer"),
    ("keras.layers", "Dense"),
    ("keras.layers", "Dropout"),
    ("keras.regularizers", "L2"),
    ("keras.optimizers", "SGD"),
    ("keras.optimizers.schedules", "InverseTimeDecay"),
}
_ALLOWED_MODULES = {"keras.initializers", "keras.losses", "keras.metrics"}
_ARCHIVE_FILES = {"metadata.json", "config.json", "model.weights.h5"}
_MAX_CONFIG_BYTES = 1 << 20


def check_archive(model_bytes: bytes, where: str) -> None:
    """Refuse a ``.keras`` archive that names anything `build_model` would not build.

    Only reads the archive's JSON; nothing in it is imported or run.
    """
    import io
    import zipfile

    try:
        archive = zipfile.ZipFile(io.BytesIO(model_bytes))
        names = set(archive.namelist())
        if not names <= _ARCHIVE_FILES or "model.weights.h5" not in names:
            raise ModelError(
                f"{where}/{MODEL_FILE} holds unexpected files {sorted(names - _ARCHIVE_FILES)} "
                f"or lacks model.weights.h5; refusing it"
            )
        info = archive.getinfo("config.json") if "config.json" in names else None
        if info is None or info.file_size > _MAX_CONFIG_BYTES:
            raise ModelError(f"{where}/{MODEL_FILE} has no readable config.json; refusing it")
        config = json.loads(archive.read("config.json"))
    except (zipfile.BadZipFile, json.JSONDecodeError, UnicodeDecodeError, KeyError) as exc:
        raise ModelError(f"{where}/{MODEL_FILE} is not a valid Keras archive: {exc}") from None
    for module, class_name, registered in _named_objects(config):
        allowed = (module, class_name) in _ALLOWED_OBJECTS or (
            module in _ALLOWED_MODULES and str(class_name).isidentifier()
        )
        if not allowed or registered not in (None, class_name):
            raise ModelError(
                f"{where}/{MODEL_FILE} names {module}.{class_name}"
                f"{f' (registered as {registered})' if registered else ''}, which this "
                f"pipeline never builds: refusing to load it (only Dense/Dropout MLPs are allowed)"
            )


def _named_objects(node):
    """(module, class_name, registered_name) of every serialised object in a Keras config."""
    if isinstance(node, dict):
        if "module" in node or node.get("class_name") in ("Lambda", "__lambda__"):
            yield node.get("module"), node.get("class_name"), node.get("registered_name")
        for value in node.values():
            yield from _named_objects(value)
    elif isinstance(node, list):
        for value in node:
            yield from _named_objects(value)


def read_model_dir(storage, model_dir: str) -> tuple[Metadata, bytes]:
    """Metadata and verified model bytes of `model_dir` (any URI), read on the driver.

    The bytes are small (about 100 kB for the reference model); jobs broadcast them to
    the executors, which rebuild the model with `model_from_bytes`.
    """
    model_dir = model_dir.rstrip("/")
    metadata_path = f"{model_dir}/{METADATA_FILE}"
    if not storage.exists(metadata_path):
        raise ModelError(f"{model_dir} is not a complete model directory: no {METADATA_FILE}")
    metadata = parse_metadata(storage.read_text(metadata_path), metadata_path)
    check_fits(metadata, model_dir)
    model_path = f"{model_dir}/{MODEL_FILE}"
    if not storage.exists(model_path):
        raise ModelError(f"{model_path} is missing")
    model_bytes = storage.read_bytes(model_path)
    check_checksum(metadata, model_bytes, model_dir)
    check_archive(model_bytes, model_dir)
    return metadata, model_bytes


def model_from_bytes(metadata: Metadata, model_bytes: bytes):
    """The Keras model: architecture from `metadata`, weights from verified `model_bytes`.

    Only the weights are read from the ``.keras`` archive; its embedded architecture
    (which could name arbitrary functions or Lambda layers) is never deserialised.
    """
    import tempfile

    from pipeline.model import build_model
    from pipeline.tf_runtime import tensorflow

    tensorflow()  # imported quietly: its native start-up lines never reach the console
    check_checksum(metadata, model_bytes, "(broadcast model)")
    check_archive(model_bytes, "(broadcast model)")
    model = build_model(metadata.train)
    with tempfile.TemporaryDirectory(prefix="digits-model-") as tmp:
        path = os.path.join(tmp, MODEL_FILE)
        with open(path, "wb") as f:
            f.write(model_bytes)
        try:
            model.load_weights(path)
        except Exception as exc:  # Keras raises ValueError, OSError or KeyError on bad archives
            raise ModelError(f"cannot load the weights in {MODEL_FILE}: {exc}") from None
    return model


def check_onnx_checksum(metadata: Metadata, onnx_bytes: bytes, where: str) -> None:
    """Refuse ONNX bytes whose sha256 is not the one recorded in the metadata."""
    _check_sha256(onnx_bytes, metadata.onnx_sha256, f"{where}/{ONNX_FILE}")


def read_onnx_model(storage, model_dir: str) -> tuple[Metadata, bytes]:
    """Metadata and verified ``model.onnx`` bytes of `model_dir`, read on the driver.

    The directory is verified as `read_model_dir` does (``model.keras`` stays the artifact
    of record and must match too); the ONNX file must match its checksum and be the
    graph this pipeline builds for the recorded architecture. No TensorFlow is imported.
    """
    from pipeline.onnx_graph import check_graph

    metadata, _ = read_model_dir(storage, model_dir)
    model_dir = model_dir.rstrip("/")
    path = f"{model_dir}/{ONNX_FILE}"
    if metadata.onnx_sha256 is None:
        raise ModelError(
            f"{model_dir} was written before models were exported to ONNX (its "
            f"{METADATA_FILE} records no {ONNX_FILE}): retrain it with this version to "
            f"score it"
        )
    if not storage.exists(path):
        raise ModelError(f"{path} is missing")
    onnx_bytes = storage.read_bytes(path)
    check_onnx_checksum(metadata, onnx_bytes, model_dir)
    check_graph(metadata.train, onnx_bytes, path)
    return metadata, onnx_bytes


def export_onnx(metadata: Metadata, model_bytes: bytes) -> bytes:
    """``model.onnx`` of verified Keras `model_bytes` (`onnx_of_model`)."""
    return onnx_of_model(metadata.train, model_from_bytes(metadata, model_bytes), metadata.seed)


def onnx_of_model(train: TrainSettings, model, seed: int) -> bytes:
    """``model.onnx`` of the Keras `model` that `build_model` made for `train`, refused
    unless it gives Keras's probabilities within `ONNX_TOLERANCE` on probe inputs.

    Built node by node from the model's weights (`pipeline.onnx_graph`). The probes are
    features in [0, 1] drawn from `seed`: uniform ones, and sparse near-binary ones like
    digits' strokes. Training runs this in its TensorFlow worker, so that the driver never
    imports TensorFlow.
    """
    import numpy as np

    from pipeline.onnx_graph import build_graph, session

    layers = [f"hidden_{i}" for i in range(len(train.hidden_units))]
    weights = [
        w for name in (*layers, "probabilities") for w in model.get_layer(name).get_weights()
    ]
    onnx_bytes = build_graph(train, weights)

    rng = np.random.default_rng(seed)
    uniform = rng.random((_PROBE_ROWS // 2, FEATURE_DIM), dtype=np.float32)
    strokes = (rng.random((_PROBE_ROWS // 2, FEATURE_DIM)) < 0.2) * rng.uniform(0.5, 1.0)
    probe = np.concatenate([uniform, strokes.astype(np.float32)])
    expected = np.asarray(model(probe, training=False), dtype=np.float32)
    found = session(onnx_bytes, threads=1)(probe)
    difference = float(np.abs(found - expected).max())
    if not difference <= ONNX_TOLERANCE:  # also refuses NaN
        raise ModelError(
            f"the ONNX export of this model differs from Keras by {difference:.2e} in a "
            f"probability (allowed {ONNX_TOLERANCE:g}); refusing to publish it"
        )
    return onnx_bytes


def model_to_bytes(model) -> bytes:
    """The ``.keras`` archive of `model` as bytes, for the driver to write with `Storage`."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="digits-model-") as tmp:
        path = os.path.join(tmp, MODEL_FILE)
        model.save(path)
        with open(path, "rb") as f:
            return f.read()


def write_model_dir(
    storage,
    model_dir: str,
    metadata: Metadata,
    model_bytes: bytes,
    extra_files: dict[str, bytes] | None = None,
    onnx_bytes: bytes | None = None,
) -> Metadata:
    """Publish a complete model directory at once (any URI), keeping its checkpoints.

    Writes ``model.onnx`` beside ``model.keras`` and records its sha256: the metadata
    written, and returned, is `metadata` with ``onnx_sha256`` set. `onnx_bytes` is the
    export training made (`onnx_of_model`, already checked against Keras); here it must
    be the graph `pipeline.onnx_graph` builds for the metadata's architecture, and no
    TensorFlow is imported. Without it the model is exported here (`export_onnx`). Files
    are written into a hidden staging directory and moved into place together, so a
    crash never leaves a ``MODEL/`` that looks complete. `metadata.model_sha256` must be
    the checksum of `model_bytes`.
    """
    check_checksum(metadata, model_bytes, model_dir)
    if onnx_bytes is None:
        onnx_bytes = export_onnx(metadata, model_bytes)
    else:
        from pipeline.onnx_graph import check_graph

        check_graph(metadata.train, onnx_bytes, f"{model_dir.rstrip('/')}/{ONNX_FILE}")
    metadata = metadata.model_copy(update={"onnx_sha256": sha256_bytes(onnx_bytes)})
    model_dir = model_dir.rstrip("/")
    staging = storage.staging_dir(model_dir)
    moved: list[str] = []
    try:
        storage.write_bytes(f"{staging}/{MODEL_FILE}", model_bytes)
        storage.write_bytes(f"{staging}/{ONNX_FILE}", onnx_bytes)
        for name, data in (extra_files or {}).items():
            storage.write_bytes(f"{staging}/{name}", data)
        storage.write_text(f"{staging}/{METADATA_FILE}", metadata.model_dump_json(indent=2))
        # Checkpoints and logs live in MODEL/ while training runs: carry them over.
        for keep in (CHECKPOINTS_DIR, "logs"):
            if storage.exists(f"{model_dir}/{keep}"):
                storage.rename(f"{model_dir}/{keep}", f"{staging}/{keep}")
                moved.append(keep)
        publish(storage, staging, model_dir, MODEL, "--model-dir")
    except BaseException:
        for keep in moved:  # put the checkpoints back where the next run looks for them
            if not storage.exists(f"{model_dir}/{keep}"):
                storage.rename(f"{staging}/{keep}", f"{model_dir}/{keep}")
        storage.delete(staging)
        raise
    return metadata
