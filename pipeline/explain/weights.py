"""The first layer's weights, read from a verified model archive without TensorFlow.

Each hidden unit of the first layer weighs the 784 pixels: drawn as 28x28 images, the
weights show which strokes excite or inhibit it. The ``.keras`` archive keeps them in
``model.weights.h5``; h5py reads that on the driver, where TensorFlow is never imported.
"""

from __future__ import annotations

import io
import zipfile

import numpy as np

from pipeline.artifact import Metadata, check_archive, check_checksum
from pipeline.contract import FEATURE_DIM
from pipeline.errors import ModelError

_WEIGHTS = "model.weights.h5"


def first_layer_weights(metadata: Metadata, model_bytes: bytes) -> np.ndarray:
    """The (FEATURE_DIM, units) kernel of the first hidden layer of verified model bytes."""
    import h5py

    check_checksum(metadata, model_bytes, "(model)")
    check_archive(model_bytes, "(model)")
    with zipfile.ZipFile(io.BytesIO(model_bytes)) as archive:
        data = archive.read(_WEIGHTS)
    kernels: list[np.ndarray] = []
    with h5py.File(io.BytesIO(data), "r") as weights:

        def visit(name, node):
            if isinstance(node, h5py.Dataset) and node.ndim == 2 and node.shape[0] == FEATURE_DIM:
                kernels.append(np.asarray(node[()], np.float32))

        if "layers" in weights:  # not the optimizer's variables, which have the same shapes
            weights["layers"].visititems(visit)
    units = metadata.train.hidden_units[0]
    found = [k for k in kernels if k.shape[1] == units]
    if len(found) != 1:
        raise ModelError(
            f"the model archive holds {len(found)} kernels of shape ({FEATURE_DIM}, {units}) "
            f"where its first layer should have one"
        )
    return found[0]
