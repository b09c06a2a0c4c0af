"""The config schema: layering, validation errors that name the key, the documented defaults."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.config import Config, load_config, parse_override, render_defaults
from pipeline.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def test_defaults_are_the_reference_model():
    train = Config().train
    assert train.hidden_units == [32]
    assert train.activations() == ["relu"]
    assert (train.learning_rate, train.decay, train.momentum, train.nesterov) == (
        0.01,
        1e-6,
        0.9,
        True,
    )
    assert (train.batch_size, train.epochs) == (32, 10)


def test_base_yaml_documents_exactly_the_defaults():
    text = (REPO / "conf" / "base.yaml").read_text()
    assert yaml.safe_load(text) == Config().model_dump(mode="json")
    assert text == render_defaults(), "regenerate it: make conf"


def test_layers_apply_in_order(tmp_path):
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    (conf_dir / "base.yaml").write_text("train:\n  epochs: 3\n  batch_size: 16\n")
    (conf_dir / "local.yaml").write_text("train:\n  epochs: 4\n")
    extra = tmp_path / "extra.yaml"
    extra.write_text("train:\n  epochs: 5\n  seed: 7\n")
    config = load_config(conf_dir, [extra], ["train.seed=8"])
    assert config.train.epochs == 5  # --conf over local over base
    assert config.train.batch_size == 16  # from base, untouched by later layers
    assert config.train.seed == 8  # --set wins over --conf


def test_set_values_are_parsed_as_yaml():
    assert parse_override("train.hidden_units=[64, 32]") == {"train": {"hidden_units": [64, 32]}}
    assert parse_override("spark.show_progress=false") == {"spark": {"show_progress": False}}
    config = load_config(overrides=["train.hidden_units=[64,32]", "train.activation=[relu,tanh]"])
    assert config.train.activations() == ["relu", "tanh"]


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ("ingest.no_such_key=1", ["ingest.no_such_key", "label_column"]),
        ("nonsense.key=1", ["nonsense", "ingest"]),
        ("train.epochs=many", ["train.epochs", "integer"]),
        ("train.epochs=0", ["train.epochs", "greater than or equal to 1"]),
        (
            "ingest.max_reject_fraction=1.5",
            ["ingest.max_reject_fraction", "less than or equal to 1"],
        ),
        ("ingest.layout=pixels", ["ingest.layout", "'image'"]),
        ("train.activation=[relu,relu]", ["train", "2 entries for 1 hidden layers"]),
        ("ingest.split.train=0.5", ["ingest.split", "add up to 1"]),
    ],
)
def test_invalid_values_name_the_key(override, names):
    with pytest.raises(ConfigError) as caught:
        load_config(overrides=[override])
    for name in names:
        assert name in str(caught.value)


@pytest.mark.parametrize("item", ["no_equals_sign", "=3", "train..epochs=3"])
def test_malformed_set_is_refused(item):
    with pytest.raises(ConfigError, match=r"expected key\.path=value"):
        parse_override(item)


def test_missing_conf_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(files=[tmp_path / "absent.yaml"])


def test_a_conf_file_that_is_not_a_mapping_is_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(files=[bad])


def test_the_cluster_example_is_a_valid_config():
    config = load_config(files=[REPO / "conf" / "cluster.example.yaml"])
    assert config.spark.conf["spark.authenticate"] == "true"
    assert config.spark.conf["spark.network.crypto.enabled"] == "true"
