"""`spark-submit jobs/train.py` as a user runs it, on the ingested sample."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from pipeline.artifact import read_onnx_model, sha256_bytes
from pipeline.storage import Storage
from tests.faults import job_command, job_env, run_job

# Loaded by every Python process the job starts (PYTHONPATH); in the train job's driver it
# records at exit which of these modules that process imported.
_MODULES_PROBE = """
import atexit, json, os, sys
if sys.argv and sys.argv[0].endswith("train.py"):
    atexit.register(lambda: open(os.environ["DIGITS_MODULES_PROBE"], "w").write(json.dumps(
        {name: name in sys.modules for name in ("tensorflow", "keras", "onnxruntime")})))
"""


@pytest.mark.slow
def test_spark_submit_train_two_workers_on_the_sample(spark, tmp_path, ingested_sample):
    model_dir = tmp_path / "model"
    probe_dir, report = tmp_path / "probe", tmp_path / "modules.json"
    probe_dir.mkdir()
    (probe_dir / "sitecustomize.py").write_text(_MODULES_PROBE)
    path = os.pathsep.join(filter(None, [str(probe_dir), os.environ.get("PYTHONPATH")]))
    result = run_job(
        "train.py",
        "--input",
        ingested_sample,
        "--model-dir",
        str(model_dir),
        "--workers",
        "2",
        "--set",
        "train.epochs=4",
        "--set",
        "train.validation_fraction=0.2",
        cwd=tmp_path,
        env=job_env(PYTHONPATH=path, DIGITS_MODULES_PROBE=str(report)),
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    # The workers trained and exported the model; the driver scored the validation rows
    # with ONNX Runtime on the executors and never imported TensorFlow or Keras.
    imported = json.loads(report.read_text())
    assert imported == {"tensorflow": False, "keras": False, "onnxruntime": False}, imported
    epoch_lines = [line for line in output.splitlines() if "pipeline.training: epoch " in line]
    assert [line.split("epoch ")[1].split()[0] for line in epoch_lines] == [
        "1/4",
        "2/4",
        "3/4",
        "4/4",
    ]
    assert all("val_accuracy" in line and "samples/s" in line for line in epoch_lines)
    assert "epochs completed" in result.stdout and "val_accuracy" in result.stdout
    assert "oneDNN" not in output and "cuda" not in output.lower()  # TF noise stays out

    metadata = json.loads((model_dir / "metadata.json").read_text())
    assert metadata["workers"] == 2 and metadata["epochs_completed"] == 4
    # held-out digits: 20 % of the sample, never trained on
    assert metadata["history"][-1]["val_accuracy"] > 0.88
    for name in ("model.keras", "model.onnx", "history.png", "checkpoints"):
        assert (model_dir / name).exists()
    # exported by worker 0, verified on the driver and recorded in metadata.json
    verified, onnx_bytes = read_onnx_model(Storage(spark), str(model_dir))
    assert metadata["onnx_sha256"] == verified.onnx_sha256 == sha256_bytes(onnx_bytes)


@pytest.mark.slow
def test_two_training_jobs_on_one_host_at_once_neither_clash_nor_cross_talk(
    tmp_path, ingested_sample
):
    """Two spark-submit jobs, two workers each, started together: four gRPC servers on
    four ports, and each job's model is its own (its own seed, its own cluster)."""
    jobs = {}
    for seed in (1, 2):
        command = job_command(
            "train.py",
            "--input",
            ingested_sample,
            "--model-dir",
            str(tmp_path / f"model-{seed}"),
            "--workers",
            "2",
            "--set",
            "train.epochs=2",
            "--set",
            f"train.seed={seed}",
        )
        jobs[seed] = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=job_env(),
            cwd=tmp_path,
        )
    outputs = {seed: job.communicate(timeout=600)[0] for seed, job in jobs.items()}
    clusters = {}
    for seed, job in jobs.items():
        assert job.returncode == 0, outputs[seed][-3000:]
        lines = [line for line in outputs[seed].splitlines() if "TensorFlow cluster " in line]
        assert len(lines) == 1, outputs[seed][-3000:]
        clusters[seed] = set(lines[0].split("TensorFlow cluster ")[1].split(";")[0].split(", "))
    assert len(clusters[1]) == len(clusters[2]) == 2
    assert not clusters[1] & clusters[2]  # four distinct host:port pairs: no clash

    models = {}
    for seed in (1, 2):
        metadata = json.loads((tmp_path / f"model-{seed}" / "metadata.json").read_text())
        assert metadata["seed"] == seed and metadata["workers"] == 2
        # local SGD is the multi-worker default; the console names it and the other mode
        assert metadata["sync_mode"] == "local_sgd" and metadata["xla"] is True
        assert "train.sync=local_sgd (local SGD" in outputs[seed]
        assert "--set train.sync=exact for exact synchronous SGD" in outputs[seed]
        assert metadata["epochs_completed"] == 2
        assert metadata["history"][-1]["accuracy"] > 0.8
        models[seed] = metadata["model_sha256"]
    assert models[1] != models[2]
