"""The search directory and the Optuna study kept in it.

``TUNE_DIR`` is a local directory that the search owns (``_tune.json`` marks it; see
`pipeline.outputs`): ``study.db`` (Optuna's storage, an embedded SQLite database) records
every trial as it starts, reports and ends, so a search that was killed resumes where it
stopped when the same command runs again; ``--fresh`` deletes what an earlier search
wrote there and starts over.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pipeline.config import TuneSettings
from pipeline.errors import ConfigError
from pipeline.outputs import TUNE_FILE

log = logging.getLogger(__name__)

__all__ = ["STUDY_FILE", "counted_trials", "open_study", "requeue_interrupted", "search_dir"]

STUDY_FILE = "study.db"
STUDY_NAME = "search"
LOCK_FILE = ".search.lock"
CONFIRM_DIR = "confirm"
# Attributes of the study that hold what the search itself decided.
SETUP_ATTR = "setup"
ELAPSED_ATTR = "elapsed_seconds"
INTERRUPTED_ATTR = "interrupted"
REQUEUED_ATTR = "requeued"


def local_path(qualified: str) -> Path:
    """The local path of a qualified ``file:`` URI; `ConfigError` for any other scheme."""
    if not qualified.startswith("file:"):
        raise ConfigError(
            f"--output {qualified}: the search keeps its study in an SQLite file, which "
            "needs a local directory; give a local path (its trial models stay there too)"
        )
    return Path(qualified.removeprefix("file:").removeprefix("//"))


@contextlib.contextmanager
def search_dir(path: Path, owned: tuple[str, ...], fresh: bool) -> Iterator[Path]:
    """Claim `path` (checked by `pipeline.outputs.check_output` as a search directory or
    a new one) for one search at a time; with `fresh`, first delete the `owned` entries
    and the study an earlier search wrote there."""
    path.mkdir(parents=True, exist_ok=True)
    marker = path / TUNE_FILE
    if not marker.exists():
        marker.write_text(json.dumps({"job": "tune", "study": STUDY_FILE}) + "\n")
    with open(path / LOCK_FILE, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(
                f"another search is running in {path}; wait for it or choose another --output"
            ) from None
        if fresh and (path / STUDY_FILE).exists():
            for name in (STUDY_FILE, *owned):
                entry = path / name
                if entry.is_dir():
                    shutil.rmtree(entry)
                elif entry.exists():
                    entry.unlink()
            log.info("--fresh: deleted the earlier search in %s", path)
        yield path


def open_study(path: Path, tune: TuneSettings, setup: Mapping[str, Any], grid: dict | None):
    """The study in ``path/study.db``, created or resumed.

    A study resumes only under the same `setup` (the space, the trials' base settings,
    the input...): otherwise its finished trials would mean something else.
    """
    import optuna

    storage = optuna.storages.RDBStorage(
        f"sqlite:///{path / STUDY_FILE}",
        engine_kwargs={"connect_args": {"timeout": 60}},
    )
    study = optuna.create_study(
        storage=storage,
        study_name=STUDY_NAME,
        direction="maximize",
        sampler=_sampler(tune, grid),
        pruner=_pruner(tune),
        load_if_exists=True,
    )
    before = study.user_attrs.get(SETUP_ATTR)
    if before is None:
        study.set_user_attr(SETUP_ATTR, dict(setup))
    elif before != setup:
        changed = sorted(k for k in set(before) | set(setup) if before.get(k) != setup.get(k))
        raise ConfigError(
            f"{path} holds a search run with other settings ({', '.join(changed)} differ): "
            "rerun the same command to resume it, add --fresh to start over, or choose "
            "another --output"
        )
    return study


def requeue_interrupted(study) -> int:
    """Trials that an interrupted search left unfinished (still running when it was
    killed, or stopped by Ctrl-C): queued again with the same parameters, once. A trial
    killed before the sampler gave it any parameters is only closed: its point was never
    taken, and the sampler draws it again. Returns how many are queued."""
    from optuna.trial import TrialState

    storage = study._storage
    requeued = set(study.user_attrs.get(REQUEUED_ATTR, []))
    stale = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.FAIL))
        if t.number not in requeued
        and (t.state == TrialState.RUNNING or t.user_attrs.get(INTERRUPTED_ATTR))
    ]
    queued = 0
    for trial in stale:
        if trial.state == TrialState.RUNNING:
            storage.set_trial_user_attr(trial._trial_id, INTERRUPTED_ATTR, True)
            storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        if "grid_id" in trial.system_attrs:
            # The grid sampler finds the point again from its grid id.
            study.enqueue_trial({})
            waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))[-1]
            for name in ("grid_id", "search_space"):
                storage.set_trial_system_attr(waiting._trial_id, name, trial.system_attrs[name])
        elif trial.params:
            study.enqueue_trial(dict(trial.params))
        else:
            continue  # killed before the sampler gave it a point: closed, drawn again
        queued += 1
    if stale:
        study.set_user_attr(REQUEUED_ATTR, sorted(requeued | {t.number for t in stale}))
    if queued:
        log.warning("%d trials of the interrupted search run again", queued)
    return queued


def counted_trials(study) -> int:
    """Trials that count towards ``tune.trials``: finished, pruned or failed (an
    interrupted trial does not: it runs again)."""
    from optuna.trial import TrialState

    ended = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    return sum(
        1
        for t in study.get_trials(deepcopy=False, states=ended)
        if not t.user_attrs.get(INTERRUPTED_ATTR)
    )


def _sampler(tune: TuneSettings, grid: dict | None):
    import optuna

    if tune.strategy == "grid":
        return optuna.samplers.GridSampler(grid, seed=tune.seed)
    if tune.strategy == "random":
        return optuna.samplers.RandomSampler(seed=tune.seed)
    return optuna.samplers.TPESampler(
        seed=tune.seed,
        # Few random trials first: a time budget of a few dozen trials is usual.
        n_startup_trials=min(6, max(2, tune.trials // 4)),
        multivariate=True,
        constant_liar=True,  # parallel trials: running ones count as mediocre, not unknown
    )


def _pruner(tune: TuneSettings):
    import optuna

    if tune.pruner == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=tune.prune_startup_trials, n_warmup_steps=tune.prune_warmup_epochs
        )
    if tune.pruner == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=max(1, tune.prune_warmup_epochs), reduction_factor=3
        )
    return optuna.pruners.NopPruner()


def quiet_optuna() -> None:
    """Optuna's own log lines through the pipeline's logging, warnings only (the search
    logs each trial itself)."""
    import optuna

    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
