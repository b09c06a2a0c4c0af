"""The preprocessing transform: Spark SQL for arrays and columns, Arrow for images."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from pipeline.config import IngestSettings
from pipeline.contract import (
    FEATURE_DIM,
    FEATURES,
    LABEL,
    LABEL_ONEHOT,
    NUM_CLASSES,
    REJECT_REASON,
    Layout,
    RejectReason,
)
from pipeline.features.layouts import ResolvedLayout, resolve_layout

FEATURES_TMP = "_features"
LABEL_TMP = "_label"
IMAGE_SIZE_TMP = "_image_size"  # WIDTHxHEIGHT of an image rejected as image_wrong_size
_DECODED_TMP = "_decoded"


@dataclass(frozen=True)
class Preprocessed:
    """A raw DataFrame with features, label and reject reason added, and what was decided."""

    df: DataFrame
    layout: ResolvedLayout
    raw_columns: tuple[str, ...]


def preprocess(
    raw: DataFrame, settings: IngestSettings, require_label: bool = True
) -> Preprocessed:
    """Validate every row of `raw` and compute its features; see the package docstring."""
    resolved = resolve_layout(raw.schema, settings, require_label)
    label, label_reason = _label(resolved)

    if resolved.layout is Layout.IMAGE:
        (column,) = resolved.pixel_source
        blob = F.col(column).getField("bytes") if resolved.image_is_struct else F.col(column)
        from pyspark.sql.functions import arrow_udf

        from pipeline.features.images import DECODED_TYPE, decode_batch

        resize = settings.resize

        def decode_images(blobs: pa.Array) -> pa.Array:
            return decode_batch(blobs, resize)

        decode = arrow_udf(decode_images, DECODED_TYPE)
        df = raw.withColumn(_DECODED_TMP, decode(blob))
        df = df.withColumn(IMAGE_SIZE_TMP, F.col(f"{_DECODED_TMP}.size"))
        features = F.col(f"{_DECODED_TMP}.pixels")
        pixel_reason = F.col(f"{_DECODED_TMP}.error")
    else:
        pixels = pixel_values(resolved)
        df = raw
        features = F.transform(
            pixels, lambda x: (x.cast("double") / resolved.pixel_max).cast("float")
        )
        element_type = raw.select(pixels.alias("p")).schema.fields[0].dataType.elementType
        pixel_reason = _pixel_reason(pixels, resolved, element_type)

    reason = F.when(label_reason.isNotNull(), label_reason).otherwise(pixel_reason).cast("string")
    df = df.withColumn(REJECT_REASON, reason)
    df = df.withColumn(FEATURES_TMP, F.when(F.col(REJECT_REASON).isNull(), features))
    df = df.withColumn(LABEL_TMP, F.when(F.col(REJECT_REASON).isNull(), label))
    if _DECODED_TMP in df.columns:
        df = df.drop(_DECODED_TMP)
    return Preprocessed(df, resolved, tuple(raw.columns))


def accepted_columns(prepared: Preprocessed, with_onehot: bool = True) -> list[Column]:
    """The columns of the features dataset: ids, features, label and its one-hot form."""
    columns = [F.col(c) for c in prepared.layout.id_columns]
    columns.append(F.col(FEATURES_TMP).alias(FEATURES))
    if prepared.layout.label_column is not None:
        columns.append(F.col(LABEL_TMP).alias(LABEL))
        if with_onehot:
            columns.append(onehot(F.col(LABEL_TMP)).alias(LABEL_ONEHOT))
    return columns


def pixel_values(layout: ResolvedLayout) -> Column | None:
    """The raw pixel values of a row as one array (array and columns layouts; None for images)."""
    if layout.layout is Layout.IMAGE:
        return None
    if layout.layout is Layout.ARRAY:
        return F.col(layout.pixel_source[0])
    return F.array(*[F.col(c) for c in layout.pixel_source])


def onehot(label: Column) -> Column:
    """array<float> of NUM_CLASSES with 1.0 at `label`."""
    return F.transform(
        F.sequence(F.lit(0), F.lit(NUM_CLASSES - 1)),
        lambda i: F.when(i == label, F.lit(1.0)).otherwise(F.lit(0.0)).cast("float"),
    )


def _label(resolved: ResolvedLayout) -> tuple[Column, Column]:
    """The label as int and the reason it is bad (null when it is fine or absent)."""
    if resolved.label_column is None:
        return F.lit(None).cast("int"), F.lit(None).cast("string")
    raw = F.col(resolved.label_column)
    dtype = resolved.label_type
    if isinstance(dtype, T.StringType):
        text = F.trim(raw)
        is_integer = text.rlike(r"^[+-]?[0-9]{1,9}$")
        value = F.when(is_integer, text.cast("long"))
        invalid = ~is_integer
    elif isinstance(dtype, (T.FloatType, T.DoubleType, T.DecimalType)):
        as_double = raw.cast("double")
        invalid = F.isnan(as_double) | (as_double != F.floor(as_double))
        value = F.when(~invalid, F.floor(as_double).cast("long"))
    else:
        value = raw.cast("long")
        invalid = F.lit(False)
    reason = (
        F.when(raw.isNull(), F.lit(RejectReason.LABEL_NULL.value))
        .when(invalid, F.lit(RejectReason.LABEL_INVALID.value))
        .when((value < 0) | (value >= NUM_CLASSES), F.lit(RejectReason.LABEL_OUT_OF_RANGE.value))
    )
    return value.cast("int"), reason


def _pixel_reason(pixels: Column, resolved: ResolvedLayout, element_type: T.DataType) -> Column:
    """Why an array of pixels is bad, or null.

    A good row is recognised by `_all_present_and_in_range`; only a bad row pays for the
    per-element lambdas that name its reason.
    """
    top = F.lit(resolved.pixel_max)

    reason = (
        F.when(pixels.isNull(), F.lit(RejectReason.PIXELS_NULL.value))
        .when(F.size(pixels) != FEATURE_DIM, F.lit(RejectReason.WRONG_LENGTH.value))
        .when(_all_present_and_in_range(pixels, top, element_type), F.lit(None))
        .when(F.exists(pixels, lambda x: x.isNull()), F.lit(RejectReason.NULL_ELEMENT.value))
    )
    if not resolved.integral_pixels:
        reason = reason.when(
            F.exists(pixels, lambda x: F.isnan(x) | (F.abs(x) == F.lit(float("inf")))),
            F.lit(RejectReason.NOT_FINITE.value),
        )
    return reason.otherwise(F.lit(RejectReason.PIXEL_OUT_OF_RANGE.value))


def _all_present_and_in_range(pixels: Column, top: Column, element_type: T.DataType) -> Column:
    """True when no element is null, NaN or outside [0, top]; false or null otherwise.

    Three built-in loops (compiled to tight Java) instead of one lambda per element, which
    costs twice as much: `array_min`/`array_max` skip nulls and order NaN above every
    number, and `array_contains` of a value below the range is null exactly when the array
    holds a null (true when it holds that value, which the minimum rejects anyway).
    """
    below_range = F.lit(-1).cast(element_type)
    return (
        (F.array_contains(pixels, below_range) == F.lit(False))
        & (F.array_min(pixels) >= F.lit(0))
        & (F.array_max(pixels) <= top)
    )
