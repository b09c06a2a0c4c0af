"""Structure search: the space (pure), the study directory, the decision rule, and small
searches end to end (pruning, confirmation, resuming after a kill, best.yaml)."""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path

import pytest
import yaml

from pipeline.config import Config, TrainSettings, TuneSettings, load_config
from pipeline.errors import ConfigError, InputDataError, OutputPathError, TrainingError
from pipeline.tracking import record_tuning
from pipeline.tuning import (
    BEST_FILE,
    PLOT_FILE,
    RESULTS_MD,
    RESULTS_PARQUET,
    STUDY_FILE,
    TRIALS_DIR,
    Confirmation,
    Trial,
    best_config_yaml,
    choose,
    reference_trial,
    run_tuning,
    trial_settings,
)
from pipeline.tuning.confirm import confirmation_seeds
from pipeline.tuning.space import grid_choices, suggest, trial_base
from tests.faults import (
    REPO,
    break_trials,
    kill_process_group,
    run_in_process,
    submit,
    wait_for,
)
from tests.mlflow_runs import read_back_run, tracking_settings

CONF_DIR = REPO / "conf"


# -- the space ------------------------------------------------------------------------------
def test_the_documented_space_file_is_the_default_space():
    documented = load_config(files=[CONF_DIR / "search-space.yaml"]).tune.space
    assert documented == TuneSettings().space
    # and the default space is good for digits: wide layers, real dropout, augmentation
    # in every trial, a decaying learning rate; pruning waits for slow starters
    space = TuneSettings().space
    assert min(units[0] for units in space["hidden_units"]) >= 256
    assert space["dropout"].low >= 0.1 and space["dropout"].high >= 0.3
    assert space["augment.enabled"] == [True] and space["decay"].low > 0
    assert TuneSettings().prune_warmup_epochs >= 10


def test_suggest_decodes_list_candidates_and_draws_ranges():
    import optuna

    space = TuneSettings(
        space={
            "hidden_units": [[64], [128, 64]],
            "learning_rate": {"low": 0.001, "high": 0.1, "log": True},
            "batch_size": {"low": 16, "high": 128, "step": 16},
        }
    ).space
    labels = grid_choices({"hidden_units": space["hidden_units"]})["hidden_units"]
    fixed = optuna.trial.FixedTrial(
        {"hidden_units": labels[1], "learning_rate": 0.02, "batch_size": 48}
    )
    params = suggest(fixed, space)
    assert params == {"hidden_units": [128, 64], "learning_rate": 0.02, "batch_size": 48}
    assert isinstance(params["batch_size"], int)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    drawn = [suggest(study.ask(), space) for _ in range(20)]
    assert all(0.001 <= p["learning_rate"] <= 0.1 for p in drawn)
    assert {p["batch_size"] % 16 for p in drawn} == {0}
    assert len({p["learning_rate"] for p in drawn}) == 20


def test_trials_are_one_worker_with_validation_and_early_stopping():
    tune = TuneSettings(epochs=3)
    train = TrainSettings(workers=4, validation_path="elsewhere")
    settings = trial_settings(trial_base(train, tune), {"dropout": 0.3, "augment.enabled": True})
    assert (settings.workers, settings.epochs, settings.validation_path) == (1, 3, None)
    assert settings.validation_fraction == tune.validation_fraction
    assert settings.early_stopping == tune.early_stopping
    assert settings.dropout == 0.3 and settings.augment.enabled  # a nested setting
    reference = reference_trial(train, tune)
    assert reference.reference and reference.name == "ref" and reference.params == {}
    assert reference.settings.hidden_units == train.hidden_units


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ("tune.space={hidden_unitz: [[32]]}", ["tune.space.hidden_unitz", "hidden_units"]),
        ("tune.space={workers: [1, 2]}", ["tune.space.workers"]),
        ("tune.space={seed: [1, 2]}", ["tune.space.seed"]),
        ("tune.space={early_stopping.patience: [1, 2]}", ["tune.space.early_stopping"]),
        ("tune.space={augment.max_spin: [1, 2]}", ["tune.space.augment.max_spin"]),
        ("tune.space={learning_rate: [0.01, -1]}", ["tune.space.learning_rate", "-1"]),
        ("tune.space={activation: [relu, swoosh]}", ["tune.space.activation", "swoosh"]),
        ("tune.space={hidden_units: [[]]}", ["tune.space.hidden_units"]),
        ("tune.space={dropout: []}", ["tune.space.dropout", "no candidate"]),
        ("tune.space={dropout: {low: 0.5, high: 0.1}}", ["tune.space.dropout", "below high"]),
        ("tune.space={dropout: {low: 0.0, high: 1.5}}", ["tune.space.dropout", "1.5"]),
        ("tune.space={l2: {low: 0, high: 0.1, log: true}}", ["low > 0"]),
        ("tune.space={activation: {low: 0, high: 1}}", ["tune.space.activation"]),
        ("tune.strategy=bayes", ["tune.strategy"]),
        ("tune.confirm_seeds=1", ["tune.confirm_seeds"]),
    ],
)
def test_invalid_spaces_fail_at_load_naming_the_key(override, names):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[override])
    for name in names:
        assert name in str(info.value)


def test_grid_needs_candidate_lists():
    with pytest.raises(ConfigError, match="grid needs candidate lists; dropout"):
        load_config(overrides=["tune.strategy=grid", "tune.space={dropout: {low: 0, high: 0.5}}"])


def test_space_candidates_are_coerced_and_deduplicated():
    config = load_config(overrides=["tune.space={learning_rate: ['0.05', 0.05, 0.1]}"])
    assert config.tune.space == {"learning_rate": [0.05, 0.1]}


def test_a_later_layer_replaces_the_space_whole(tmp_path):
    conf = tmp_path / "search.yaml"
    conf.write_text("tune:\n  space:\n    batch_size: [32, 64]\n")
    assert load_config(files=[conf]).tune.space == {"batch_size": [32, 64]}


# -- confirmation: the decision -------------------------------------------------------------
def _confirmed(accuracies, reference=False, number=1) -> Confirmation:
    settings = TrainSettings(hidden_units=[32] if reference else [256])
    trial = Trial(-1 if reference else number, {}, settings, reference=reference)
    seeds = tuple(range(43, 43 + len(accuracies)))
    return Confirmation(trial, seeds, tuple(accuracies), (5,) * len(accuracies))


def test_a_winner_must_beat_the_reference_by_more_than_the_noise():
    reference = _confirmed([0.920, 0.925, 0.915], reference=True)  # 0.920 ± 0.005
    clear = _confirmed([0.950, 0.955, 0.945], number=4)  # 0.950 ± 0.005
    noisy = _confirmed([0.960, 0.900, 0.930], number=7)  # 0.930 ± 0.030
    winner, reason = choose([noisy, clear], reference)
    assert winner is clear and "best.yaml names trial 004" in reason
    assert "margin +0.0300, noise 0.0100" in reason
    winner, reason = choose([noisy], reference)
    assert winner is None and "within the noise: best.yaml keeps the reference" in reason
    # the best mean is judged, not the one that would pass
    better_but_noisy = _confirmed([0.990, 0.900, 0.990], number=9)
    assert choose([clear, better_but_noisy], reference)[0] is None
    # one seed shows no spread: not enough to name a winner
    assert choose([_confirmed([0.99], number=2)], reference)[0] is None
    assert choose([clear], _confirmed([0.92], reference=True))[0] is None


def test_confirmation_seeds_never_repeat_the_search_seed():
    assert confirmation_seeds(42, 3) == [43, 44, 45]


def test_the_budget_left_decides_how_many_top_trials_are_confirmed():
    from pipeline.tuning.search import _confirmable

    tune = TuneSettings(confirm_top=3, confirm_seeds=3)
    durations = {0: 100.0, 4: 200.0, 7: 300.0, 9: 50.0}  # the reference runs as long as 009
    # three seeds each, two at a time: (200 + 50) * 3 / 2 = 375 s for the best alone,
    # (200 + 100 + 50) * 3 / 2 = 525 s with the second, 975 s with all three
    assert _confirmable(durations, [4, 0, 7], tune, 2, math.inf) == 3
    assert _confirmable(durations, [4, 0, 7], tune, 2, 975.0) == 3
    assert _confirmable(durations, [4, 0, 7], tune, 2, 974.0) == 2
    assert _confirmable(durations, [4, 0, 7], tune, 2, 525.0) == 2
    assert _confirmable(durations, [4, 0, 7], tune, 2, 400.0) == 1
    assert _confirmable(durations, [4, 0, 7], tune, 2, -60.0) == 1  # the best, always


def test_best_yaml_trains_the_winner_on_all_the_data_and_loads_unchanged(tmp_path):
    from types import SimpleNamespace

    config = load_config(CONF_DIR, overrides=["train.workers=2", "tune.final_epochs=null"])
    base = trial_base(config.train, config.tune)
    settings = trial_settings(base, {"hidden_units": [512], "dropout": 0.25})
    winner = Confirmation(Trial(3, {}, settings), (43, 44, 45), (0.95, 0.96, 0.95), (12, 20, 17))
    reference = _confirmed([0.92, 0.93], reference=True)
    result = SimpleNamespace(
        output="file:/x/tune", winner=winner, decision="trial 003 wins", confirmations=[]
    )
    best = tmp_path / BEST_FILE
    best.write_text(best_config_yaml(result, config))
    assert set(yaml.safe_load(best.read_text())) == {"train"}
    loaded = load_config(CONF_DIR, [best]).train  # the train job's own layering
    expected = settings.model_copy(
        update={
            "workers": 2,
            "validation_fraction": 0.0,
            "validation_path": None,
            "include_validation_split": True,  # a split ingest output's validation rows too
            "early_stopping": config.train.early_stopping,
            "epochs": 17,  # the median epoch the confirmation runs kept
        }
    )
    assert loaded == expected
    assert not settings.include_validation_split  # the trials never train on them
    default = load_config(CONF_DIR, overrides=["train.workers=2"])
    best.write_text(best_config_yaml(result, default))
    assert load_config(CONF_DIR, [best]).train.epochs == default.tune.final_epochs == 60
    assert "60 epochs (tune.final_epochs; its\n# confirmation runs kept epoch 17)" in (
        best.read_text()
    )
    kept = SimpleNamespace(
        output="file:/x", winner=None, decision="kept", confirmations=[reference]
    )
    best.write_text(best_config_yaml(kept, config))
    assert load_config(CONF_DIR, [best]).train == config.train
    assert "# Decision: kept." in best.read_text()


# -- the search directory -------------------------------------------------------------------
def test_a_directory_the_search_did_not_write_is_refused(spark, tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(OutputPathError, match=r"notes\.txt"):
        run_tuning(spark, Config(), str(tmp_path / "features"), str(foreign), fresh=True)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_a_missing_input_stops_the_search_before_any_trial(spark, tmp_path):
    output = tmp_path / "tune"
    with pytest.raises(InputDataError, match="input not found"):
        run_tuning(spark, Config(), str(tmp_path / "no-features"), str(output))
    assert not output.exists()  # no study, no trial, nothing written


def test_parallelism_is_capped_by_free_slots_and_trials(spark):
    from pipeline.tuning.search import _parallelism

    wanted, notes = _parallelism(spark, TuneSettings(parallelism=5))
    assert wanted == 2  # local[2], nothing else running
    assert "tune.parallelism 5 capped to 2" in notes[0]
    assert _parallelism(spark, TuneSettings()) == (2, [])
    assert _parallelism(spark, TuneSettings(trials=1)) == (1, [])


# -- small searches end to end --------------------------------------------------------------
def _small(**tune) -> Config:
    return Config().with_overrides({"tune": {"confirm_top": 2, "confirm_seeds": 2, **tune}})


@pytest.mark.slow
def test_search_prunes_confirms_reports_and_is_tracked(
    spark, ingested_sample, tmp_path, monkeypatch
):
    # The grid sampler's seeded order (tune.seed 0): 000 takes lr 0.02 and learns, 001
    # takes 1e-05 and barely moves (pruned against 000), 002 takes 0.05 and fails.
    config = _small(
        strategy="grid",
        space={"learning_rate": [0.05, 0.00001, 0.02]},
        epochs=12,
        early_stopping={"enabled": False},
        pruner="median",
        prune_startup_trials=1,
        prune_warmup_epochs=1,
        parallelism=1,
    ).with_overrides({"tracking": tracking_settings(tmp_path, "tune-test")})
    break_trials(monkeypatch, "002")
    output = tmp_path / "tune"
    result = run_tuning(spark, config, ingested_sample, str(output))

    by_name = {r.trial.name: r for r in result.results}
    rates = [by_name[n].trial.params["learning_rate"] for n in ("000", "001", "002")]
    assert rates == [0.02, 0.00001, 0.05]
    assert [by_name[n].status for n in ("000", "001", "002")] == ["ok", "pruned", "failed"]
    finished, pruned, failed = by_name["000"], by_name["001"], by_name["002"]
    assert finished.epochs_run == 12 and 0.8 < finished.val_accuracy <= 1
    assert 1 <= pruned.epochs_run < 12  # stopped early, not after its 12 epochs
    assert pruned.val_accuracy < finished.val_accuracy
    assert not (output / TRIALS_DIR / "001").exists()  # no model, no checkpoints left
    assert (output / TRIALS_DIR / "000" / "model.keras").is_file()
    assert not (output / TRIALS_DIR / "000" / "checkpoints").exists()
    assert failed.error_type == "InputDataError" and failed.error

    # confirmation: the one finished trial and the reference, two new seeds each
    assert {c.trial.name for c in result.confirmations} == {"000", "ref"}
    for c in result.confirmations:
        assert c.seeds == (43, 44) and len(c.accuracies) == 2 and not c.errors
        assert all(0.5 < a <= 1 for a in c.accuracies) and c.std >= 0
    assert [c.mean for c in result.confirmations] == sorted(
        (c.mean for c in result.confirmations), reverse=True
    )
    assert any(len(set(c.accuracies)) == 2 for c in result.confirmations)  # seeds differ
    reference = result.reference
    assert reference.trial.settings.hidden_units == [32]
    confirmed = next(c for c in result.confirmations if c.trial.name == "000")
    beats = confirmed.mean - reference.mean > confirmed.std + reference.std
    assert (result.winner is confirmed) == beats
    # the runs are kept in the study, not as models
    assert not (output / "confirm").exists()
    with sqlite3.connect(output / STUDY_FILE) as db:
        keys = {k for (k,) in db.execute("select key from study_user_attributes")}
    assert {"confirm 000 seed 43", "confirm ref seed 44"} <= keys

    table = spark.read.parquet(str(output / RESULTS_PARQUET)).orderBy("rank").collect()
    assert [row["trial"] for row in table] == [0, 1, 2]
    assert [row["status"] for row in table] == ["ok", "pruned", "failed"]
    assert table[0]["confirmed_mean"] == pytest.approx(confirmed.mean)
    assert table[1]["confirmed_mean"] is None
    markdown = (output / RESULTS_MD).read_text()
    assert f"{confirmed.mean:.4f} ± {confirmed.std:.4f}" in markdown
    assert f"{reference.mean:.4f} ± {reference.std:.4f}" in markdown
    assert f"Decision: {result.decision}." in markdown
    png = (output / PLOT_FILE).read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 2000

    loaded = load_config(CONF_DIR, [output / BEST_FILE]).train
    if result.winner is None:
        assert loaded == config.train
    else:
        assert loaded.learning_rate == 0.02 and loaded.validation_fraction == 0.0
        assert loaded.epochs == config.tune.final_epochs
    assert not list(tmp_path.glob(".tune.staging-*"))

    # MLflow: one parent run for the search, a nested run per trial, read back as a user's
    # script would.
    parent_id = record_tuning(spark, config.tracking, result, config)
    parent = read_back_run(config.tracking.uri, parent_id, tmp_path)
    assert parent["experiment"] == "tune-test"
    assert parent["params"]["tune.strategy"] == "grid"
    assert parent["metrics"]["trials"] == 3 and parent["metrics"]["failed_trials"] == 1
    assert parent["metrics"]["best_val_accuracy"] == pytest.approx(result.best.val_accuracy)
    assert set(parent["artifacts"]) == {RESULTS_MD, PLOT_FILE, BEST_FILE}
    children = {child["name"]: child for child in parent["children"]}
    assert sorted(children) == ["trial 000", "trial 001", "trial 002"]
    assert children["trial 001"]["status"] == "KILLED"  # pruned
    assert children["trial 002"]["status"] == "FAILED"
    assert children["trial 002"]["tags"]["error_type"] == "InputDataError"
    for trial in (finished, pruned):
        child = children[f"trial {trial.trial.number:03d}"]
        assert child["params"]["train.workers"] == "1"
        steps = [step for step, _ in child["history"]["val_accuracy"]]
        assert steps == list(range(1, trial.epochs_run + 1))
        # the kept (judged) epoch's figures, and the last epoch's beside them
        assert child["metrics"]["judged_val_accuracy"] == pytest.approx(trial.val_accuracy)
        assert child["metrics"]["judged_epoch"] == trial.epoch
        last = trial.history[-1]["val_accuracy"]
        assert child["metrics"]["last_epoch_val_accuracy"] == pytest.approx(last)
        assert "final_val_accuracy" not in child["metrics"]
    assert children["trial 000"]["status"] == "FINISHED"


@pytest.mark.slow
def test_search_fails_only_when_no_trial_finished(spark, ingested_sample, tmp_path, monkeypatch):
    config = _small(strategy="grid", epochs=1, space={"hidden_units": [[32]]})
    output = tmp_path / "tune"
    break_trials(monkeypatch, "000")
    with pytest.raises(TrainingError, match="no trial of the search finished"):
        run_tuning(spark, config, ingested_sample, str(output))
    # the table of errors is still written, with no best configuration
    assert "InputDataError" in (output / RESULTS_MD).read_text()
    assert not (output / BEST_FILE).exists()


@pytest.mark.parametrize("strategy", ["grid", "random"])
def test_a_trial_killed_before_it_had_parameters_is_closed_and_its_point_drawn_again(
    tmp_path, strategy
):
    """A search killed right after Optuna created a trial, before the sampler gave it a
    point: the resumed search closes it (it is not queued with no parameters, which the
    grid sampler refuses) and every point of the grid still runs once."""
    import optuna

    from pipeline.tuning.study import counted_trials, open_study, requeue_interrupted

    tune = TuneSettings(strategy=strategy, space={"hidden_units": [[16], [32], [24]]})
    grid = grid_choices(tune.space) if strategy == "grid" else None
    study = open_study(tmp_path, tune, {"k": 1}, grid)

    def objective(trial):
        return float(len(suggest(trial, tune.space)["hidden_units"]))

    study.optimize(objective, n_trials=1)
    storage = study._storage
    storage.create_new_trial(study._study_id)  # created, then the process died
    study = open_study(tmp_path, tune, {"k": 1}, grid)
    assert requeue_interrupted(study) == 0
    assert requeue_interrupted(study) == 0  # once closed, left alone
    study.optimize(objective, n_trials=2)
    states = [t.state for t in study.get_trials(deepcopy=False)]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 3 and counted_trials(study) == 3
    if strategy == "grid":
        done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        assert sorted(str(t.params["hidden_units"]) for t in done) == ["[16]", "[24]", "[32]"]


def _study_trials(path: Path) -> list[tuple[int, str, str | None]]:
    """(number, state, datetime_complete) of the trials in a study file."""
    if not path.exists():
        return []
    with sqlite3.connect(path) as db:
        try:
            rows = db.execute("select number, state, datetime_complete from trials").fetchall()
        except sqlite3.OperationalError:  # the tables are not made yet
            return []
    return sorted(rows)


@pytest.mark.slow
def test_killed_search_resumes_then_train_job_takes_best_yaml(
    spark, ingested_sample, tmp_path, capsys
):
    """spark-submit jobs/tune.py, killed after its first trial; the same command (run in
    this process) resumes the study and keeps the finished trial; then jobs/train.py
    --conf TUNE_DIR/best.yaml."""
    tune_dir = tmp_path / "tune"
    mlruns = (tmp_path / "mlruns").as_uri()
    args = [
        "--input",
        ingested_sample,
        "--output",
        str(tune_dir),
        "--set",
        "tune.strategy=grid",
        "--set",
        "tune.space={hidden_units: [[16], [32], [24]]}",
        "--set",
        "tune.epochs=2",
        "--set",
        "tune.parallelism=1",
        "--set",
        "tune.confirm_top=1",
        "--set",
        "tune.confirm_seeds=2",
        "--set",
        "tracking.enabled=true",
        "--set",
        f"tracking.uri={mlruns}",
    ]
    study = tune_dir / STUDY_FILE
    job = submit("tune.py", *args, master="local[2]", cwd=tmp_path)
    try:
        wait_for(
            lambda: any(state == "COMPLETE" for _, state, _ in _study_trials(study)),
            timeout=400,
            what="the first finished trial",
            job=job,
        )
    finally:
        kill_process_group(job)
    before = [t for t in _study_trials(study) if t[1] == "COMPLETE"]
    assert before and len(before) < 3

    capsys.readouterr()
    assert run_in_process("tune.py", *args) == 0
    resumed = capsys.readouterr()
    after = _study_trials(study)
    for trial in before:
        assert trial in after  # same number, state and completion time: not trained again
    with sqlite3.connect(study) as db:
        params = db.execute(
            "select t.number, p.param_value from trials t join trial_params p "
            "on t.trial_id = p.trial_id where t.state = 'COMPLETE'"
        ).fetchall()
    assert len(params) == 3 and len({value for _, value in params}) == 3  # each point once
    assert "confirmation" in resumed.out and "best.yaml" in resumed.out
    assert list((tmp_path / "mlruns").rglob("results.md")), "the tune run was not recorded"

    model_dir = str(tmp_path / "model")
    conf = str(tune_dir / BEST_FILE)
    assert run_in_process("train.py", "--input", ingested_sample, "--model-dir", model_dir,
                          "--conf", conf) == 0  # fmt: skip
    metadata = json.loads((tmp_path / "model" / "metadata.json").read_text())
    best = load_config(CONF_DIR, [tune_dir / BEST_FILE]).train
    assert TrainSettings.model_validate(metadata["train"]) == best
    assert not math.isnan(metadata["history"][-1]["loss"])
