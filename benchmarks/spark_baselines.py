"""Plain Spark jobs, the yardsticks of the whole-process score rows.

    spark-submit benchmarks/spark_baselines.py copy --input FEATURES --output DIR
    spark-submit benchmarks/spark_baselines.py mllib-fit --input FEATURES --model DIR [--rows N]
    spark-submit benchmarks/spark_baselines.py mllib-score --input FEATURES --model DIR --output DIR
    spark-submit benchmarks/spark_baselines.py start-floor

- ``copy``: read the features Parquet, write it again (every column): what any Spark job
  over this data pays.
- ``mllib-fit``: fit MLlib's ``MultilayerPerceptronClassifier`` ([784, 32, 10]) on the first
  ``--rows`` rows and save it (not timed by the benchmark: it stands for a model trained
  earlier, as our scoring job's model is).
- ``mllib-score``: load that model, convert the `features` arrays to vectors, ``transform``
  and write id, label, prediction and probabilities: the scoring job of a plain MLlib user.
- ``start-floor``: start a SparkContext, run one task that starts a Python process which
  imports TensorFlow and Keras (as a training worker's does, scikit-learn and Matplotlib
  left out), and exit: what a one-worker training job pays before it reads a row or takes
  a step, however fast the rest.

Each builds a plain SparkSession (a SparkContext for ``start-floor``, as the training job
on an ingest output does) and imports nothing from the pipeline.
"""

from __future__ import annotations

import argparse
import sys

FEATURES = "features"
LABEL = "label"
ID_COLUMNS = ("id", "row_id")


def copy(spark, features: str, output: str) -> None:
    spark.read.parquet(features).write.parquet(output)


def mllib_fit(spark, features: str, model_dir: str, rows: int) -> None:
    from pyspark.ml.classification import MultilayerPerceptronClassifier
    from pyspark.ml.functions import array_to_vector
    from pyspark.sql import functions as F

    data = (
        spark.read.parquet(features)
        .limit(rows)
        .select(array_to_vector(F.col(FEATURES)).alias("vector"), F.col(LABEL).cast("double"))
    )
    model = MultilayerPerceptronClassifier(
        layers=[784, 32, 10], featuresCol="vector", labelCol=LABEL, maxIter=10, seed=42
    ).fit(data)
    model.save(model_dir)


def mllib_score(spark, features: str, model_dir: str, output: str) -> None:
    from pyspark.ml.classification import MultilayerPerceptronClassificationModel
    from pyspark.ml.functions import array_to_vector, vector_to_array
    from pyspark.sql import functions as F

    model = MultilayerPerceptronClassificationModel.load(model_dir)
    data = spark.read.parquet(features)
    ids = [c for c in ID_COLUMNS if c in data.columns]
    data = data.withColumn("vector", array_to_vector(F.col(FEATURES)))
    model.transform(data).select(
        *ids,
        LABEL,
        F.col("prediction").cast("int").alias("prediction"),
        vector_to_array(F.col("probability"), "float32").alias("probabilities"),
    ).write.parquet(output)


# The import a training worker process starts with (pipeline.training.worker's
# `_start_tensorflow`, with the optional imports it skips, `_UNUSED_BY_KERAS_HERE`).
_IMPORT_TENSORFLOW = (
    "import sys; "
    "sys.modules.update(dict.fromkeys(('sklearn', 'matplotlib', 'pandas', 'scipy'))); "
    "import tensorflow, keras"
)


def start_floor(sc) -> None:
    def start_tensorflow(_):
        import os
        import subprocess

        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", TF_ENABLE_ONEDNN_OPTS="0")
        subprocess.run([sys.executable, "-c", _IMPORT_TENSORFLOW], env=env, check=True)
        return 0

    sc.parallelize([0], 1).map(start_tensorflow).collect()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["copy", "mllib-fit", "mllib-score", "start-floor"])
    parser.add_argument("--input", help="ingested features (Parquet); all but start-floor")
    parser.add_argument("--output", help="output directory (copy, mllib-score); must not exist")
    parser.add_argument("--model", help="MLlib model directory (mllib-fit, mllib-score)")
    parser.add_argument("--rows", type=int, default=6000, help="rows to fit on (mllib-fit)")
    args = parser.parse_args(argv)
    needs = {
        "copy": ["input", "output"],
        "mllib-fit": ["input", "model"],
        "mllib-score": ["input", "model", "output"],
        "start-floor": [],
    }
    missing = [f"--{name}" for name in needs[args.action] if getattr(args, name) is None]
    if missing:
        parser.error(f"{args.action} needs {' and '.join(missing)}")

    if args.action == "start-floor":
        from pyspark import SparkContext

        sc = SparkContext.getOrCreate()
        try:
            start_floor(sc)
        finally:
            sc.stop()
        return 0

    from pyspark.sql import SparkSession

    spark = SparkSession.builder.appName(f"baseline-{args.action}").getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    try:
        if args.action == "copy":
            copy(spark, args.input, args.output)
        elif args.action == "mllib-fit":
            mllib_fit(spark, args.input, args.model, args.rows)
        else:
            mllib_score(spark, args.input, args.model, args.output)
    finally:
        spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
