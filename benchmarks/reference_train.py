"""The reference Keras script as a process: the yardstick of the whole-process train rows.

    python benchmarks/reference_train.py --input FEATURES --output DIR [--epochs 10]

What a user of plain Keras runs: import TensorFlow, read the ingested features with
pyarrow, build the seed document's network (Dense(32, relu) -> Dense(10, softmax); SGD
lr 0.01 with Keras 2's time-based decay 1e-6, momentum 0.9, Nesterov; categorical
cross-entropy), ``model.fit(epochs, batch_size=32)`` and save ``DIR/model.keras``. It
imports nothing from the pipeline, so its time is Keras's alone. Prints one JSON line:
rows, epochs, seconds of the fit and of the whole script, the last epoch's accuracy.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

STARTED = time.monotonic()

FEATURES = "features"
LABEL = "label"
FEATURE_DIM = 784
NUM_CLASSES = 10


def read_features(path: str):
    """(x, y) as float32: the `features` arrays as a matrix, the labels one-hot."""
    import numpy as np
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=[FEATURES, LABEL])
    x = table.column(FEATURES).combine_chunks().flatten().to_numpy(zero_copy_only=False)
    labels = table.column(LABEL).to_numpy()
    y = np.eye(NUM_CLASSES, dtype=np.float32)[labels]
    return np.asarray(x, np.float32).reshape(-1, FEATURE_DIM), y


def build_reference_model():
    import keras

    model = keras.Sequential(
        [
            keras.Input(shape=(FEATURE_DIM,)),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(NUM_CLASSES, activation="softmax"),
        ]
    )
    # Keras 2's SGD(lr=0.01, decay=1e-6): lr / (1 + decay * iterations).
    schedule = keras.optimizers.schedules.InverseTimeDecay(0.01, decay_steps=1, decay_rate=1e-6)
    model.compile(
        optimizer=keras.optimizers.SGD(schedule, momentum=0.9, nesterov=True),
        loss="categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="ingested features (Parquet directory)")
    parser.add_argument("--output", required=True, help="directory for model.keras (created)")
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args(argv)

    import tensorflow as tf  # noqa: F401  (the import is part of what the script costs)

    x, y = read_features(args.input)
    model = build_reference_model()
    fit_started = time.monotonic()
    history = model.fit(x, y, epochs=args.epochs, batch_size=32, verbose=0)
    fit_seconds = time.monotonic() - fit_started
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=False)
    model.save(output / "model.keras")
    print(
        json.dumps(
            {
                "rows": len(x),
                "epochs": args.epochs,
                "fit_seconds": round(fit_seconds, 3),
                "script_seconds": round(time.monotonic() - STARTED, 3),
                "accuracy": round(float(history.history["accuracy"][-1]), 4),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
