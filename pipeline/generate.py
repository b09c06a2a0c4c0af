"""Scale data: a raw dataset of any size, made by augmenting the embedded real digits.

Each output row ``id`` takes one of the sample's 6,000 digits and applies a random
rotation, scaling and shift of a few pixels (one bilinear affine resampling), sometimes a
thicker or thinner stroke (grey-level dilation or erosion), and sometimes noise. Every
random number of a row is a hash of ``(seed, id, draw)``, so the output depends only on
the seed and the row count, never on how Spark partitions the work.

The work runs on the executors over Arrow record batches (``spark.range`` ->
``mapInArrow``), vectorised with NumPy; the decoded sample (4.7 MB) is broadcast once.
The raw layouts are those ingest reads: ``image`` (PNG bytes in ``struct<bytes, path>``,
the Hugging Face layout of the sample), ``array`` (``pixels`` array<int> of 784 values
0-255) and ``columns`` (``pixel0`` .. ``pixel783`` ints, the Kaggle layout).
"""

from __future__ import annotations

import io
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa

from pipeline import __version__
from pipeline.config import Config, GenerateSettings
from pipeline.contract import FEATURE_DIM, IMAGE_SIDE, LABEL, Layout, pixel_columns
from pipeline.errors import ConfigError, InputDataError
from pipeline.features.images import ImageSizeError, decode_image
from pipeline.outputs import GENERATE, GENERATE_FILE, check_output, staged_output
from pipeline.sample import sample_path
from pipeline.storage import Storage

log = logging.getLogger(__name__)

ID = "id"
IMAGE = "image"
PIXELS = "pixels"  # the array layout's column
METADATA_FILE = GENERATE_FILE

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_STREAM = np.uint64(0xD1B54A32D192ED03)
_CHUNK = 4096  # rows augmented at once: bounds the temporaries to a few tens of MB

# Scalar draws of a row; the per-pixel noise draws follow them.
_DRAW_SOURCE, _DRAW_ANGLE, _DRAW_SCALE, _DRAW_DX, _DRAW_DY = range(5)
_DRAW_STROKE, _DRAW_NOISE_ON, _DRAW_NOISE_LEVEL = range(5, 8)
_DRAW_PIXELS = 16


@dataclass(frozen=True)
class Augmentation:
    """How strongly digits are distorted; plain values, shipped to the executors."""

    max_shift: float = 3.0  # pixels, each direction
    max_rotation: float = 12.0  # degrees, either way
    max_scale_change: float = 0.1  # scale drawn from [1 - s, 1 + s]
    thicker_probability: float = 0.2
    thinner_probability: float = 0.1
    noise_probability: float = 0.5
    max_noise: float = 20.0  # grey levels, uniform in [-level, level]

    @classmethod
    def from_settings(cls, settings: GenerateSettings) -> Augmentation:
        return cls(
            max_shift=settings.max_shift,
            max_rotation=settings.max_rotation,
            max_scale_change=settings.max_scale_change,
            thicker_probability=settings.thicker_probability,
            thinner_probability=settings.thinner_probability,
            noise_probability=settings.noise_probability,
            max_noise=settings.max_noise,
        )

    @classmethod
    def off_centre(cls, max_shift: float = 10.0) -> Augmentation:
        """Digits moved up to `max_shift` pixels each way and otherwise untouched.

        Ten pixels moves most digits far off the centre every training digit sits on:
        the input drift the monitoring checks must catch.
        """
        return cls(
            max_shift=max_shift,
            max_rotation=0,
            max_scale_change=0,
            thicker_probability=0,
            thinner_probability=0,
            noise_probability=0,
        )


@dataclass(frozen=True)
class GenerateResult:
    output: str
    layout: str
    rows: int
    files: int
    bytes: int
    seconds: float

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0


def load_base_digits(path: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The real digits to augment: (uint8 pixels of shape (n, 784), int64 labels)."""
    import pyarrow.parquet as pq

    path = path or sample_path()
    table = pq.read_table(path, columns=[IMAGE, LABEL])
    blobs = table.column(IMAGE).combine_chunks().field("bytes").to_pylist()
    pixels = np.empty((len(blobs), FEATURE_DIM), dtype=np.uint8)
    for i, blob in enumerate(blobs):
        try:
            pixels[i] = decode_image(blob)
        except ImageSizeError as exc:
            raise InputDataError(f"{path}: digit {i}: {exc}") from None
    labels = np.asarray(table.column(LABEL).to_numpy(), dtype=np.int64)
    return pixels, labels


def augment(
    base: np.ndarray, ids: np.ndarray, seed: int, aug: Augmentation
) -> tuple[np.ndarray, np.ndarray]:
    """Augmented digits for row `ids`: (uint8 pixels (n, 784), index of each source digit).

    A pure function of its arguments: the same ids and seed give the same pixels, in
    any batch and in any order.
    """
    ids = np.asarray(ids, dtype=np.int64)
    pixels = np.empty((len(ids), FEATURE_DIM), dtype=np.uint8)
    sources = np.empty(len(ids), dtype=np.int64)
    for start in range(0, len(ids), _CHUNK):
        part = slice(start, start + _CHUNK)
        pixels[part], sources[part] = _augment_chunk(base, ids[part], seed, aug)
    return pixels, sources


def _augment_chunk(base, ids, seed, aug: Augmentation):
    state = _row_state(ids, seed)
    n = len(ids)
    source = (_uniform(state, _DRAW_SOURCE) * len(base)).astype(np.int64)
    source = np.minimum(source, len(base) - 1)

    angle = np.deg2rad(_symmetric(state, _DRAW_ANGLE, aug.max_rotation))
    scale = 1.0 + _symmetric(state, _DRAW_SCALE, aug.max_scale_change)
    dx = _symmetric(state, _DRAW_DX, aug.max_shift)
    dy = _symmetric(state, _DRAW_DY, aug.max_shift)
    images = _affine(base, source, angle, scale, dx, dy)

    stroke = _uniform(state, _DRAW_STROKE)
    thicker = stroke < aug.thicker_probability
    thinner = (stroke >= aug.thicker_probability) & (
        stroke < aug.thicker_probability + aug.thinner_probability
    )
    if thicker.any():
        images[thicker] = _morph(images[thicker], np.maximum)
    if thinner.any():
        images[thinner] = _morph(images[thinner], np.minimum)

    noisy = _uniform(state, _DRAW_NOISE_ON) < aug.noise_probability
    if noisy.any() and aug.max_noise > 0:
        level = _uniform(state[noisy], _DRAW_NOISE_LEVEL) * aug.max_noise
        draws = _DRAW_PIXELS + np.arange(FEATURE_DIM, dtype=np.uint64)
        noise = _to_unit(_mix(state[noisy, None] + draws[None, :] * _STREAM)) * 2.0 - 1.0
        images[noisy] += (noise * level[:, None]).astype(np.float32)

    out = np.clip(np.rint(images), 0, 255).astype(np.uint8)
    return out.reshape(n, FEATURE_DIM), source


def _affine(base, source, angle, scale, dx, dy) -> np.ndarray:
    """Rotate by `angle`, scale and shift each source digit about the image centre (bilinear)."""
    side = IMAGE_SIDE
    centre = (side - 1) / 2.0
    padded = np.zeros((len(base), side + 3, side + 3), dtype=np.float32)
    padded[:, 1 : side + 1, 1 : side + 1] = base.reshape(-1, side, side)
    flat = padded.reshape(len(base), -1)
    width = side + 3

    rows, cols = np.mgrid[0:side, 0:side].astype(np.float32)
    y = rows.reshape(1, -1) - centre - dy[:, None]
    x = cols.reshape(1, -1) - centre - dx[:, None]
    cos, sin = (np.cos(angle) / scale)[:, None], (np.sin(angle) / scale)[:, None]
    # Inverse mapping: where in the source each output pixel comes from.
    sx = np.clip(cos * x + sin * y + centre, -1.0, side).astype(np.float32)
    sy = np.clip(-sin * x + cos * y + centre, -1.0, side).astype(np.float32)
    x0, y0 = np.floor(sx), np.floor(sy)
    wx, wy = sx - x0, sy - y0
    index = (y0.astype(np.int64) + 1) * width + (x0.astype(np.int64) + 1)
    rows_of = source[:, None]
    top = flat[rows_of, index] * (1 - wx) + flat[rows_of, index + 1] * wx
    bottom = flat[rows_of, index + width] * (1 - wx) + flat[rows_of, index + width + 1] * wx
    return (top * (1 - wy) + bottom * wy).astype(np.float32)


def _morph(images: np.ndarray, op) -> np.ndarray:
    """Grey-level dilation (np.maximum) or erosion (np.minimum) with a 3x3 cross."""
    side = IMAGE_SIDE
    img = images.reshape(-1, side, side)
    padded = np.pad(img, ((0, 0), (1, 1), (1, 1)))
    out = img.copy()
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        out = op(out, padded[:, dy : dy + side, dx : dx + side])
    return out.reshape(images.shape)


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a bijective 64-bit hash (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _row_state(ids: np.ndarray, seed: int) -> np.ndarray:
    seed_hash = _mix(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
    with np.errstate(over="ignore"):
        return _mix(ids.astype(np.uint64) * _GOLDEN + seed_hash)


def _to_unit(x: np.ndarray) -> np.ndarray:
    """Uniform floats in [0, 1) from 64-bit hashes."""
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _uniform(state: np.ndarray, draw: int) -> np.ndarray:
    with np.errstate(over="ignore"):
        return _to_unit(_mix(state + np.uint64(draw + 1) * _STREAM))


def _symmetric(state: np.ndarray, draw: int, amplitude: float) -> np.ndarray:
    return ((_uniform(state, draw) * 2.0 - 1.0) * amplitude).astype(np.float32)


def spark_schema(layout: Layout) -> str:
    """The DDL schema of a generated dataset: ``id``, the pixels in `layout`, ``label``."""
    if layout is Layout.IMAGE:
        pixels = f"{IMAGE} struct<bytes: binary, path: string>"
    elif layout is Layout.ARRAY:
        pixels = f"{PIXELS} array<int>"
    else:
        pixels = ", ".join(f"{c} int" for c in pixel_columns())
    return f"{ID} bigint, {pixels}, {LABEL} bigint"


def to_record_batch(
    ids: np.ndarray, pixels: np.ndarray, labels: np.ndarray, layout: Layout
) -> pa.RecordBatch:
    """One Arrow batch in `layout`, with exactly the types of `spark_schema(layout)`."""
    columns: list[pa.Array] = [pa.array(ids, type=pa.int64())]
    names = [ID]
    if layout is Layout.IMAGE:
        columns.append(_png_struct(pixels))
        names.append(IMAGE)
    elif layout is Layout.ARRAY:
        offsets = pa.array(np.arange(0, (len(ids) + 1) * FEATURE_DIM, FEATURE_DIM, dtype=np.int32))
        values = pa.array(pixels.astype(np.int32).reshape(-1), type=pa.int32())
        columns.append(pa.ListArray.from_arrays(offsets, values))
        names.append(PIXELS)
    else:
        by_column = np.ascontiguousarray(pixels.T.astype(np.int32))
        columns.extend(pa.array(col, type=pa.int32()) for col in by_column)
        names.extend(pixel_columns())
    columns.append(pa.array(labels, type=pa.int64()))
    names.append(LABEL)
    return pa.RecordBatch.from_arrays(columns, names=names)


def _png_struct(pixels: np.ndarray) -> pa.StructArray:
    from PIL import Image

    blobs = []
    for row in pixels:
        buffer = io.BytesIO()
        Image.fromarray(row.reshape(IMAGE_SIDE, IMAGE_SIDE)).save(buffer, format="PNG")
        blobs.append(buffer.getvalue())
    return pa.StructArray.from_arrays(
        [pa.array(blobs, type=pa.binary()), pa.nulls(len(blobs), type=pa.string())],
        names=["bytes", "path"],
    )


def generate_batches(
    batches: Iterator[pa.RecordBatch],
    base: np.ndarray,
    labels: np.ndarray,
    seed: int,
    aug: Augmentation,
    layout: Layout,
) -> Iterator[pa.RecordBatch]:
    """Turn batches of row ids into batches of augmented digits (the mapInArrow body)."""
    for batch in batches:
        ids = batch.column(0).to_numpy()
        pixels, sources = augment(base, ids, seed, aug)
        yield to_record_batch(ids, pixels, labels[sources], layout)


def run_generate(
    spark,
    config: Config,
    rows: int,
    output: str,
    layout: str | Layout | None = None,
    seed: int | None = None,
) -> GenerateResult:
    """Write `rows` augmented digits to `output` (Parquet, replaced atomically)."""
    settings = config.generate
    layout = Layout(layout or settings.layout)
    seed = settings.seed if seed is None else seed
    if rows < 1:
        raise ConfigError(f"--rows must be at least 1, got {rows}")
    started = time.monotonic()
    storage = Storage(spark)
    final = check_output(storage, output, GENERATE)

    base, labels = load_base_digits()
    shared = spark.sparkContext.broadcast((base, labels))
    aug = Augmentation.from_settings(settings)
    parallelism = spark.sparkContext.defaultParallelism
    partitions = max(
        math.ceil(rows / settings.rows_per_file),
        min(parallelism, math.ceil(rows / settings.min_rows_per_task)),
    )

    def body(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        digits, digit_labels = shared.value
        return generate_batches(batches, digits, digit_labels, seed, aug, layout)

    df = spark.range(0, rows, 1, partitions).mapInArrow(body, spark_schema(layout))
    try:
        with staged_output(storage, final, GENERATE) as staging:
            df.write.option("maxRecordsPerFile", settings.rows_per_file).parquet(staging)
            files = storage.list_files(staging)
            seconds = time.monotonic() - started
            storage.write_json(
                f"{staging}/{METADATA_FILE}",
                {
                    "job": GENERATE.job,
                    "rows": rows,
                    "layout": layout.value,
                    "seed": seed,
                    "source": "embedded sample (6,000 MNIST digits), augmented",
                    "augmentation": asdict(aug),
                    "files": len(files),
                    "bytes": sum(size for _, size in files),
                    "seconds": round(seconds, 3),
                    "version": __version__,
                },
            )
    finally:
        shared.unpersist()
    log.info("generated %d %s rows in %d files at %s", rows, layout.value, len(files), final)
    return GenerateResult(
        final, layout.value, rows, len(files), sum(size for _, size in files), seconds
    )
