"""The training stage: the ingest output in, a published model directory out.

Where each part lives (the names below are imported from their modules on first use:
a worker process or an executor task imports only what it runs):

- `run` — `run_training`, the job's orchestration: read, check, train, publish
  ``MODEL/`` (``model.keras``, ``metadata.json``, ``history.png``) atomically;
- `inputs` — the training input on the driver: contract columns, validation rows, the
  data's description and fingerprint, the class check;
- `fit` — `fit_partitions`, the driver half of the barrier stage;
- `distributed` — task slots and the executor half of the barrier stage (spool, agree on
  the cluster, start the TensorFlow worker process);
- `progress` — both ends of the progress channel and the console's epoch line;
- `worker` — the TensorFlow worker process, step by step; `loop` — its compiled training
  loop; `data` — its rows, from the local spool to the tensor store;
- `checkpoints`, `stopping` — resume and early stopping.
"""

from pipeline.lazy import exports

_MODULES = {
    "FitResult": "fit",
    "TrainResult": "run",
    "check_classes": "inputs",
    "class_counts": "inputs",
    "describe_input": "inputs",
    "fit_partitions": "fit",
    "format_epoch": "progress",
    "prepare_training_data": "inputs",
    "run_training": "run",
}
__all__ = sorted(_MODULES)
__getattr__, __dir__ = exports(__name__, _MODULES)
