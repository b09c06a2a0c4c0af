"""Running a search: each trial a one-task Spark job of the ordinary training code.

`run_tuning` trains the planned trials with `run_training` from a pool of driver threads:
each trial reads the same features itself, so ``tune.parallelism`` trials run at once as
Spark tasks. ``TUNE_DIR`` is published in one piece (see `pipeline.tuning.report`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any

from pyspark.sql import SparkSession

from pipeline import training
from pipeline.config import Config, TuneSettings
from pipeline.errors import PipelineError, SlotsBusy, TrainingError
from pipeline.storage import Storage
from pipeline.training.distributed import busy_tasks, task_slots
from pipeline.tuning.report import RESULTS_MD, TRIALS_DIR, finite, write_outputs
from pipeline.tuning.space import Trial, plan_trials

log = logging.getLogger(__name__)

__all__ = ["TrialResult", "TuneResult", "run_tuning"]

# A trial refused because another trial's job held the slot it needed is tried again.
_SLOT_RETRIES = 5
_SLOT_RETRY_SECONDS = 3.0


@dataclass(frozen=True)
class TrialResult:
    """How a trial ended. Metrics are those of the epoch whose weights the model holds."""

    trial: Trial
    model_dir: str
    status: str  # "ok" or "failed"
    val_accuracy: float | None = None
    val_loss: float | None = None
    epoch: int | None = None  # the judged epoch
    epochs_run: int = 0
    seconds: float = 0.0
    history: tuple[dict[str, float], ...] = ()
    error: str | None = None
    error_type: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass(frozen=True)
class TuneResult:
    output: str
    results: list[TrialResult]  # best first; failed trials last
    parallelism: int
    seconds: float
    notes: list[str]

    @property
    def best(self) -> TrialResult | None:
        return self.results[0] if self.results and self.results[0].ok else None

    @property
    def failed(self) -> list[TrialResult]:
        return [r for r in self.results if not r.ok]


def run_tuning(spark: SparkSession, config: Config, input_path: str, output: str) -> TuneResult:
    """Train every trial of the search on the features at `input_path`; publish `output`.

    A trial that fails is recorded with its error and the others go on; `TrainingError`
    only when every trial failed (after publishing the table of errors).
    """
    started = time.monotonic()
    tune = config.tune
    trials = plan_trials(config.train, tune)
    storage = Storage(spark)
    output = storage.qualify(output).rstrip("/")
    input_path = storage.qualify(input_path)
    storage.clear_stale_staging(output)
    staging = storage.staging_dir(output)
    parallelism, notes = _parallelism(spark, tune, len(trials))
    log.info(
        "%s search: %d trials, %d at a time, %d epochs at most each",
        tune.strategy,
        len(trials),
        parallelism,
        max(t.settings.epochs for t in trials),
    )

    done: list[TrialResult] = []
    with ThreadPoolExecutor(parallelism, thread_name_prefix="trial") as pool:
        futures = [
            pool.submit(_run_trial, spark, config, trial, input_path, staging, output)
            for trial in trials
        ]
        for future in as_completed(futures):
            result = future.result()
            done.append(result)
            _log_result(result, len(done), len(trials))

    results = sorted(done, key=_rank_key)
    tune_result = TuneResult(output, results, parallelism, time.monotonic() - started, notes)
    write_outputs(spark, storage, staging, tune_result, config, input_path)
    storage.publish(staging, output)
    if tune_result.best is None:
        first = results[0]
        raise TrainingError(
            f"all {len(results)} trials failed; trial {first.trial.name}: "
            f"{first.error_type}: {first.error} (every error: {output}/{RESULTS_MD})"
        )
    return tune_result


def _run_trial(
    spark: SparkSession, config: Config, trial: Trial, input_path: str, staging: str, output: str
) -> TrialResult:
    """Train one trial; any error it raises becomes a failed `TrialResult`."""
    trial_config = config.model_copy(update={"train": trial.settings})
    started = time.monotonic()
    for attempt in range(_SLOT_RETRIES + 1):
        try:
            result = training.run_training(
                spark,
                trial_config,
                input_path,
                f"{staging}/{TRIALS_DIR}/{trial.name}",
                workers=1,
                fresh=True,
                on_epoch=lambda record: _log_epoch(trial.name, record),
            )
            break
        except SlotsBusy as exc:
            # Another trial's short jobs (counting rows) may hold the slot for a moment.
            if attempt == _SLOT_RETRIES:
                return _failed(trial, output, exc, time.monotonic() - started)
            log.info("trial %s waits for a free task slot", trial.name)
            time.sleep(_SLOT_RETRY_SECONDS)
        except PipelineError as exc:
            return _failed(trial, output, exc, time.monotonic() - started)
        except Exception as exc:  # anything else one trial raises must not sink the search
            log.warning("trial %s failed unexpectedly", trial.name, exc_info=True)
            return _failed(trial, output, exc, time.monotonic() - started)
    history = tuple(dict(h) for h in result.history)
    judged = _judged_epoch(result, trial)
    record = next((h for h in history if int(h["epoch"]) == judged), {})
    return TrialResult(
        trial=trial,
        model_dir=f"{output}/{TRIALS_DIR}/{trial.name}",
        status="ok",
        val_accuracy=record.get("val_accuracy"),
        val_loss=record.get("val_loss"),
        epoch=judged,
        epochs_run=result.metadata.epochs_completed,
        seconds=round(result.metadata.training_seconds or result.seconds, 3),
        history=history,
    )


def _judged_epoch(result: training.TrainResult, trial: Trial) -> int | None:
    """The epoch whose weights the trained model holds: the best epoch when training
    stopped early and restored it, else the last epoch (as the training loop decided)."""
    chief = result.fit.workers[0]
    if not result.history:
        return None
    stopping = trial.settings.early_stopping
    if chief.get("stopped_early") and stopping.restore_best_weights and chief.get("best_epoch"):
        return int(chief["best_epoch"])
    return int(result.history[-1]["epoch"])


def _parallelism(spark: SparkSession, tune: TuneSettings, trials: int) -> tuple[int, list[str]]:
    """Trials at once: ``tune.parallelism`` or the free task slots, never more than either."""
    slots, how = task_slots(spark)
    busy = busy_tasks(spark)
    free = max(1, slots - busy)
    notes = []
    wanted = tune.parallelism or free
    if wanted > free:
        notes.append(
            f"tune.parallelism {wanted} capped to {free}: the free task slots "
            f"({slots} in all, {busy} busy; {how})"
        )
        log.warning("%s", notes[-1])
    return max(1, min(wanted, free, trials)), notes


def _failed(trial: Trial, output: str, exc: BaseException, seconds: float) -> TrialResult:
    message = " ".join(str(exc).split())[:2000] or type(exc).__name__
    return TrialResult(
        trial=trial,
        model_dir=f"{output}/{TRIALS_DIR}/{trial.name}",
        status="failed",
        seconds=round(seconds, 3),
        error=message,
        error_type=type(exc).__name__,
    )


def _log_epoch(name: str, record: Mapping[str, Any]) -> None:
    parts = [f"trial {name} epoch {int(record['epoch'])}/{int(record.get('epochs', 0))}"]
    parts += [f"{k} {record[k]:.4f}" for k in ("loss", "val_loss", "val_accuracy") if k in record]
    log.info("%s", "  ".join(parts))


def _log_result(result: TrialResult, count: int, total: int) -> None:
    if result.ok:
        log.info(
            "trial %s (%s) done [%d/%d]: val_accuracy %.4f at epoch %s, %.1f s",
            result.trial.name,
            result.trial.structure,
            count,
            total,
            result.val_accuracy or 0.0,
            result.epoch,
            result.seconds,
        )
    else:
        log.warning(
            "trial %s failed [%d/%d]: %s: %s",
            result.trial.name,
            count,
            total,
            result.error_type,
            result.error,
        )


def _rank_key(result: TrialResult) -> tuple:
    """Best first: highest validation accuracy, then lowest loss; failed trials last."""
    accuracy = result.val_accuracy if result.ok and finite(result.val_accuracy) else -1.0
    loss = result.val_loss if finite(result.val_loss) else math.inf
    return (-accuracy, loss, result.trial.number)
