"""The scoring stage: a verified model mapped over Arrow batches of validated features.

Its names are imported from their modules on first use (an executor task imports only
what it runs):

- `library`: `predict`, the model on a DataFrame of your own;
- `job`: the job's orchestration (`run_scoring`): read, score, quarantine, evaluate, publish;
- `inputs`: raw rows preprocessed as the model was trained, or an ingest output as it is;
- `plan`: the row-group plan that lets executors read an ingest output's files directly;
- `inference`: the driver half of inference (verified model, broadcast, ``mapInArrow``);
- `executor`: the Python-worker half, where a batch enters the model.
"""

from pipeline.lazy import exports

_MODULES = {
    "BroadcastModel": "inference",
    "RowGroupPlan": "plan",
    "ScoreResult": "job",
    "Source": "inputs",
    "arrow_batch_rows": "inference",
    "broadcast_model": "inference",
    "build_predictor": "executor",
    "features_matrix": "executor",
    "group_tasks": "plan",
    "ingested_source": "inputs",
    "plan_row_groups": "plan",
    "predict": "library",
    "predict_digits": "inference",
    "prediction_arrays": "executor",
    "prediction_schema": "inference",
    "raw_source": "inputs",
    "read_scoring_model": "inference",
    "read_source": "inputs",
    "read_verified_model": "inference",
    "run_scoring": "job",
    "score_row_groups": "inference",
    "scoring_preprocessing": "inputs",
    "task_cpus": "inference",
    "translate_task_errors": "job",
    "write_model_outputs": "job",
}
__all__ = sorted(_MODULES)
__getattr__, __dir__ = exports(__name__, _MODULES)
