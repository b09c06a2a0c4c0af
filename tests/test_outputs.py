"""The output check and staged publishing, on local paths and their ``file:`` URIs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pipeline.errors import OutputPathError
from pipeline.outputs import (
    GENERATE,
    INGEST,
    MODEL,
    SCORE,
    TUNE,
    check_output,
    staged_output,
)
from pipeline.storage import Storage


@pytest.fixture(scope="module")
def storage(spark) -> Storage:
    return Storage(spark)


def _ingest_output(path: Path) -> Path:
    """What an ingest run leaves: data files, _SUCCESS, _rejected/, the report naming it."""
    (path / "_rejected").mkdir(parents=True)
    (path / "part-00000-abc.snappy.parquet").write_bytes(b"PAR1")
    (path / ".part-00000-abc.snappy.parquet.crc").write_bytes(b"")
    (path / "_SUCCESS").write_bytes(b"")
    (path / "_report.json").write_text(json.dumps({"status": "ok", "job": "ingest"}))
    return path


@pytest.mark.parametrize("kind", [INGEST, SCORE, GENERATE, MODEL, TUNE], ids=lambda k: k.job)
def test_absent_and_empty_directories_are_accepted(storage, tmp_path, kind):
    assert check_output(storage, str(tmp_path / "new"), kind) == f"file:{tmp_path}/new"
    (tmp_path / "empty").mkdir()
    check_output(storage, str(tmp_path / "empty"), kind)


def test_an_earlier_output_of_the_same_kind_is_accepted(storage, tmp_path):
    out = _ingest_output(tmp_path / "features")
    (tmp_path / ".features.staging-0123456789ab").mkdir()  # a killed run's leftovers
    check_output(storage, str(out), INGEST)


def test_only_this_outputs_stale_staging_is_cleared(storage, tmp_path):
    mine = [".out[1].staging-0123456789ab", ".out[1].staging-ba9876543210"]
    others = [".out1.staging-0123456789ab", ".other.staging-0123456789ab", "keep"]
    for name in mine + others:
        (tmp_path / name).mkdir()
    removed = storage.clear_stale_staging(str(tmp_path / "out[1]"))
    assert sorted(r.rsplit("/", 1)[1] for r in removed) == mine
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(others)


def test_foreign_entries_are_refused_and_named(storage, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    for name in ("keep.txt", "notes.md", "b.csv"):
        (out / name).write_text("mine")
    with pytest.raises(
        OutputPathError,
        match=r"holds 3 entries this pipeline did not write, "
        r"e\.g\. b\.csv, keep\.txt, notes\.md",
    ) as raised:
        check_output(storage, str(out), INGEST)
    assert raised.value.exit_code == 2


def test_a_foreign_file_inside_an_earlier_output_is_refused(storage, tmp_path):
    out = _ingest_output(tmp_path / "features")
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputPathError, match=r"holds 1 entry .* e\.g\. keep\.txt"):
        check_output(storage, str(out), INGEST)


def test_outputs_of_the_version_before_the_job_field_are_recognised(storage, tmp_path):
    out = _ingest_output(tmp_path / "features")
    legacy = {"status": "ok", "rows_in": 1, "pixel_max": 255, "preprocessing": {}}
    (out / "_report.json").write_text(json.dumps(legacy))
    check_output(storage, str(out), INGEST)
    with pytest.raises(OutputPathError, match="is an ingest output"):
        check_output(storage, str(out), SCORE)


def test_an_output_of_another_kind_is_refused(storage, tmp_path):
    out = _ingest_output(tmp_path / "features")
    with pytest.raises(OutputPathError, match="is an ingest output, not a scoring output"):
        check_output(storage, str(out), SCORE)
    with pytest.raises(OutputPathError, match="is an ingest output, not a model directory"):
        check_output(storage, str(out), MODEL, option="--model-dir")


def test_a_regular_file_is_refused(storage, tmp_path):
    target = tmp_path / "data.parquet"
    target.write_bytes(b"PAR1 user data")
    with pytest.raises(OutputPathError, match="is a file, not a directory"):
        check_output(storage, str(target), GENERATE)
    assert target.read_bytes() == b"PAR1 user data"


def test_model_dir_of_an_interrupted_run_is_accepted(storage, tmp_path):
    model = tmp_path / "model"
    (model / "checkpoints").mkdir(parents=True)
    (model / "checkpoints" / "epoch-0002.npz").write_bytes(b"x")
    (model / "logs").mkdir()
    check_output(storage, str(model), MODEL)
    (model / "checkpoints" / "mine.txt").write_text("mine")
    with pytest.raises(OutputPathError, match="holds 2 entries"):
        check_output(storage, str(model), MODEL)


@pytest.mark.parametrize(
    "output, source, relation",
    [
        ("raw.parquet", "raw.parquet", "is also"),
        ("data/out", "data", "lies inside"),
        ("data", "data/raw.parquet", "contains"),
    ],
)
def test_outputs_never_overlap_inputs(storage, tmp_path, output, source, relation):
    (tmp_path / "data").mkdir()
    with pytest.raises(OutputPathError, match=f"{relation} --input"):
        check_output(storage, str(tmp_path / output), INGEST, {"--input": str(tmp_path / source)})


def test_overlap_is_found_across_spellings_and_links(storage, tmp_path):
    (tmp_path / "features").mkdir()
    os.symlink(tmp_path / "features", tmp_path / "link")
    with pytest.raises(OutputPathError, match="is also --model-dir"):
        check_output(
            storage,
            f"file://{tmp_path}/features/",
            SCORE,
            {"--input": None, "--model-dir": str(tmp_path / "link")},
        )


def test_working_home_and_root_directories_are_refused(storage, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OutputPathError, match="is the current directory"):
        check_output(storage, ".", INGEST)
    with pytest.raises(OutputPathError, match="contains the current directory"):
        check_output(storage, "..", INGEST)
    with pytest.raises(OutputPathError, match="the home directory"):
        check_output(storage, os.path.expanduser("~"), INGEST)
    with pytest.raises(OutputPathError, match="root of its file system"):
        check_output(storage, "file:///", INGEST)


def test_staged_output_publishes_whole_and_cleans_up_on_error(storage, tmp_path):
    out = tmp_path / "gen"
    with staged_output(storage, str(out), GENERATE) as staging:
        storage.write_json(f"{staging}/_generate.json", {"job": "generate", "rows": 1})
        assert not out.exists()
    assert json.loads((out / "_generate.json").read_text())["rows"] == 1

    with pytest.raises(RuntimeError), staged_output(storage, str(out), GENERATE) as staging:
        storage.write_json(f"{staging}/_generate.json", {"job": "generate", "rows": 2})
        raise RuntimeError("the job failed")
    assert json.loads((out / "_generate.json").read_text())["rows"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gen"]  # no staging left


def test_staged_output_does_not_replace_what_appeared_while_it_ran(storage, tmp_path):
    out = tmp_path / "gen"
    with (
        pytest.raises(OutputPathError, match=r"keep\.txt"),
        staged_output(storage, str(out), GENERATE) as staging,
    ):
        storage.write_json(f"{staging}/_generate.json", {"job": "generate"})
        out.mkdir()
        (out / "keep.txt").write_text("written meanwhile")
    assert (out / "keep.txt").read_text() == "written meanwhile"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gen"]
