"""Decoding PNG/JPEG digits to pixels, one Arrow batch at a time on the executors."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa

from pipeline.contract import FEATURE_DIM, IMAGE_SIDE, RejectReason

DECODED_TYPE = "struct<pixels: array<float>, error: string>"


def decode_batch(blobs: pa.Array) -> pa.Array:
    """Decode encoded images to scaled pixels, with the reject reason of each failure.

    Returns a struct array: ``pixels`` holds FEATURE_DIM floats in [0, 1] (null when the
    image is unusable) and ``error`` the `RejectReason` value (null when it decoded).
    """
    from PIL import Image, UnidentifiedImageError

    n = len(blobs)
    pixels = np.zeros((n, FEATURE_DIM), dtype=np.uint8)
    errors: list[str | None] = [None] * n
    for i, blob in enumerate(blobs.to_pylist()):
        if blob is None:
            errors[i] = RejectReason.PIXELS_NULL.value
            continue
        try:
            image = Image.open(io.BytesIO(blob))
            if image.size != (IMAGE_SIDE, IMAGE_SIDE):  # checked before decoding the pixels
                errors[i] = RejectReason.IMAGE_WRONG_SIZE.value
                continue
            if image.mode != "L":
                image = image.convert("L")
            pixels[i] = np.asarray(image, dtype=np.uint8).reshape(FEATURE_DIM)
        except (
            UnidentifiedImageError,
            OSError,
            ValueError,
            SyntaxError,
            Image.DecompressionBombError,
        ):
            errors[i] = RejectReason.IMAGE_UNDECODABLE.value
    valid = np.array([e is None for e in errors], dtype=bool)
    scaled = scale_pixels(pixels, 255.0)
    offsets = pa.array(np.arange(0, (n + 1) * FEATURE_DIM, FEATURE_DIM, dtype=np.int32))
    values = pa.ListArray.from_arrays(
        offsets, pa.array(scaled.reshape(-1), type=pa.float32()), mask=pa.array(~valid)
    )
    return pa.StructArray.from_arrays(
        [values, pa.array(errors, type=pa.string())], names=["pixels", "error"]
    )


def scale_pixels(pixels: np.ndarray, pixel_max: float) -> np.ndarray:
    """Pixels divided by the dataset's scale, in float32.

    Divides in float64 and rounds once to float32, as Spark SQL does for the array and
    column layouts, so every layout yields bit-identical features.
    """
    return (pixels.astype(np.float64) / pixel_max).astype(np.float32)
