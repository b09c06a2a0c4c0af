"""`predict`: the trained model on a DataFrame you already have, from your own Spark code."""

from __future__ import annotations

import functools

from pyspark.sql import DataFrame
from pyspark.sql import types as T

from pipeline.config import IngestSettings
from pipeline.contract import CONFIDENCE, PREDICTION, PROBABILITIES, REJECT_REASON
from pipeline.errors import InputDataError
from pipeline.features import FEATURES_TMP, IMAGE_SIZE_TMP, LABEL_TMP, preprocess
from pipeline.scoring import executor
from pipeline.scoring.inference import broadcast_model, read_scoring_model, task_cpus
from pipeline.scoring.inputs import scoring_preprocessing
from pipeline.storage import Storage


def predict(df: DataFrame, model_dir: str, features: str = "features") -> DataFrame:
    """`df` with `prediction` (int), `probabilities` (array<float>, 10) and `confidence`
    (float) appended, computed by the model in `model_dir`.

    When `df` has a `features` column, it must hold validated features (784 floats in
    [0, 1], as the ingest job writes them); rows where it is null get null predictions,
    and any other invalid row fails the action that reads it. Without that column, `df`
    is a raw layout (image, array or pixel columns) and is preprocessed exactly as the
    scoring job does, with the settings recorded in the model: a ``reject_reason``
    column is added, and rejected rows get null predictions.

    The model is verified on the driver when this is called (metadata, checksums, graph),
    shipped once as a broadcast, and evaluated by ONNX Runtime in the Python workers, one
    session per worker, one call per Arrow batch
    (``spark.sql.execution.arrow.maxRecordsPerBatch`` rows). The result is lazy, like any
    DataFrame: nothing is scored until an action runs.
    """
    spark = df.sparkSession
    metadata, onnx_bytes = read_scoring_model(Storage(spark), model_dir)
    if features in df.columns:
        field = df.schema[features].dataType
        if not (
            isinstance(field, T.ArrayType)
            and isinstance(field.elementType, (T.FloatType, T.DoubleType))
        ):
            raise InputDataError(
                f"column '{features}' is {field.simpleString()}; predict needs array<float> "
                f"of validated features, or a raw layout without a '{features}' column"
            )
        scored, column, keep = df, features, tuple(df.columns)
    else:
        settings = scoring_preprocessing(metadata.preprocessing, IngestSettings())
        scored = preprocess(df, settings, require_label=False).df
        column = FEATURES_TMP
        keep = (*df.columns, REJECT_REASON)
        scored = scored.drop(*(c for c in (LABEL_TMP, IMAGE_SIZE_TMP) if c not in keep))
    taken = [c for c in (PREDICTION, PROBABILITIES, CONFIDENCE) if c in keep]
    if taken:
        raise InputDataError(
            f"the input already has a column {', '.join(taken)}: rename it before predict"
        )
    model = broadcast_model(spark, metadata, onnx_bytes)
    schema = T.StructType(
        [
            *(scored.schema[name] for name in keep),
            T.StructField(PREDICTION, T.IntegerType(), True),
            T.StructField(PROBABILITIES, T.ArrayType(T.FloatType(), False), True),
            T.StructField(CONFIDENCE, T.FloatType(), True),
        ]
    )
    append = functools.partial(
        executor.append_predictions,
        broadcast=model.handle,
        key=model.key,
        threads=task_cpus(spark),
        features=column,
        keep=keep,
    )
    return scored.mapInArrow(append, schema)
