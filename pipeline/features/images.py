"""Decoding PNG/JPEG digits to pixels: the one place the project decodes an image.

`decode_image` turns one encoded image into 784 grey levels; `decode_batch` applies it to
an Arrow batch on the executors (the ingest and scoring preprocessing), and the scale-data
generator and the tests decode the embedded sample with it too.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa

from pipeline.contract import FEATURE_DIM, IMAGE_SIDE, RejectReason

DECODED_TYPE = "struct<pixels: array<float>, error: string, size: string>"


class ImageSizeError(ValueError):
    """An image that decodes but is not 28x28, and is not to be resized."""

    def __init__(self, size: tuple[int, int]) -> None:
        super().__init__(f"image is {size[0]}x{size[1]}, expected {IMAGE_SIDE}x{IMAGE_SIDE}")
        self.size = size


def decode_image(blob: bytes, resize: str | None = None) -> np.ndarray:
    """The FEATURE_DIM uint8 grey levels of one encoded digit, row by row.

    An image of another size raises `ImageSizeError`, or with `resize` (a Pillow filter
    name: ``nearest``, ``box``, ``bilinear``, ``hamming``, ``bicubic``, ``lanczos``) is
    resized to 28x28. Undecodable bytes raise one of `decode_errors()`.
    """
    from PIL import Image

    image = Image.open(io.BytesIO(blob))
    if image.size != (IMAGE_SIDE, IMAGE_SIDE):  # checked before decoding the pixels
        if resize is None:
            raise ImageSizeError(image.size)
        image = image.convert("L").resize(
            (IMAGE_SIDE, IMAGE_SIDE), Image.Resampling[resize.upper()]
        )
    if image.mode != "L":
        image = image.convert("L")
    return np.asarray(image, dtype=np.uint8).reshape(FEATURE_DIM)


def decode_errors() -> tuple[type[BaseException], ...]:
    """What Pillow raises for bytes that are not a usable image."""
    from PIL import Image, UnidentifiedImageError

    return (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def decode_batch(blobs: pa.Array, resize: str | None = None) -> pa.Array:
    """Decode encoded images to scaled pixels, with the reject reason of each failure.

    Returns a struct array: ``pixels`` holds FEATURE_DIM floats in [0, 1] (null when the
    image is unusable), ``error`` the `RejectReason` value (null when it decoded) and
    ``size`` the ``WIDTHxHEIGHT`` of an image of the wrong size (else null).
    """
    unusable = decode_errors()
    n = len(blobs)
    pixels = np.zeros((n, FEATURE_DIM), dtype=np.uint8)
    errors: list[str | None] = [None] * n
    sizes: list[str | None] = [None] * n
    for i, blob in enumerate(blobs.to_pylist()):
        if blob is None:
            errors[i] = RejectReason.PIXELS_NULL.value
            continue
        try:
            pixels[i] = decode_image(blob, resize)
        except ImageSizeError as exc:
            errors[i] = RejectReason.IMAGE_WRONG_SIZE.value
            sizes[i] = f"{exc.size[0]}x{exc.size[1]}"
        except unusable:
            errors[i] = RejectReason.IMAGE_UNDECODABLE.value
    valid = np.array([e is None for e in errors], dtype=bool)
    scaled = scale_pixels(pixels, 255.0)
    offsets = pa.array(np.arange(0, (n + 1) * FEATURE_DIM, FEATURE_DIM, dtype=np.int32))
    values = pa.ListArray.from_arrays(
        offsets, pa.array(scaled.reshape(-1), type=pa.float32()), mask=pa.array(~valid)
    )
    return pa.StructArray.from_arrays(
        [values, pa.array(errors, type=pa.string()), pa.array(sizes, type=pa.string())],
        names=["pixels", "error", "size"],
    )


def scale_pixels(pixels: np.ndarray, pixel_max: float) -> np.ndarray:
    """Pixels divided by the dataset's scale, in float32.

    Divides in float64 and rounds once to float32, as Spark SQL does for the array and
    column layouts, so every layout yields bit-identical features.
    """
    return (pixels.astype(np.float64) / pixel_max).astype(np.float32)
