"""Running a search: an Optuna study whose trials are Spark jobs of the ordinary training
code, then the confirmation of its best trials against the reference.

`run_tuning` asks the study's sampler (TPE, random or grid) for trials and trains
``tune.parallelism`` of them at once, each a one-task Spark job reading the features
itself. Every epoch's validation accuracy goes to the study's pruner, which stops trials
that trail the others. The search ends at ``tune.trials`` or when what is left of
``tune.budget_minutes`` is needed to confirm; then the best ``tune.confirm_top`` trials
and the reference are retrained with ``tune.confirm_seeds`` seeds each and ``TUNE_DIR``'s
reports are written (see `pipeline.tuning.report`).
"""

from __future__ import annotations

import logging
import math
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pyspark.sql import SparkSession

from pipeline.artifact import CHECKPOINTS_DIR
from pipeline.config import Config, TrainSettings, TuneSettings
from pipeline.errors import PipelineError, TrainingError
from pipeline.ingest import read_features
from pipeline.outputs import TUNE, check_output
from pipeline.storage import Storage
from pipeline.training.distributed import busy_tasks, task_slots
from pipeline.tuning.confirm import Confirmation, choose, run_confirmation
from pipeline.tuning.report import OWNED, RESULTS_MD, TRIALS_DIR, finite, write_outputs
from pipeline.tuning.runs import train_run
from pipeline.tuning.space import (
    Trial,
    grid_choices,
    grid_size,
    reference_trial,
    suggest,
    trial_base,
    trial_settings,
)
from pipeline.tuning.study import (
    ELAPSED_ATTR,
    INTERRUPTED_ATTR,
    counted_trials,
    local_path,
    open_study,
    quiet_optuna,
    requeue_interrupted,
    search_dir,
)

log = logging.getLogger(__name__)

__all__ = ["TrialResult", "TuneResult", "run_tuning"]

_INVALID_ATTR = "invalid"


@dataclass(frozen=True)
class TrialResult:
    """How a search trial ended: ``ok``, ``pruned`` or ``failed``. Metrics are those of
    the epoch whose weights the model holds (for a pruned trial, its last epoch)."""

    trial: Trial
    model_dir: str
    status: str
    val_accuracy: float | None = None
    val_loss: float | None = None
    epoch: int | None = None
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
    results: list[TrialResult]  # finished trials best first, then pruned, then failed
    confirmations: list[Confirmation]  # best mean first; the reference among them
    winner: Confirmation | None  # what best.yaml names; None: it keeps the reference
    decision: str
    parallelism: int
    seconds: float  # of the whole search, resumed runs included
    notes: list[str]

    @property
    def best(self) -> TrialResult | None:
        """The search's best finished trial (before confirmation)."""
        return self.results[0] if self.results and self.results[0].ok else None

    @property
    def failed(self) -> list[TrialResult]:
        return [r for r in self.results if r.status == "failed"]

    @property
    def pruned(self) -> list[TrialResult]:
        return [r for r in self.results if r.status == "pruned"]

    @property
    def reference(self) -> Confirmation | None:
        return next((c for c in self.confirmations if c.trial.reference), None)


def run_tuning(
    spark: SparkSession, config: Config, input_path: str, output: str, fresh: bool = False
) -> TuneResult:
    """Search ``tune.space`` on the features at `input_path`, keeping the study in `output`.

    Resumes the study `output` holds unless `fresh`. A trial that fails is recorded with
    its error and the others go on; `TrainingError` when no trial finished (after writing
    the table of errors).
    """
    tune = config.tune
    storage = Storage(spark)
    input_path = storage.qualify(input_path)
    output = check_output(storage, output, TUNE, {"--input": input_path})
    # The input's own problems (not found, unreadable) stop the search before it starts,
    # with the input's error and exit code, rather than failing every trial alike.
    read_features(spark, input_path)
    base = trial_base(config.train, tune)
    reference = reference_trial(config.train, tune)
    setup = {
        "input": input_path,
        "train": base,
        "space": {k: _dumped(v) for k, v in tune.space.items()},
        "strategy": tune.strategy,
        "seed": tune.seed,
    }
    quiet_optuna()
    with search_dir(local_path(output), OWNED, fresh) as directory:
        grid = grid_choices(tune.space) if tune.strategy == "grid" else None
        study = open_study(directory, tune, setup, grid)
        notes: list[str] = []
        if requeue_interrupted(study):
            notes.append("the search resumed after an interruption")
        parallelism, slot_notes = _parallelism(spark, tune)
        notes += slot_notes
        clock = _Clock(study, tune.budget_minutes)
        _search(spark, config, study, base, input_path, directory, parallelism, clock)

        results = _results(study, output)
        invalid = _invalid(study)
        if invalid:
            notes.append(f"{invalid} sampled combinations that train settings reject were skipped")
        finished = [r for r in results if r.ok]
        confirmations: list[Confirmation] = []
        winner, decision = None, "no trial finished: nothing to confirm"
        if finished:
            top = _distinct(finished)[: tune.confirm_top]
            fits = _confirmable(
                _durations(study), [r.trial.number for r in top], tune, parallelism, clock.left()
            )
            if fits < len(top):
                notes.append(
                    f"{fits} of the best {len(top)} trials confirmed: what was left of "
                    f"tune.budget_minutes ({max(clock.left(), 0) / 60:.1f} minutes) held no more"
                )
                log.warning("%s", notes[-1])
                top = top[:fits]
            confirmations = run_confirmation(
                spark,
                config,
                study,
                [(r.trial, r.val_accuracy) for r in top] + [(reference, None)],
                input_path,
                directory,
                parallelism,
            )
            winner, decision = choose(
                [c for c in confirmations if not c.trial.reference],
                next(c for c in confirmations if c.trial.reference),
            )
        clock.save()
        result = TuneResult(
            output=output,
            results=results,
            confirmations=confirmations,
            winner=winner,
            decision=decision,
            parallelism=parallelism,
            seconds=clock.elapsed(),
            notes=notes,
        )
        write_outputs(spark, storage, output, result, config, input_path)
        log.info("%s", decision)
    if not finished:
        first = next(iter(results), None)
        detail = f"; trial {first.trial.name}: {first.error_type}: {first.error}" if first else ""
        raise TrainingError(
            f"no trial of the search finished ({len(results)} ended){detail} "
            f"(every trial: {output}/{RESULTS_MD})"
        )
    return result


def _search(
    spark: SparkSession,
    config: Config,
    study: Any,
    base: dict[str, Any],
    input_path: str,
    directory: Path,
    parallelism: int,
    clock: _Clock,
) -> None:
    """Run the study's trials until ``tune.trials``, the grid or the budget is used up."""
    import optuna

    tune = config.tune
    remaining = tune.trials - counted_trials(study)
    size = grid_size(tune.space) if tune.strategy == "grid" else None
    if size is not None:
        remaining = min(remaining, size - counted_trials(study))
    if remaining <= 0 or clock.left() <= 0:
        log.info("the search is complete (%d trials in the study)", counted_trials(study))
        return
    log.info(
        "%s search: %d trials to run, %d at a time, %d epochs at most each%s",
        tune.strategy,
        remaining,
        parallelism,
        tune.epochs,
        f", {clock.left() / 60:.1f} minutes left" if math.isfinite(clock.left()) else "",
    )

    def objective(trial: optuna.Trial) -> float:
        name = f"{trial.number:03d}"
        params = suggest(trial, tune.space)
        trial.set_user_attr("params", params)
        try:
            settings = trial_settings(base, params)
        except ValidationError as exc:
            trial.set_user_attr(_INVALID_ATTR, exc.errors()[0]["msg"])
            log.info("trial %s skipped: %s", name, exc.errors()[0]["msg"])
            return math.nan  # a failed trial, which the samplers leave aside
        trial.set_user_attr("settings", settings.model_dump(mode="json"))

        def should_stop(record: dict[str, float]) -> bool:
            trial.report(record["val_accuracy"], int(record["epoch"]))
            return trial.should_prune()

        model_dir = directory / TRIALS_DIR / name
        try:
            run = train_run(spark, config, settings, input_path, str(model_dir), name, should_stop)
        except KeyboardInterrupt:
            trial.set_user_attr(INTERRUPTED_ATTR, True)
            raise
        except Exception as exc:  # one trial's failure must not sink the search
            if not isinstance(exc, PipelineError):
                log.warning("trial %s failed unexpectedly", name, exc_info=True)
            trial.set_user_attr("error_type", type(exc).__name__)
            trial.set_user_attr("error", " ".join(str(exc).split())[:2000] or type(exc).__name__)
            log.warning("trial %s failed: %s: %s", name, type(exc).__name__, exc)
            return math.nan
        trial.set_user_attr("history", run.history)
        trial.set_user_attr("val_loss", run.val_loss)
        trial.set_user_attr("epoch", run.epoch)
        trial.set_user_attr("epochs_run", run.epochs_run)
        trial.set_user_attr("seconds", round(run.seconds, 3))
        if run.stopped:
            shutil.rmtree(model_dir, ignore_errors=True)  # the run's checkpoints, no model
            log.info(
                "trial %s pruned after epoch %d: val_accuracy %.4f",
                name,
                run.epochs_run,
                run.val_accuracy or 0.0,
            )
            raise optuna.TrialPruned()
        _drop_checkpoints(model_dir)
        log.info(
            "trial %s (%s) done: val_accuracy %.4f at epoch %s of %d",
            name,
            Trial(trial.number, params, settings).structure,
            run.val_accuracy or 0.0,
            run.epoch,
            run.epochs_run,
        )
        return float(run.val_accuracy) if run.val_accuracy is not None else math.nan

    stopping: list[bool] = []

    def budget(study: Any, _trial: Any) -> None:
        clock.save()
        reserve = _confirmation_estimate(study, tune, parallelism)
        if clock.left() <= reserve and not stopping:
            stopping.append(True)
            log.info(
                "no new trials: the budget's last %.1f minutes go to the trials still "
                "running and to confirmation (about %.1f minutes expected)",
                max(clock.left(), 0.0) / 60,
                reserve / 60,
            )
            study.stop()

    timeout = clock.left() if math.isfinite(clock.left()) else None
    study.optimize(
        objective,
        n_trials=remaining,
        timeout=timeout,
        n_jobs=parallelism,
        callbacks=[budget],
    )


class _Clock:
    """Time spent on the search, resumed runs included, against ``tune.budget_minutes``."""

    def __init__(self, study: Any, budget_minutes: float | None) -> None:
        self._study = study
        self._before = float(study.user_attrs.get(ELAPSED_ATTR, 0.0))
        self._started = time.monotonic()
        self._budget = budget_minutes * 60 if budget_minutes else math.inf

    def elapsed(self) -> float:
        return self._before + time.monotonic() - self._started

    def left(self) -> float:
        return self._budget - self.elapsed()

    def save(self) -> None:
        self._study.set_user_attr(ELAPSED_ATTR, round(self.elapsed(), 1))


def _durations(study: Any) -> dict[int, float]:
    """Seconds each finished trial took, by trial number."""
    from optuna.trial import TrialState

    return {
        t.number: t.duration.total_seconds()
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if t.value is not None and math.isfinite(t.value) and t.duration
    }


def _confirmation_seconds(
    durations: dict[int, float], top: list[int], tune: TuneSettings, parallelism: int
) -> float:
    """Seconds confirming the trials numbered `top` is expected to take: each run as long
    as the trial it repeats took in the search, the reference's as the quickest one."""
    if not durations:
        return 0.0
    runs = sum(durations.get(n, 0.0) for n in top) + min(durations.values())
    return runs * tune.confirm_seeds / parallelism


def _confirmable(
    durations: dict[int, float], top: list[int], tune: TuneSettings, parallelism: int, left: float
) -> int:
    """How many of the trials numbered `top` (best first) the `left` seconds of the budget
    can confirm; at least one."""
    fits = [
        k
        for k in range(1, len(top) + 1)
        if _confirmation_seconds(durations, top[:k], tune, parallelism) <= left
    ]
    return max([1, *fits])


def _confirmation_estimate(study: Any, tune: TuneSettings, parallelism: int) -> float:
    """Seconds the confirmation is expected to take, plus one trial's time for the trials
    still running (see `_confirmation_seconds`)."""
    durations = _durations(study)
    if not durations:
        return 0.0
    values = {t.number: t.value for t in study.get_trials(deepcopy=False) if t.number in durations}
    top = sorted(durations, key=lambda n: -values[n])[: tune.confirm_top]
    seconds = _confirmation_seconds(durations, top, tune, parallelism)
    return seconds + statistics.median(durations.values())


def _results(study: Any, output: str) -> list[TrialResult]:
    """The study's trials as results, ranked; interrupted and invalid ones left out."""
    from optuna.trial import TrialState

    status = {TrialState.COMPLETE: "ok", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed"}
    results = []
    for t in study.get_trials(deepcopy=False, states=tuple(status)):
        attrs = t.user_attrs
        if attrs.get(INTERRUPTED_ATTR) or _INVALID_ATTR in attrs or "settings" not in attrs:
            continue
        trial = Trial(t.number, attrs["params"], TrainSettings.model_validate(attrs["settings"]))
        state = status[t.state]
        if state == "ok" and not (t.value is not None and math.isfinite(t.value)):
            state = "failed"
        accuracy = t.value if state == "ok" else None
        if state == "pruned" and t.intermediate_values:
            accuracy = t.intermediate_values[max(t.intermediate_values)]
        results.append(
            TrialResult(
                trial=trial,
                model_dir=f"{output}/{TRIALS_DIR}/{trial.name}",
                status=state,
                val_accuracy=accuracy,
                val_loss=attrs.get("val_loss"),
                epoch=attrs.get("epoch"),
                epochs_run=int(attrs.get("epochs_run", 0)),
                seconds=float(attrs.get("seconds", 0.0)),
                history=tuple(attrs.get("history", ())),
                error=attrs.get("error"),
                error_type=attrs.get("error_type"),
            )
        )
    return sorted(results, key=_rank_key)


def _invalid(study: Any) -> int:
    return sum(1 for t in study.get_trials(deepcopy=False) if _INVALID_ATTR in t.user_attrs)


def _distinct(results: list[TrialResult]) -> list[TrialResult]:
    """Results with settings not seen in an earlier (better) one."""
    seen: set[str] = set()
    kept = []
    for r in results:
        key = r.trial.settings.model_dump_json()
        if key not in seen:
            seen.add(key)
            kept.append(r)
    return kept


def _drop_checkpoints(model_dir: Path) -> None:
    """A finished trial keeps its model, not its per-epoch checkpoints."""
    shutil.rmtree(model_dir / CHECKPOINTS_DIR, ignore_errors=True)


def _dumped(spec: Any) -> Any:
    return spec.model_dump(mode="json") if hasattr(spec, "model_dump") else spec


def _parallelism(spark: SparkSession, tune: TuneSettings) -> tuple[int, list[str]]:
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
    return max(1, min(wanted, free, tune.trials)), notes


def _rank_key(result: TrialResult) -> tuple:
    """Finished trials first, best validation accuracy first, then lowest loss; then
    pruned trials (by their last accuracy), then failed ones."""
    order = {"ok": 0, "pruned": 1, "failed": 2}[result.status]
    accuracy = result.val_accuracy if finite(result.val_accuracy) else -1.0
    loss = result.val_loss if finite(result.val_loss) else math.inf
    return (order, -accuracy, loss, result.trial.number)
