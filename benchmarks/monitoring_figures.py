"""The calibration and drift figures of the README, from the embedded sample.

    python benchmarks/monitoring_figures.py [--epochs 10] [--seed 42]

Trains the reference model (train defaults) on the sample's first 4,000 digits, fits a
temperature on the next 1,000 (validation) and measures on the last 1,000 (held out):
the expected calibration error (15 bins) before and after temperature scaling, the
accuracy both ways, and the drift of the held-out digits, the same digits inverted
(1 - x) and shifted far off-centre (`pipeline.generate`'s affine transform, shifts up to
10 pixels) from the profile of the 4,000 training digits, classes being the model's
predictions as in scoring. Prints JSON. No Spark: the same sums as the jobs, in NumPy.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np


def run(epochs: int = 10, seed: int = 42) -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from pipeline.config import ScoreSettings, TrainSettings
    from pipeline.generate import Augmentation, augment, load_base_digits
    from pipeline.model import build_model, build_optimizer
    from pipeline.monitoring import (
        apply_temperature,
        calibration_from_sums,
        calibration_sums,
        compare_profiles,
        fit_temperature,
        profile_from_sums,
        profile_sums,
    )

    pixels, labels = load_base_digits()
    x = (pixels / 255.0).astype(np.float32)
    train, validation, held = slice(0, 4000), slice(4000, 5000), slice(5000, 6000)
    settings = TrainSettings(epochs=epochs, seed=seed)
    model = build_model(settings)
    model.compile(optimizer=build_optimizer(settings), loss="sparse_categorical_crossentropy")
    model.fit(x[train], labels[train], epochs=epochs, batch_size=settings.batch_size, verbose=0)
    predict = lambda data: model.predict(data, batch_size=4096, verbose=0)  # noqa: E731

    temperature = fit_temperature(predict(x[validation]), labels[validation])
    p = predict(x[held])

    def calibration(probabilities):
        correct = probabilities.argmax(axis=1) == labels[held]
        c = calibration_from_sums(calibration_sums(probabilities.max(axis=1), correct, 15))
        return {"ece": round(c.ece, 4), "accuracy": round(float(correct.mean()), 4)}

    score = ScoreSettings()
    bins = score.drift.ink_bins
    training = profile_from_sums(profile_sums(x[train], labels[train], bins), bins)
    far = Augmentation.off_centre()
    shifted, _ = augment(pixels[held], np.arange(1000), seed, far)
    cases = {"held_out": x[held], "inverted": 1.0 - x[held], "shifted": shifted / 255.0}
    drift = {}
    for name, data in cases.items():
        predicted = predict(data.astype(np.float32)).argmax(axis=1)
        profile = profile_from_sums(profile_sums(data, predicted, bins), bins)
        drift[name] = compare_profiles(training, profile, score.drift).as_dict()
    return {
        "epochs": epochs,
        "temperature": round(temperature, 4),
        "calibration_before": calibration(p),
        "calibration_after": calibration(apply_temperature(p, temperature)),
        "drift": drift,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    print(json.dumps(run(args.epochs, args.seed), indent=2))


if __name__ == "__main__":
    main()
