"""Overfitting seen in a run's history: validation loss rising while training loss falls."""

from __future__ import annotations

import json
import logging

import pytest

from pipeline.config import Config, TrainSettings
from pipeline.training import run_training
from pipeline.training.overfitting import overfitting, overfitting_message


def _history(losses, val_losses):
    return [
        {"epoch": float(i + 1), "loss": loss, "val_loss": val}
        for i, (loss, val) in enumerate(zip(losses, val_losses, strict=True))
    ]


def test_rising_validation_loss_with_falling_training_loss_is_found():
    history = _history([1.0, 0.8, 0.6, 0.5, 0.4, 0.3], [0.9, 0.7, 0.72, 0.75, 0.8, 0.9])
    found = overfitting(history, epochs=3)
    assert found == {"from_epoch": 2, "to_epoch": 5, "val_loss": [0.7, 0.8], "loss": [0.8, 0.4]}
    assert overfitting(history, epochs=4)["to_epoch"] == 6
    assert overfitting(history, epochs=5) is None  # only four rises in a row
    assert overfitting(history, epochs=0) is None  # the warning turned off


def test_no_warning_unless_both_hold_in_a_row():
    # validation loss rises, but so does the training loss: not overfitting
    assert overfitting(_history([1, 1.1, 1.2, 1.3], [1, 1.1, 1.2, 1.3]), epochs=2) is None
    # an improving epoch in between breaks the run
    history = _history([1.0, 0.9, 0.8, 0.7, 0.6], [0.5, 0.6, 0.4, 0.5, 0.45])
    assert overfitting(history, epochs=2) is None
    # no validation data: nothing to see
    assert overfitting([{"epoch": 1.0, "loss": 1.0}, {"epoch": 2.0, "loss": 0.5}], 1) is None


def test_the_message_names_the_settings_that_counter_it():
    found = {"from_epoch": 4, "to_epoch": 7, "val_loss": [0.2, 0.3], "loss": [0.1, 0.05]}
    message = overfitting_message(found, TrainSettings(dropout=0.2))
    for setting in ("train.dropout (now 0.2)", "train.l2 (now 0)", "train.augment.* (now off)"):
        assert setting in message
    assert "train.early_stopping.enabled, now off" in message
    assert "3 epochs in a row (epochs 4-7: 0.2000 -> 0.3000)" in message


@pytest.mark.slow
def test_an_overfitting_run_warns_and_records_it(spark, ingested_sample, tmp_path, caplog):
    """A wide network without regularisation, fast, on 4,800 digits: it overfits."""
    config = Config().with_overrides(
        {
            "train": {
                "hidden_units": [512],
                "learning_rate": 0.1,
                "epochs": 14,
                "validation_fraction": 0.2,
                "overfit_patience": 2,
            }
        }
    )
    with caplog.at_level(logging.WARNING, logger="pipeline.training"):
        result = run_training(spark, config, ingested_sample, str(tmp_path / "model"))
    found = json.loads((tmp_path / "model" / "metadata.json").read_text())["overfitting"]
    assert found is not None and found == result.metadata.overfitting
    assert found["to_epoch"] - found["from_epoch"] == 2
    history = {int(h["epoch"]): h for h in result.history}
    assert history[found["to_epoch"]]["val_loss"] > history[found["from_epoch"]]["val_loss"]
    assert history[found["to_epoch"]]["loss"] < history[found["from_epoch"]]["loss"]
    warnings = [r.getMessage() for r in caplog.records if "overfits" in r.getMessage()]
    assert len(warnings) == 1 and "train.dropout (now 0)" in warnings[0]
