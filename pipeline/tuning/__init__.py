"""Structure search: an Optuna study of train settings, each trial a one-task Spark job of
the ordinary training code, its winner confirmed against the reference with several seeds.

- `pipeline.tuning.space`: the search space (pure: a sampled point -> train settings);
- `pipeline.tuning.study`: ``TUNE_DIR`` and the SQLite study in it (resume, ``--fresh``);
- `pipeline.tuning.runs`: one training run that the search can stop (pruning);
- `pipeline.tuning.search`: `run_tuning`, the search and its budget;
- `pipeline.tuning.confirm`: retraining the best trials with several seeds, the decision;
- `pipeline.tuning.report`: ``results.parquet``, ``results.md``, ``val_accuracy.png``,
  ``best.yaml``.
"""

from pipeline.tuning.confirm import Confirmation, choose
from pipeline.tuning.report import (
    BEST_FILE,
    PLOT_FILE,
    RESULTS_MD,
    RESULTS_PARQUET,
    TRIALS_DIR,
    best_config_yaml,
)
from pipeline.tuning.search import TrialResult, TuneResult, run_tuning
from pipeline.tuning.space import Trial, reference_trial, trial_base, trial_settings
from pipeline.tuning.study import STUDY_FILE

__all__ = [
    "BEST_FILE",
    "PLOT_FILE",
    "RESULTS_MD",
    "RESULTS_PARQUET",
    "STUDY_FILE",
    "TRIALS_DIR",
    "Confirmation",
    "Trial",
    "TrialResult",
    "TuneResult",
    "best_config_yaml",
    "choose",
    "reference_trial",
    "run_tuning",
    "trial_base",
    "trial_settings",
]
