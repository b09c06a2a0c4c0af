"""The trained model as an MLflow model, for `mlflow.pyfunc.load_model` and `spark_udf`.

A pyfunc over the model directory's own files (``model.onnx`` and ``metadata.json``): it
runs the graph with the scoring job's own predictor (ONNX Runtime, checksum verified
against the metadata), so it gives the job's probabilities. Signature: a float32
tensor of 784 features per row in, 10 class probabilities out. Loading it needs this
package installed (or on the Python path), as the scoring job does. Imported only when
tracking is on: it needs MLflow.
"""

from __future__ import annotations

from pathlib import Path

import mlflow.pyfunc
import numpy as np

from pipeline.artifact import METADATA_FILE, ONNX_FILE
from pipeline.contract import FEATURE_DIM, FEATURES, NUM_CLASSES

__all__ = ["DigitsModel", "signature"]

PROBABILITIES_OUTPUT = "probabilities"


def signature():
    """784 float32 features in (the `features` column), 10 probabilities out."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, FEATURE_DIM), FEATURES)]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, NUM_CLASSES), PROBABILITIES_OUTPUT)]),
    )


def write_code(folder: str | Path) -> str:
    """The model-from-code file MLflow records instead of a pickled Python object."""
    path = Path(folder) / "digits_model.py"
    path.write_text(
        "from mlflow.models import set_model\n\n"
        "from pipeline.mlflow_model import DigitsModel\n\n"
        "set_model(DigitsModel())\n",
        encoding="utf-8",
    )
    return str(path)


def artifacts(model_dir: str | Path) -> dict[str, str]:
    """The files of a local model directory the MLflow model packs."""
    return {
        "model": str(Path(model_dir) / ONNX_FILE),
        "metadata": str(Path(model_dir) / METADATA_FILE),
    }


def requirements() -> list[str]:
    """The packages loading the model needs, at the versions installed here."""
    from importlib import metadata

    found = []
    for name in ("mlflow", "onnxruntime", "numpy", "pandas", "pyarrow", "pydantic"):
        try:
            found.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(name)
    return found


class DigitsModel(mlflow.pyfunc.PythonModel):
    """Class probabilities for rows of 784 features scaled to [0, 1]."""

    def load_context(self, context) -> None:
        from pipeline.scoring.executor import build_predictor

        metadata_json = Path(context.artifacts["metadata"]).read_text(encoding="utf-8")
        model_bytes = Path(context.artifacts["model"]).read_bytes()
        self._predict = build_predictor(metadata_json, model_bytes, 1)

    def predict(self, context, model_input, params=None):  # MLflow reads hints as a schema
        if isinstance(model_input, dict):
            model_input = model_input[FEATURES]
        features = np.asarray(model_input, dtype=np.float32)
        if features.ndim != 2 or features.shape[1] != FEATURE_DIM:
            raise ValueError(
                f"expected rows of {FEATURE_DIM} features (shape (n, {FEATURE_DIM})), "
                f"got shape {features.shape}"
            )
        return self._predict(np.ascontiguousarray(features))
