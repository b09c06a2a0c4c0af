"""Reading MLflow runs back as a user's script would: a plain MlflowClient in a fresh
interpreter with no MLFLOW_* variables (tests of train and tune tracking)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

# Run in a fresh interpreter with no MLFLOW_* variables: dump one run, its children,
# metric histories and artifacts as JSON, as any user's script would read them.
_READ_BACK = """
import hashlib, json, sys
from mlflow.tracking import MlflowClient

uri, run_id, download_to = sys.argv[1:4]
client = MlflowClient(tracking_uri=uri)

def files(run_id, path=None):
    found = []
    for item in client.list_artifacts(run_id, path):
        found += files(run_id, item.path) if item.is_dir else [item.path]
    return found

def dump(run):
    run_id = run.info.run_id
    return {
        "name": run.info.run_name,
        "status": run.info.status,
        "params": run.data.params,
        "tags": run.data.tags,
        "metrics": run.data.metrics,
        "history": {
            key: sorted([m.step, m.value] for m in client.get_metric_history(run_id, key))
            for key in run.data.metrics
        },
        "artifacts": sorted(files(run_id)),
    }

run = client.get_run(run_id)
doc = dump(run)
doc["experiment"] = client.get_experiment(run.info.experiment_id).name
children = client.search_runs(
    [run.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'"
)
doc["children"] = [dump(child) for child in children]
model_files = [path for path in doc["artifacts"] if path.startswith("model/")]
if model_files:
    doc["downloaded"] = model_files[0]
    local = client.download_artifacts(run_id, model_files[0], download_to)
    doc["downloaded_sha256"] = hashlib.sha256(open(local, "rb").read()).hexdigest()
print(json.dumps(doc))
"""


def tracking_settings(tmp_path: Path, experiment: str) -> dict:
    return {"enabled": True, "uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": experiment}


def read_back_run(uri: str, run_id: str, tmp_path: Path) -> dict:
    """The run as a plain MlflowClient sees it from a new process with no MLflow settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    download = tmp_path / "download"
    download.mkdir(exist_ok=True)
    result = subprocess.run(
        [sys.executable, "-c", _READ_BACK, uri, run_id, str(download)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])
