"""The network and its optimizer, built from `TrainSettings`.

Keras is imported inside the functions: this module is imported on the driver, which
never needs TensorFlow, and by executor code, which must not import it before forking.
"""

from __future__ import annotations

from pipeline.config import TrainSettings
from pipeline.contract import FEATURE_DIM, NUM_CLASSES


def build_model(settings: TrainSettings, seed: int | None = None):
    """Input(784) -> Dense(units, activation) ... -> Dense(10, softmax).

    Weights are initialised from `seed` (default: `settings.seed`), so every worker
    that builds the model starts from the same weights.
    """
    import keras

    seed = settings.seed if seed is None else seed
    regularizer = keras.regularizers.L2(settings.l2) if settings.l2 > 0 else None
    inputs = keras.Input(shape=(FEATURE_DIM,), name="features")
    x = inputs
    for i, (units, activation) in enumerate(
        zip(settings.hidden_units, settings.activations(), strict=True)
    ):
        x = keras.layers.Dense(
            units,
            activation=activation,
            kernel_initializer=keras.initializers.GlorotUniform(seed=seed + i),
            kernel_regularizer=regularizer,
            name=f"hidden_{i}",
        )(x)
        if settings.dropout > 0:
            x = keras.layers.Dropout(settings.dropout, seed=seed + 100 + i, name=f"dropout_{i}")(x)
    outputs = keras.layers.Dense(
        NUM_CLASSES,
        activation="softmax",
        kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 1000),
        kernel_regularizer=regularizer,
        name="probabilities",
    )(x)
    return keras.Model(inputs, outputs, name="digits_mlp")


def build_optimizer(settings: TrainSettings):
    """SGD with Keras 2's time-based decay: lr_t = lr / (1 + decay * t), t the step, and lr
    the worker's (`TrainSettings.worker_learning_rate`)."""
    import keras

    schedule = keras.optimizers.schedules.InverseTimeDecay(
        settings.worker_learning_rate(), decay_steps=1, decay_rate=settings.decay
    )
    return keras.optimizers.SGD(
        learning_rate=schedule, momentum=settings.momentum, nesterov=settings.nesterov
    )
