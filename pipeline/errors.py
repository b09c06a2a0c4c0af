"""Exception types of the pipeline, each with the exit code its job returns.

A job catches `PipelineError`, prints its message on one line and exits with
`exit_code`, so scripts can tell a bad config from bad data from a crash.
"""

from __future__ import annotations


class PipelineError(Exception):
    """Base of every error the pipeline reports to its user."""

    exit_code = 1


class ConfigError(PipelineError):
    """A configuration file or `--set` value is invalid."""

    exit_code = 2


class EnvironmentProblem(PipelineError):
    """The machine lacks something the job needs (Java, a Python package, task slots)."""

    exit_code = 3


class SlotsBusy(EnvironmentProblem):
    """Enough task slots exist, but other jobs hold them now: waiting may be enough."""


class InputDataError(PipelineError):
    """The input cannot be used: missing columns, unknown layout, corrupt or unreadable file."""

    exit_code = 4


class DataQualityError(PipelineError):
    """Too many rows were rejected, or the rejected counts do not reconcile."""

    exit_code = 5


class ModelError(PipelineError):
    """A model directory is missing, incomplete, tampered with or does not fit the data."""

    exit_code = 6


class TrainingError(PipelineError):
    """Training could not finish: a worker failed, stalled or a collective timed out."""

    exit_code = 7


class TrainingStopped(TrainingError):
    """Training stopped after an epoch because its caller asked (`on_epoch` said so):
    no model was published."""

    def __init__(self, epoch: int) -> None:
        super().__init__(f"training stopped after epoch {epoch}, as its caller asked")
        self.epoch = epoch


class OutputPathError(PipelineError):
    """An output path the job may not write: it holds what this pipeline did not write, is
    a file, overlaps an input, or is the working, home or root directory."""

    exit_code = 2
