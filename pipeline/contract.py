"""The data contract: every constant that describes the data, defined once.

Ingest writes this contract, training and scoring read it. Nothing else in the
project spells out 784, 10 or the column names.
"""

from __future__ import annotations

from enum import Enum

IMAGE_SIDE = 28
FEATURE_DIM = IMAGE_SIDE * IMAGE_SIDE  # 784
NUM_CLASSES = 10

# Columns of the ingest output (the "features" dataset).
FEATURES = "features"  # array<float>, length FEATURE_DIM, scaled to [0, 1]
LABEL = "label"  # int, 0 .. NUM_CLASSES - 1
LABEL_ONEHOT = "label_onehot"  # array<float>, length NUM_CLASSES
SPLIT = "split"  # string, present only when ingest splits the data

# Column of rejected rows.
REJECT_REASON = "reject_reason"

# Columns of the scoring output.
PREDICTION = "prediction"  # int
PROBABILITIES = "probabilities"  # array<float>, length NUM_CLASSES
CONFIDENCE = "confidence"  # float, the largest probability

# Names that mark pass-through id columns when the config does not list them.
ROW_ID = "row_id"  # long; what ingest adds to an input without ids (file number, row in it)
DEFAULT_ID_COLUMNS = ("id", ROW_ID)

# Raw layouts the ingest job reads.
PIXEL_COLUMN_PREFIX = "pixel"  # Kaggle layout: pixel0 .. pixel783


class Layout(str, Enum):
    """How a raw dataset stores the pixels of a digit."""

    IMAGE = "image"  # PNG/JPEG bytes: struct<bytes, path> or binary
    ARRAY = "array"  # one array column of FEATURE_DIM numbers
    COLUMNS = "columns"  # FEATURE_DIM numeric columns pixel0 .. pixel783


class RejectReason(str, Enum):
    """Why a raw row was quarantined. Checked in this order; the first that applies wins."""

    LABEL_NULL = "label_null"
    LABEL_INVALID = "label_invalid"  # a string that is not an integer
    LABEL_OUT_OF_RANGE = "label_out_of_range"
    PIXELS_NULL = "pixels_null"  # null image, null array
    IMAGE_UNDECODABLE = "image_undecodable"
    IMAGE_WRONG_SIZE = "image_wrong_size"  # decodes, but is not 28x28
    WRONG_LENGTH = "wrong_length"  # array with other than FEATURE_DIM values
    NULL_ELEMENT = "null_element"  # a null pixel inside the array or a null pixel column
    NOT_FINITE = "not_finite"  # NaN or +-infinity
    PIXEL_OUT_OF_RANGE = "pixel_out_of_range"  # outside [0, pixel_max] of the dataset


def pixel_columns(prefix: str = PIXEL_COLUMN_PREFIX) -> list[str]:
    """Names of the FEATURE_DIM pixel columns of the columns layout."""
    return [f"{prefix}{i}" for i in range(FEATURE_DIM)]
