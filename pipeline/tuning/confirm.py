"""Winners that are not noise: the best trials and the reference retrained with several
seeds, ranked by their mean, and a winner named only when it beats the reference by more
than the spread the seeds show.

Each confirmation run trains with another ``train.seed`` (new initial weights, batch order
and validation rows), none of them the seed the search used, so the search's own lucky
draws do not carry over. Results are kept in the study, so a resumed search does not
train a run twice.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import statistics
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyspark.sql import SparkSession

from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.tuning.runs import train_run
from pipeline.tuning.space import Trial
from pipeline.tuning.study import CONFIRM_DIR

log = logging.getLogger(__name__)

__all__ = ["Confirmation", "choose", "confirmation_seeds", "run_confirmation"]


@dataclass(frozen=True)
class Confirmation:
    """A trial (or the reference) retrained once per seed."""

    trial: Trial
    seeds: tuple[int, ...]
    accuracies: tuple[float, ...]  # validation accuracy per seed that finished
    epochs: tuple[int, ...]  # the judged epoch per seed that finished
    search_accuracy: float | None = None  # what the search measured (None: the reference)
    errors: tuple[str, ...] = ()

    @property
    def mean(self) -> float:
        return statistics.fmean(self.accuracies) if self.accuracies else math.nan

    @property
    def std(self) -> float:
        """Sample standard deviation over the seeds (nan below two)."""
        return statistics.stdev(self.accuracies) if len(self.accuracies) >= 2 else math.nan

    @property
    def measured(self) -> bool:
        return len(self.accuracies) >= 2

    @property
    def epochs_kept(self) -> int:
        """The median epoch the seeds' runs settled on."""
        return max(1, round(statistics.median(self.epochs))) if self.epochs else 1


def confirmation_seeds(train_seed: int, count: int) -> list[int]:
    """`count` seeds, none of them the search's own ``train.seed``."""
    return [train_seed + 1 + i for i in range(count)]


def choose(
    candidates: list[Confirmation], reference: Confirmation
) -> tuple[Confirmation | None, str]:
    """The winner, or None to keep the reference, and the reason in one sentence.

    The best mean wins only when its margin over the reference's mean exceeds the two
    standard deviations added (mean ± std of the two do not overlap).
    """
    ranked = sorted((c for c in candidates if c.measured), key=lambda c: -c.mean)
    if not reference.measured:
        return None, (
            "the reference could not be measured on two seeds or more, so no trial can be "
            "shown to beat it: best.yaml keeps the reference"
        )
    if not ranked:
        return None, "no trial was measured on two seeds or more: best.yaml keeps the reference"
    top = ranked[0]
    margin = top.mean - reference.mean
    noise = top.std + reference.std
    figures = (
        f"trial {top.trial.name} {top.mean:.4f} ± {top.std:.4f} against the reference "
        f"{reference.mean:.4f} ± {reference.std:.4f}: margin {margin:+.4f}, noise {noise:.4f}"
    )
    if margin > noise:
        return (
            top,
            f"{figures}; the margin exceeds the noise: best.yaml names trial {top.trial.name}",
        )
    return None, f"{figures}; the margin is within the noise: best.yaml keeps the reference"


def run_confirmation(
    spark: SparkSession,
    config: Config,
    study: Any,
    trials: list[tuple[Trial, float | None]],
    input_path: str,
    directory: Path,
    parallelism: int,
) -> list[Confirmation]:
    """Retrain each (trial, search accuracy) once per seed, `parallelism` runs at once;
    runs the study already holds are not trained again. Best mean first."""
    seeds = confirmation_seeds(config.train.seed, config.tune.confirm_seeds)
    todo = [
        (trial, seed)
        for trial, _ in trials
        for seed in seeds
        if _key(trial, seed) not in study.user_attrs
    ]
    if todo:
        log.info("confirming %d trials with seeds %s: %d runs", len(trials), seeds, len(todo))

    def one(job: tuple[Trial, int]) -> None:
        trial, seed = job
        name = f"{trial.name} seed {seed}"
        model_dir = directory / CONFIRM_DIR / f"{trial.name}-seed{seed}"
        settings = trial.settings.model_copy(update={"seed": seed})
        try:
            run = train_run(spark, config, settings, input_path, str(model_dir), name)
            record: dict[str, Any] = {
                "val_accuracy": run.val_accuracy,
                "val_loss": run.val_loss,
                "epoch": run.epoch,
                "seconds": round(run.seconds, 3),
            }
            log.info("%s: val_accuracy %.4f at epoch %s", name, run.val_accuracy or 0.0, run.epoch)
        except PipelineError as exc:
            record = {"error": f"{type(exc).__name__}: {exc}"}
            log.warning("%s failed: %s", name, record["error"])
        except Exception as exc:  # one run must not sink the others
            record = {"error": f"{type(exc).__name__}: {exc}"}
            log.warning("%s failed unexpectedly", name, exc_info=True)
        study.set_user_attr(_key(trial, seed), record)
        shutil.rmtree(model_dir, ignore_errors=True)  # only its figures are kept

    with ThreadPoolExecutor(max(1, parallelism), thread_name_prefix="confirm") as pool:
        list(pool.map(one, todo))
    with contextlib.suppress(OSError):
        (directory / CONFIRM_DIR).rmdir()  # when empty
    attrs = study.user_attrs
    confirmed = []
    for trial, search_accuracy in trials:
        records = [(seed, attrs[_key(trial, seed)]) for seed in seeds]
        ok = [(s, r) for s, r in records if "error" not in r and r.get("val_accuracy") is not None]
        confirmed.append(
            Confirmation(
                trial=trial,
                seeds=tuple(s for s, _ in ok),
                accuracies=tuple(float(r["val_accuracy"]) for _, r in ok),
                epochs=tuple(int(r["epoch"]) for _, r in ok),
                search_accuracy=search_accuracy,
                errors=tuple(r["error"] for _, r in records if "error" in r),
            )
        )
    return sorted(confirmed, key=lambda c: -c.mean if c.accuracies else math.inf)


def _key(trial: Trial, seed: int) -> str:
    return f"confirm {trial.name} seed {seed}"
