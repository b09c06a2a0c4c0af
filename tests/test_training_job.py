"""`spark-submit jobs/train.py` as a user runs it, on the ingested sample."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from pipeline.artifact import read_onnx_model, sha256_bytes
from pipeline.storage import Storage
from tests.faults import job_command, job_env

# Two jobs started together, two workers each, with the default settings but a seed of
# their own; the first validates on a fifth of the sample and trains longer.
JOBS = {
    1: ["train.epochs=4", "train.validation_fraction=0.2", "train.seed=1"],
    2: ["train.epochs=2", "train.seed=2"],
}

# Loaded by every Python process the job starts (PYTHONPATH); in the train job's driver it
# records at exit which of these modules that process imported.
_MODULES_PROBE = """
import atexit, json, os, sys
if sys.argv and sys.argv[0].endswith("train.py"):
    atexit.register(lambda: open(os.environ["DIGITS_MODULES_PROBE"], "w").write(json.dumps(
        {name: name in sys.modules for name in ("tensorflow", "keras", "onnxruntime")})))
"""


@pytest.mark.slow
def test_two_spark_submit_train_jobs_at_once_each_train_its_own_model(
    spark, tmp_path, ingested_sample
):
    """Two spark-submit jobs on one host at once: four gRPC servers on four ports, each
    job's model its own (its own seed, its own cluster); the console shows one line per
    epoch and a summary, and none of TensorFlow's start-up noise; the driver never imports
    TensorFlow."""
    probe_dir, report = tmp_path / "probe", tmp_path / "modules.json"
    probe_dir.mkdir()
    (probe_dir / "sitecustomize.py").write_text(_MODULES_PROBE)
    path = os.pathsep.join(filter(None, [str(probe_dir), os.environ.get("PYTHONPATH")]))
    envs = {1: job_env(PYTHONPATH=path, DIGITS_MODULES_PROBE=str(report)), 2: job_env()}
    jobs = {}
    for seed, settings in JOBS.items():
        args = ["--input", ingested_sample, "--model-dir", str(tmp_path / f"model-{seed}")]
        args += ["--workers", "2"]
        for item in settings:
            args += ["--set", item]
        jobs[seed] = subprocess.Popen(
            job_command("train.py", *args),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=envs[seed],
            cwd=tmp_path,
        )
    streams = {seed: job.communicate(timeout=600) for seed, job in jobs.items()}
    outputs = {seed: out + err for seed, (out, err) in streams.items()}
    clusters = {}
    for seed, job in jobs.items():
        assert job.returncode == 0, outputs[seed][-3000:]
        lines = [line for line in outputs[seed].splitlines() if "TensorFlow cluster " in line]
        assert len(lines) == 1, outputs[seed][-3000:]
        clusters[seed] = set(lines[0].split("TensorFlow cluster ")[1].split(";")[0].split(", "))
    assert len(clusters[1]) == len(clusters[2]) == 2
    assert not clusters[1] & clusters[2]  # four distinct host:port pairs: no clash

    # The workers trained and exported the model; the driver scored the validation rows
    # with ONNX Runtime on the executors and never imported TensorFlow or Keras.
    imported = json.loads(report.read_text())
    assert imported == {"tensorflow": False, "keras": False, "onnxruntime": False}, imported
    # The console of the first job: one line per epoch, then the summary on stdout.
    output = outputs[1]
    epoch_lines = [line for line in output.splitlines() if "pipeline.training: epoch " in line]
    epochs = [line.split("epoch ")[1].split()[0] for line in epoch_lines]
    assert epochs == ["1/4", "2/4", "3/4", "4/4"]
    assert all("val_accuracy" in line and "samples/s" in line for line in epoch_lines)
    stdout = streams[1][0]
    assert "epochs completed" in stdout and "val_accuracy" in stdout
    for seed in JOBS:  # TF noise stays out
        assert "oneDNN" not in outputs[seed] and "cuda" not in outputs[seed].lower()

    models = {}
    for seed, epochs_asked in ((1, 4), (2, 2)):
        model_dir = tmp_path / f"model-{seed}"
        metadata = json.loads((model_dir / "metadata.json").read_text())
        assert metadata["seed"] == seed and metadata["workers"] == 2
        # local SGD is the multi-worker default; the console names it and the other mode
        assert metadata["sync_mode"] == "local_sgd" and metadata["xla"] is True
        assert "train.sync=local_sgd (local SGD" in outputs[seed]
        assert "--set train.sync=exact for exact synchronous SGD" in outputs[seed]
        assert metadata["epochs_completed"] == epochs_asked
        assert metadata["history"][-1]["accuracy"] > 0.8
        for name in ("model.keras", "model.onnx", "history.png", "checkpoints"):
            assert (model_dir / name).exists()
        # exported by worker 0, verified on the driver and recorded in metadata.json
        verified, onnx_bytes = read_onnx_model(Storage(spark), str(model_dir))
        assert metadata["onnx_sha256"] == verified.onnx_sha256 == sha256_bytes(onnx_bytes)
        models[seed] = metadata
    assert models[1]["model_sha256"] != models[2]["model_sha256"]
    # held-out digits: 20 % of the sample, never trained on
    assert models[1]["history"][-1]["val_accuracy"] > 0.88


@pytest.mark.slow
def test_a_one_worker_job_leaves_no_temporary_files(tmp_path, ingested_sample):
    """Everything the job's Python processes put in the temporary folder is gone at its end:
    TensorFlow's generated modules too, which its exit hooks delete and the worker, ending
    with os._exit, never runs."""
    temp = tmp_path / "temp"
    temp.mkdir()
    args = ["--input", ingested_sample, "--model-dir", str(tmp_path / "model"), "--workers", "1"]
    job = subprocess.run(
        job_command("train.py", *args, "--set", "train.epochs=1"),
        capture_output=True,
        text=True,
        env=job_env(TMPDIR=str(temp)),
        cwd=tmp_path,
        timeout=600,
        check=False,
    )
    assert job.returncode == 0, (job.stdout + job.stderr)[-3000:]
    assert (tmp_path / "model" / "model.keras").exists()
    assert sorted(p.name for p in temp.iterdir()) == []
