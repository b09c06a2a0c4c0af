"""Every job refuses to write where it would destroy what it did not write (real job runs).

A refusal happens before Spark does any work: exit 2, the path and what it holds named,
and everything there left byte for byte as it was.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import Config
from pipeline.contract import LABEL, PREDICTION, ROW_ID
from pipeline.errors import OutputPathError
from tests import faults

NOTES = b"my own notes, not the pipeline's\n"


def _tree(root: Path) -> dict[str, str]:
    """Every file under `root` (hidden ones included) with the sha256 of its bytes."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _user_dir(path: Path) -> Path:
    (path / "sub").mkdir(parents=True)
    (path / "keep.txt").write_bytes(NOTES)
    (path / "sub" / "data.bin").write_bytes(bytes(range(256)))
    return path


def _ingest(spark, raw, out):
    from pipeline.ingest import run_ingest

    return run_ingest(spark, Config(), str(raw), str(out))


def _generate(spark, raw, out):
    from pipeline.generate import run_generate

    return run_generate(spark, Config(), 10, str(out), layout="array")


def _train(spark, features, out):
    from pipeline.training import run_training

    return run_training(spark, Config(), features, str(out))


def _score(spark, features, out, model):
    from pipeline.scoring import run_scoring

    return run_scoring(spark, Config(), features, model, str(out))


def _tune(spark, features, out):
    from pipeline.tuning import run_tuning

    return run_tuning(spark, Config(), features, str(out))


def _evaluate(spark, features, out):
    from pipeline.evaluation import run_evaluation

    return run_evaluation(spark, Config(), str(out))


JOBS = {
    "ingest": _ingest,
    "generate": _generate,
    "train": _train,
    "score": _score,
    "tune": _tune,
    "evaluate": _evaluate,
}


@pytest.mark.parametrize("job", list(JOBS))
def test_a_foreign_directory_survives_every_job(
    spark, tmp_path, job, sample_file, ingested_sample, trained_model_dir
):
    out = _user_dir(tmp_path / "mine")
    before = _tree(tmp_path)
    source = sample_file if job == "ingest" else ingested_sample
    run = JOBS[job]
    args = (trained_model_dir,) if job == "score" else ()
    with pytest.raises(
        OutputPathError,
        match=r"holds 2 entries this pipeline did not write, "
        r"e\.g\. keep\.txt, sub/",
    ) as refused:
        run(spark, source, out, *args)
    assert refused.value.exit_code == 2
    assert str(out) in str(refused.value)
    assert _tree(tmp_path) == before  # byte for byte, and nothing beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_a_file_at_the_output_path_stays_a_file(spark, tmp_path, sample_file):
    target = tmp_path / "features"
    target.write_bytes(NOTES)
    with pytest.raises(OutputPathError, match="is a file, not a directory"):
        _ingest(spark, sample_file, target)
    assert target.read_bytes() == NOTES


def test_outputs_that_overlap_an_input_are_refused_and_the_input_kept(
    spark, tmp_path, sample_file, ingested_sample, trained_model_dir
):
    raw = tmp_path / "raw.parquet"
    raw.write_bytes(Path(sample_file).read_bytes())
    inputs = {"raw": _tree(tmp_path), "features": _tree(Path(ingested_sample))}
    models = _tree(Path(trained_model_dir))

    with pytest.raises(OutputPathError, match="is also --input"):
        _ingest(spark, raw, raw)  # a raw Parquet file named as its own output
    with pytest.raises(OutputPathError, match="contains --input"):
        _ingest(spark, raw, tmp_path)
    with pytest.raises(OutputPathError, match="is also --input"):
        _score(spark, ingested_sample, ingested_sample, trained_model_dir)
    with pytest.raises(OutputPathError, match="lies inside --input"):
        _score(spark, ingested_sample, f"{ingested_sample}/predictions", trained_model_dir)
    with pytest.raises(OutputPathError, match="is also --model-dir"):
        _score(spark, ingested_sample, trained_model_dir, trained_model_dir)
    with pytest.raises(OutputPathError, match="lies inside --input"):
        _train(spark, ingested_sample, f"{ingested_sample}/model")

    assert _tree(tmp_path) == inputs["raw"]
    assert _tree(Path(ingested_sample)) == inputs["features"]
    assert _tree(Path(trained_model_dir)) == models


def test_rerun_into_its_own_output_replaces_it(spark, tmp_path):
    from pipeline.generate import run_generate

    out = tmp_path / "raw"
    run_generate(spark, Config(), 10, str(out), layout="array", seed=1)
    run_generate(spark, Config(), 12, str(out), layout="array", seed=2)
    assert pq.read_table(out).num_rows == 12
    assert json.loads((out / "_generate.json").read_text())["seed"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]  # no staging left


def test_predictions_of_an_id_less_input_join_back_one_to_one(
    spark, tmp_path, sample_file, sample_pixels, trained_model_dir
):
    from pipeline.ingest import run_ingest
    from pipeline.scoring import run_scoring

    raw = tmp_path / "raw.parquet"
    pq.write_table(pq.read_table(sample_file).slice(5000, 300), raw)  # image, label: no id
    features = tmp_path / "features"
    run_ingest(spark, Config(), str(raw), str(features))
    result = run_scoring(spark, Config(), str(features), trained_model_dir, str(tmp_path / "p"))
    predictions = pq.read_table(result.output.removeprefix("file:")).to_pandas()

    assert ROW_ID in predictions.columns
    assert sorted(predictions[ROW_ID]) == list(range(300))  # one prediction per input row
    # A one-file input: row_id is the row's position in it.
    rows = pa.table({ROW_ID: np.arange(300), "true": sample_pixels[1][5000:5300]}).to_pandas()
    joined = predictions.merge(rows, on=ROW_ID, how="inner", validate="one_to_one")
    assert len(joined) == 300
    assert (joined[LABEL] == joined["true"]).all()
    assert (joined[PREDICTION] == joined[LABEL]).mean() > 0.8


def _submit(job: str, *args: str, cwd: Path) -> tuple[int, str]:
    process = faults.submit(job, *args, master="local[1]", cwd=cwd)
    output, _ = process.communicate(timeout=300)
    return process.returncode, output


@pytest.mark.slow
def test_spark_submit_output_dot_is_refused(tmp_path, sample_file):
    work = _user_dir(tmp_path / "project")
    before = _tree(work)
    code, output = _submit("ingest.py", "--input", sample_file, "--output", ".", cwd=work)
    assert code == 2, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert "--output . is the current directory" in errors[0]
    assert "Traceback" not in output
    assert _tree(work) == before


@pytest.mark.slow
def test_spark_submit_train_keeps_a_folder_of_notes(tmp_path, ingested_sample):
    model = _user_dir(tmp_path / "model")
    before = _tree(tmp_path)
    code, output = _submit(
        "train.py", "--input", ingested_sample, "--model-dir", str(model), cwd=tmp_path
    )
    assert code == 2, output[-3000:]
    assert "holds 2 entries this pipeline did not write, e.g. keep.txt, sub/" in output
    assert _tree(tmp_path) == before
