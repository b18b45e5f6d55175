"""Config precedence (defaults < file < env < CLI) and errors that name the offending key."""

from __future__ import annotations

from pathlib import Path

import pytest

from karma.config import KarmaConfig, config_to_yaml, load_config
from karma.errors import ConfigError
from tests.helpers import REPO, write


def test_defaults_are_the_documented_ones() -> None:
    config = load_config(environ={})
    assert config == KarmaConfig()
    assert config.data.name == "synthetic"
    assert config.features.text_encoder == "minilm"
    # Every knob carries a description, so `karma config show` and the docs can explain it.
    for model in (KarmaConfig, type(config.data), type(config.data.synthetic), type(config.features)):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"


@pytest.mark.parametrize("suffix", [".yaml", ".toml"])
def test_file_values_are_loaded(tmp_path: Path, suffix: str) -> None:
    if suffix == ".yaml":
        text = "data:\n  name: ml-100k\n  synthetic:\n    n_items: 1234\n"
    else:
        text = '[data]\nname = "ml-100k"\n[data.synthetic]\nn_items = 1234\n'
    config = load_config(write(tmp_path / f"c{suffix}", text), environ={})
    assert config.data.name == "ml-100k"
    assert config.data.synthetic.n_items == 1234


def test_precedence_file_then_env_then_cli(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "data:\n  max_history: 10\n  min_history: 2\nseed: 5\n")
    env = {"KARMA_DATA__MAX_HISTORY": "20", "KARMA_SEED": "6", "UNRELATED": "x"}
    config = load_config(path, ["data.max_history=30"], environ=env)
    assert config.data.max_history == 30  # CLI beats env and file
    assert config.seed == 6  # env beats file
    assert config.data.min_history == 2  # file beats default


def test_env_can_name_the_config_file(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "seed: 42\n")
    assert load_config(environ={"KARMA_CONFIG": str(path)}).seed == 42


def test_env_and_cli_values_are_typed() -> None:
    config = load_config(
        overrides=["data.taobao_click_behaviors=[pv, buy]", "features.use_visual=false"],
        environ={"KARMA_DATA__SYNTHETIC__INTERESTS_PER_USER": "[1, 2]"},
    )
    assert config.data.taobao_click_behaviors == ["pv", "buy"]
    assert config.features.use_visual is False
    assert config.data.synthetic.interests_per_user == (1, 2)


def test_unknown_key_in_file_is_named(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "data:\n  nmae: ml-1m\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'data\.nmae'"):
        load_config(path, environ={})


def test_unknown_env_variable_is_named() -> None:
    with pytest.raises(ConfigError, match=r"KARMA_DATA__NAEM.*unknown config key 'data\.naem'"):
        load_config(environ={"KARMA_DATA__NAEM": "ml-1m"})


def test_unknown_cli_key_is_named_with_known_keys() -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'features\.dim'.*hashing_dim"):
        load_config(overrides=["features.dim=3"], environ={})


def test_wrong_type_names_field_and_value() -> None:
    with pytest.raises(ConfigError, match=r"data\.synthetic\.n_items.*'many'"):
        load_config(overrides=["data.synthetic.n_items=many"], environ={})
    with pytest.raises(ConfigError, match=r"features\.text_encoder"):
        load_config(overrides=["features.text_encoder=bert"], environ={})


def test_malformed_override_and_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(overrides=["data.name"], environ={})
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config(write(tmp_path / "bad.yaml", "data: [unclosed\n"), environ={})
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path / "list.yaml", "- 1\n- 2\n"), environ={})
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml", environ={})


def test_yaml_dump_round_trips(tmp_path: Path) -> None:
    config = load_config(overrides=["data.name=ml-1m", "data.synthetic.seed=3"], environ={})
    path = write(tmp_path / "dump.yaml", config_to_yaml(config))
    assert load_config(path, environ={}) == config


def test_install_knobs_are_not_config_keys_and_colon_values_stay_strings() -> None:
    env = {"KARMA_EXTRAS": "serve", "KARMA_VENV": "/opt/venv", "KARMA_LOADTEST_BUNDLE": "/b", "KARMA_SEED": "4"}
    assert load_config(environ=env).seed == 4
    config = load_config(
        overrides=["serve.redis_key_prefix=karma:"], environ={"KARMA_SERVE__REDIS_URL": "redis://r:6379/0"}
    )
    assert config.serve.redis_key_prefix == "karma:"
    assert config.serve.redis_url == "redis://r:6379/0"


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_config_files_load(path: Path) -> None:
    """Every profile under configs/ names only real keys with valid values (a typo would be an error)."""
    config = load_config(path, environ={})
    assert config.model_dump() != KarmaConfig().model_dump()  # the file changes something
