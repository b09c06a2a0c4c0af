"""Structure search: trials of train settings trained in parallel, one Spark task each.

- `pipeline.tuning.space`: the search space as pure functions (grid, random samples,
  validated `Trial`s);
- `pipeline.tuning.search`: `run_tuning`, which trains the trials with the ordinary
  training code and ranks them;
- `pipeline.tuning.report`: what ``TUNE_DIR`` holds (``results.parquet``, ``results.md``,
  ``val_accuracy.png``, ``best.yaml``, ``trials/NNN/``).
"""

from pipeline.tuning.report import (
    BEST_FILE,
    PLOT_FILE,
    RESULTS_MD,
    RESULTS_PARQUET,
    TRIALS_DIR,
    best_config_yaml,
)
from pipeline.tuning.search import TrialResult, TuneResult, run_tuning
from pipeline.tuning.space import Trial, grid, plan_trials, sample

__all__ = [
    "BEST_FILE",
    "PLOT_FILE",
    "RESULTS_MD",
    "RESULTS_PARQUET",
    "TRIALS_DIR",
    "Trial",
    "TrialResult",
    "TuneResult",
    "best_config_yaml",
    "grid",
    "plan_trials",
    "run_tuning",
    "sample",
]
