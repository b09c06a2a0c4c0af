"""Structure search: space expansion and validation (pure), and a small search end to end."""

from __future__ import annotations

import math

import pytest
import yaml

from pipeline.config import Config, TrainSettings, TuneSettings, load_config
from pipeline.errors import ConfigError
from pipeline.tuning import (
    BEST_FILE,
    PLOT_FILE,
    RESULTS_MD,
    RESULTS_PARQUET,
    TRIALS_DIR,
    grid,
    plan_trials,
    run_tuning,
    sample,
)
from tests.faults import break_trials

SPACE = {"hidden_units": [[32], [64], [64, 32]], "learning_rate": [0.01, 0.05], "dropout": [0.0]}


# -- the space ------------------------------------------------------------------------------
def test_grid_is_the_full_product_in_order():
    combos = grid(SPACE)
    assert len(combos) == 3 * 2 * 1
    assert combos[0] == {"hidden_units": [32], "learning_rate": 0.01, "dropout": 0.0}
    assert combos[-1] == {"hidden_units": [64, 32], "learning_rate": 0.05, "dropout": 0.0}
    assert len({repr(c) for c in combos}) == len(combos)


def test_sample_is_seeded_and_without_replacement():
    first = sample(SPACE, 4, seed=1)
    assert first == sample(SPACE, 4, seed=1)
    assert len({repr(c) for c in first}) == 4
    assert all(c in grid(SPACE) for c in first)
    # asking for more than the space holds gives the whole space once, in some order
    everything = sample(SPACE, 100, seed=3)
    assert sorted(map(repr, everything)) == sorted(map(repr, grid(SPACE)))
    assert any(sample(SPACE, 6, seed=s) != sample(SPACE, 6, seed=1) for s in range(2, 6))


def test_sample_of_a_huge_space_stays_distinct():
    space = {"batch_size": list(range(1, 1001)), "epochs": list(range(1, 1001))}
    drawn = sample(space, 50, seed=0)
    assert len({(c["batch_size"], c["epochs"]) for c in drawn}) == 50


def test_default_space_includes_the_reference_and_stays_small():
    tune = TuneSettings()
    reference = TrainSettings()
    for key, candidates in tune.space.items():
        assert getattr(reference, key) in candidates, key
    trials = plan_trials(reference, tune)
    assert len(trials) == tune.trials <= 10
    assert trials[0].reference and trials[0].params == {}
    assert trials[0].settings.hidden_units == [32] and trials[0].settings.activation == "relu"


def test_trials_are_one_worker_with_validation_and_early_stopping():
    tune = TuneSettings(space=SPACE, strategy="grid", epochs=3)
    train = TrainSettings(workers=4, validation_path="elsewhere")
    trials = plan_trials(train, tune)
    for trial in trials:
        s = trial.settings
        assert (s.workers, s.epochs, s.validation_path) == (1, 3, None)
        assert s.validation_fraction == tune.validation_fraction
        assert s.early_stopping.enabled
    # the reference ([32], lr 0.01, dropout 0) is in the grid: it is not trained twice
    assert len(trials) == 6
    assert len({t.settings.model_dump_json() for t in trials}) == len(trials)
    assert [t.number for t in trials] == list(range(len(trials)))


def test_combinations_train_settings_reject_together_are_skipped():
    space = {"hidden_units": [[32], [64, 32]], "activation": ["relu", ["relu", "tanh"]]}
    trials = plan_trials(TrainSettings(), TuneSettings(space=space, strategy="grid"))
    shapes = {(tuple(t.settings.hidden_units), str(t.settings.activation)) for t in trials}
    assert ((32,), "['relu', 'tanh']") not in shapes
    assert ((64, 32), "['relu', 'tanh']") in shapes


def test_random_budget_counts_the_reference():
    trials = plan_trials(TrainSettings(), TuneSettings(space=SPACE, trials=4, seed=7))
    assert len(trials) == 4 and trials[0].reference
    assert not any(t.reference for t in trials[1:])


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ("tune.space={hidden_unitz: [[32]]}", ["tune.space.hidden_unitz", "hidden_units"]),
        ("tune.space={workers: [1, 2]}", ["tune.space.workers"]),
        ("tune.space={seed: [1, 2]}", ["tune.space.seed"]),
        ("tune.space={learning_rate: [0.01, -1]}", ["tune.space.learning_rate", "-1"]),
        ("tune.space={activation: [relu, swoosh]}", ["tune.space.activation", "swoosh"]),
        ("tune.space={hidden_units: [[]]}", ["tune.space.hidden_units"]),
        ("tune.space={dropout: []}", ["tune.space.dropout", "no candidate"]),
        ("tune.strategy=bayes", ["tune.strategy"]),
    ],
)
def test_invalid_spaces_fail_at_load_naming_the_key(override, names):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[override])
    for name in names:
        assert name in str(info.value)


def test_space_candidates_are_coerced_and_deduplicated():
    config = load_config(overrides=["tune.space={learning_rate: ['0.05', 0.05, 0.1]}"])
    assert config.tune.space == {"learning_rate": [0.05, 0.1]}


def test_a_later_layer_replaces_the_space_whole(tmp_path):
    conf = tmp_path / "search.yaml"
    conf.write_text("tune:\n  space:\n    batch_size: [32, 64]\n")
    assert load_config(files=[conf]).tune.space == {"batch_size": [32, 64]}


def test_judged_epoch_is_the_one_training_restored():
    from types import SimpleNamespace

    from pipeline.tuning.search import _judged_epoch

    history = [{"epoch": float(e)} for e in (1, 2, 3, 4)]
    trial = plan_trials(TrainSettings(), TuneSettings(space={"dropout": [0.0]}))[0]

    def judged(**chief):
        return _judged_epoch(
            SimpleNamespace(fit=SimpleNamespace(workers=[chief]), history=history), trial
        )

    assert judged(stopped_early=True, best_epoch=2) == 2
    assert judged(stopped_early=False, best_epoch=2) == 4  # ran to the end: last weights
    no_restore = trial.settings.model_copy(
        update={
            "early_stopping": trial.settings.early_stopping.model_copy(
                update={"restore_best_weights": False}
            )
        }
    )
    trial = type(trial)(0, {}, no_restore, True)
    assert judged(stopped_early=True, best_epoch=2) == 4


def test_parallelism_is_capped_by_free_slots_and_trials(spark):
    from pipeline.tuning.search import _parallelism

    wanted, notes = _parallelism(spark, TuneSettings(parallelism=5), trials=8)
    assert wanted == 2  # local[2], nothing else running
    assert "tune.parallelism 5 capped to 2" in notes[0]
    assert _parallelism(spark, TuneSettings(), trials=8) == (2, [])
    assert _parallelism(spark, TuneSettings(), trials=1) == (1, [])


# -- end to end -----------------------------------------------------------------------------
@pytest.mark.slow
def test_small_search_writes_table_plot_and_best_conf(
    spark, ingested_sample, tmp_path, monkeypatch
):
    config = Config().with_overrides(
        {
            "tune": {
                "strategy": "grid",
                "epochs": 2,
                "parallelism": 2,
                "space": {"hidden_units": [[32], [64]], "learning_rate": [0.05]},
            }
        }
    )
    output = str(tmp_path / "tune")
    break_trials(monkeypatch, "001")  # it fails inside the real training run
    result = run_tuning(spark, config, ingested_sample, output)

    assert [r.trial.number for r in result.results][-1] == 1
    assert len(result.results) == 3
    failed = result.failed
    assert [r.trial.number for r in failed] == [1]
    assert failed[0].error and failed[0].error_type
    ok = [r for r in result.results if r.ok]
    assert len(ok) == 2
    for r in ok:
        assert 0.5 < r.val_accuracy <= 1 and math.isfinite(r.val_loss)
        assert 1 <= r.epoch <= r.epochs_run <= 2
        assert (tmp_path / "tune" / TRIALS_DIR / f"{r.trial.number:03d}" / "model.keras").is_file()
    assert ok[0].val_accuracy >= ok[1].val_accuracy
    best = result.best
    assert best is ok[0]

    table = spark.read.parquet(f"{output}/{RESULTS_PARQUET}").orderBy("rank").collect()
    assert [row["trial"] for row in table] == [r.trial.number for r in result.results]
    assert table[0]["val_accuracy"] == pytest.approx(best.val_accuracy)
    assert table[-1]["status"] == "failed" and table[-1]["error"] == failed[0].error
    assert table[-1]["error_type"] == failed[0].error_type
    assert {row["hidden_units"][0] for row in table} == {32, 64}

    markdown = (tmp_path / "tune" / RESULTS_MD).read_text()
    rows = [line for line in markdown.splitlines() if line.startswith("| ")][1:]
    assert len(rows) == 3
    assert rows[0].startswith(f"| 1 | {best.trial.number:03d}")
    assert f"{best.val_accuracy:.4f}" in rows[0]
    assert "failed" in rows[-1] and failed[0].error_type in rows[-1]

    png = (tmp_path / "tune" / PLOT_FILE).read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 2000

    best_file = tmp_path / "tune" / BEST_FILE
    assert set(yaml.safe_load(best_file.read_text())) == {"train"}
    assert load_config(files=[best_file]).train == best.trial.settings
    # the job's layering: the project's conf/ under it changes nothing
    from pathlib import Path

    conf_dir = Path(__file__).resolve().parent.parent / "conf"
    assert load_config(conf_dir, [best_file]).train == best.trial.settings
    assert not list(tmp_path.glob(".tune.staging-*"))


@pytest.mark.slow
def test_search_fails_only_when_every_trial_failed(spark, ingested_sample, tmp_path, monkeypatch):
    from pipeline.errors import TrainingError

    config = Config().with_overrides(
        {"tune": {"strategy": "grid", "epochs": 1, "space": {"hidden_units": [[32]]}}}
    )
    output = tmp_path / "tune"
    with pytest.raises(TrainingError, match="all 1 trials failed"):
        break_trials(monkeypatch, "000")
        run_tuning(spark, config, ingested_sample, str(output))
    # the table of errors is still published, with no best configuration
    assert (output / RESULTS_MD).is_file() and not (output / BEST_FILE).exists()


@pytest.mark.slow
def test_tune_job_then_train_job_with_best_conf(ingested_sample, tmp_path):
    """spark-submit jobs/tune.py (tracking on), then jobs/train.py --conf TUNE_DIR/best.yaml."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    submit = [str(Path(sys.executable).with_name("spark-submit")), "--master", "local[2]"]
    env = dict(os.environ, PYSPARK_PYTHON=sys.executable, TF_CPP_MIN_LOG_LEVEL="2")
    mlruns = (tmp_path / "mlruns").as_uri()
    tune_dir = tmp_path / "tune"
    tuned = subprocess.run(
        [
            *submit,
            str(repo / "jobs" / "tune.py"),
            "--input",
            ingested_sample,
            "--output",
            str(tune_dir),
            "--set",
            "tune.space={hidden_units: [[32], [16]]}",
            "--set",
            "tune.epochs=1",
            "--set",
            "tracking.enabled=true",
            "--set",
            f"tracking.uri={mlruns}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert tuned.returncode == 0, tuned.stderr[-3000:]
    assert "val_accuracy" in tuned.stdout and "best.yaml" in tuned.stdout
    assert (tune_dir / BEST_FILE).is_file() and (tune_dir / "trials" / "001").is_dir()
    assert list((tmp_path / "mlruns").rglob("results.md")), "the tune run was not recorded"

    trained = subprocess.run(
        [
            *submit,
            str(repo / "jobs" / "train.py"),
            "--input",
            ingested_sample,
            "--model-dir",
            str(tmp_path / "model"),
            "--conf",
            str(tune_dir / BEST_FILE),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    metadata = yaml.safe_load((tmp_path / "model" / "metadata.json").read_text())
    best = load_config(files=[tune_dir / BEST_FILE]).train
    assert TrainSettings.model_validate(metadata["train"]) == best
