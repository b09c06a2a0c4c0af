"""Recognise which raw layout a dataset uses and where its pixels, label and ids are."""

from __future__ import annotations

from dataclasses import dataclass

from pyspark.sql import types as T

from pipeline.config import IngestSettings
from pipeline.contract import (
    DEFAULT_ID_COLUMNS,
    FEATURE_DIM,
    FEATURES,
    LABEL_ONEHOT,
    Layout,
    pixel_columns,
)
from pipeline.errors import InputDataError

_INTEGRAL = (T.ByteType, T.ShortType, T.IntegerType, T.LongType)
_FRACTIONAL = (T.FloatType, T.DoubleType, T.DecimalType)
IMAGE_MAX = 255.0  # decoded images are 8-bit grayscale


@dataclass(frozen=True)
class ResolvedLayout:
    """Where a dataset keeps each part of a digit, decided once from its schema."""

    layout: Layout
    pixel_source: tuple[str, ...]  # the image/array column, or the 784 pixel columns
    image_is_struct: bool  # image column is struct<bytes, ...> rather than binary
    pixel_max: float  # the dataset's pixel scale: values must lie in [0, pixel_max]
    integral_pixels: bool
    label_column: str | None  # None when scoring unlabelled data
    label_type: T.DataType | None
    id_columns: tuple[str, ...]


def resolve_layout(
    schema: T.StructType, settings: IngestSettings, require_label: bool = True
) -> ResolvedLayout:
    """Decide the layout from `schema` and `settings`, or explain what is missing."""
    fields = {f.name: f.dataType for f in schema.fields}
    label_column, label_type = _resolve_label(fields, settings, require_label)
    id_columns = _resolve_ids(fields, settings)

    candidates = {
        Layout.IMAGE: _image_candidates(fields, settings),
        Layout.ARRAY: _array_candidates(fields, settings),
        Layout.COLUMNS: _columns_candidate(fields, settings),
    }
    if settings.layout != "auto":
        layout = Layout(settings.layout)
        found = candidates[layout]
        if len(found) != 1:
            raise InputDataError(_no_layout_message(fields, f"ingest.layout is {layout.value}, "))
    else:
        present = [layout for layout, found in candidates.items() if len(found) == 1]
        if len(present) != 1:
            what = (
                f"several layouts fit ({', '.join(p.value for p in present)}); " if present else ""
            )
            raise InputDataError(_no_layout_message(fields, what))
        layout = present[0]
        found = candidates[layout]

    if layout is Layout.IMAGE:
        (column,) = found
        return ResolvedLayout(
            layout,
            (column,),
            isinstance(fields[column], T.StructType),
            IMAGE_MAX,
            True,
            label_column,
            label_type,
            id_columns,
        )
    if layout is Layout.ARRAY:
        (column,) = found
        element = fields[column].elementType
        integral = isinstance(element, _INTEGRAL)
        return ResolvedLayout(
            layout,
            (column,),
            False,
            _pixel_max(settings, integral),
            integral,
            label_column,
            label_type,
            id_columns,
        )
    (columns,) = found
    integral = all(isinstance(fields[c], _INTEGRAL) for c in columns)
    return ResolvedLayout(
        layout,
        tuple(columns),
        False,
        _pixel_max(settings, integral),
        integral,
        label_column,
        label_type,
        id_columns,
    )


def _pixel_max(settings: IngestSettings, integral: bool) -> float:
    if settings.pixel_max is not None:
        return float(settings.pixel_max)
    return 255.0 if integral else 1.0


def _resolve_label(fields, settings: IngestSettings, require_label: bool):
    name = settings.label_column
    if name not in fields:
        if require_label:
            raise InputDataError(
                f"no label column '{name}'; columns found: {_list(fields)}. "
                f"Set ingest.label_column to the column that holds the digit (0-9)"
            )
        return None, None
    dtype = fields[name]
    if not isinstance(dtype, (*_INTEGRAL, *_FRACTIONAL, T.StringType)):
        raise InputDataError(
            f"label column '{name}' has type {dtype.simpleString()}; expected an integer "
            f"or a string of digits. Set ingest.label_column to another column"
        )
    return name, dtype


def _resolve_ids(fields, settings: IngestSettings) -> tuple[str, ...]:
    if settings.id_columns is None:
        return tuple(c for c in DEFAULT_ID_COLUMNS if c in fields)
    missing = [c for c in settings.id_columns if c not in fields]
    if missing:
        raise InputDataError(
            f"ingest.id_columns names {missing}, not in the input; columns found: {_list(fields)}"
        )
    return tuple(settings.id_columns)


def _is_image_type(dtype: T.DataType) -> bool:
    if isinstance(dtype, T.BinaryType):
        return True
    return isinstance(dtype, T.StructType) and any(
        f.name == "bytes" and isinstance(f.dataType, T.BinaryType) for f in dtype.fields
    )


def _is_numeric_array(dtype: T.DataType) -> bool:
    return isinstance(dtype, T.ArrayType) and isinstance(
        dtype.elementType, (*_INTEGRAL, *_FRACTIONAL)
    )


def _image_candidates(fields, settings: IngestSettings) -> list[str]:
    if settings.image_column is not None:
        dtype = fields.get(settings.image_column)
        return [settings.image_column] if dtype is not None and _is_image_type(dtype) else []
    return [name for name, dtype in fields.items() if _is_image_type(dtype)]


def _array_candidates(fields, settings: IngestSettings) -> list[str]:
    if settings.array_column is not None:
        dtype = fields.get(settings.array_column)
        return [settings.array_column] if dtype is not None and _is_numeric_array(dtype) else []
    if FEATURES in fields and _is_numeric_array(fields[FEATURES]):
        return [FEATURES]  # an ingest output read again, e.g. by the scoring job
    return [n for n, d in fields.items() if _is_numeric_array(d) and n != LABEL_ONEHOT]


def _columns_candidate(fields, settings: IngestSettings) -> list[list[str]]:
    columns = pixel_columns(settings.pixel_column_prefix)
    if all(c in fields and isinstance(fields[c], (*_INTEGRAL, *_FRACTIONAL)) for c in columns):
        return [columns]
    return []


def _list(fields) -> str:
    names = list(fields)
    shown = ", ".join(names[:12])
    return shown + (f", ... ({len(names)} columns)" if len(names) > 12 else "")


def _no_layout_message(fields, prefix: str) -> str:
    return (
        f"{prefix}no usable pixel layout; columns found: {_list(fields)}. Expected one of: "
        f"an image column (struct with binary 'bytes', or binary; set ingest.image_column), "
        f"one numeric array column of {FEATURE_DIM} values (set ingest.array_column), or "
        f"{FEATURE_DIM} numeric columns pixel0..pixel{FEATURE_DIM - 1} "
        f"(set ingest.pixel_column_prefix); force one with ingest.layout"
    )
