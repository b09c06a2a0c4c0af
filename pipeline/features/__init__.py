"""Raw rows to validated features: the preprocessing shared by ingest and scoring.

`preprocess` is a pure DataFrame transform. It keeps every input column and adds

- ``_features``: array<float> of FEATURE_DIM values in [0, 1], null for a bad row;
- ``_label``: int 0-9 (null for a bad row, or when the data has no label);
- ``reject_reason``: null for a good row, else a `RejectReason` value.

Ingest and scoring then split the rows on ``reject_reason``.
"""

from pipeline.features.layouts import ResolvedLayout, resolve_layout
from pipeline.features.row_ids import ROW_ID, with_ids, with_row_id
from pipeline.features.transform import (
    FEATURES_TMP,
    IMAGE_SIZE_TMP,
    LABEL_TMP,
    Preprocessed,
    accepted_columns,
    onehot,
    pixel_values,
    preprocess,
)

__all__ = [
    "FEATURES_TMP",
    "IMAGE_SIZE_TMP",
    "LABEL_TMP",
    "ROW_ID",
    "Preprocessed",
    "ResolvedLayout",
    "accepted_columns",
    "onehot",
    "pixel_values",
    "preprocess",
    "resolve_layout",
    "with_ids",
    "with_row_id",
]
