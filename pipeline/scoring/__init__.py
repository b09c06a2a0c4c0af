"""The scoring stage: a verified model mapped over Arrow batches of validated features.

- `library`: `predict`, the model on a DataFrame of your own;
- `job`: the job's orchestration (`run_scoring`): read, score, quarantine, evaluate, publish;
- `inputs`: raw rows preprocessed as the model was trained, or an ingest output as it is;
- `plan`: the row-group plan that lets executors read an ingest output's files directly;
- `inference`: the driver half of inference (verified model, broadcast, ``mapInArrow``);
- `executor`: the Python-worker half, where a batch enters the model.
"""

from pipeline.scoring.executor import build_predictor, features_matrix, prediction_arrays
from pipeline.scoring.inference import (
    BroadcastModel,
    arrow_batch_rows,
    broadcast_model,
    predict_digits,
    prediction_schema,
    read_scoring_model,
    read_verified_model,
    score_row_groups,
    task_cpus,
)
from pipeline.scoring.inputs import (
    Source,
    ingested_source,
    raw_source,
    read_source,
    scoring_preprocessing,
)
from pipeline.scoring.job import (
    ScoreResult,
    run_scoring,
    translate_task_errors,
    write_model_outputs,
)
from pipeline.scoring.library import predict
from pipeline.scoring.plan import RowGroupPlan, group_tasks, plan_row_groups

__all__ = [
    "BroadcastModel",
    "RowGroupPlan",
    "ScoreResult",
    "Source",
    "arrow_batch_rows",
    "broadcast_model",
    "build_predictor",
    "features_matrix",
    "group_tasks",
    "ingested_source",
    "plan_row_groups",
    "predict",
    "predict_digits",
    "prediction_arrays",
    "prediction_schema",
    "raw_source",
    "read_scoring_model",
    "read_source",
    "read_verified_model",
    "run_scoring",
    "score_row_groups",
    "scoring_preprocessing",
    "task_cpus",
    "translate_task_errors",
    "write_model_outputs",
]
