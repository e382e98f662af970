"""Recipes: defaults -> YAML -> dotted overrides, with unknown keys and bad values rejected."""

from __future__ import annotations

from pathlib import Path

import pytest

from gptkit.config import load_run_config, parse_override, to_dict
from gptkit.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_yaml_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("model:\n  preset: gpt-mini\n  n_layer: 3\ntrain:\n  max_steps: 10\n")
    config = load_run_config(path, ["--train.max_steps=200", "--train.lr=3e-4", "--sample.stop=[a, b]"])
    assert config.model.n_layer == 3 and config.model.d_model == 128  # preset, then the file's override
    assert config.train.max_steps == 200 and config.train.lr == 3e-4
    assert config.sample.stop == ("a", "b")


def test_every_bundled_recipe_loads() -> None:
    recipes = sorted((REPO / "configs").glob("*.yaml"))
    assert recipes
    for recipe in recipes:
        assert to_dict(load_run_config(recipe))["train"]["max_steps"] > 0


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--train.max_stepz=5"], "unknown key 'train.max_stepz'; allowed keys: out_dir, max_steps"),
        (["--trian.max_steps=5"], "unknown section 'trian'"),
        (["--train.max_steps=-5"], "train.max_steps: must be > 0, got -5"),
        (["--train.max_steps=many"], "train.max_steps: must be an integer; got 'many'"),
        (["--train.lr=0"], "train.lr: must be > 0"),
        (["--train.min_lr=1"], "train.min_lr: must be <= train.lr"),
        (["--data.tokenizer=wordpiece"], "data.tokenizer: must be one of char, bpe"),
        (["--model.bias=maybe"], "model.bias: must be true or false"),
        (["--train.max_steps"], "must look like --section.field=value"),
    ],
)
def test_bad_values_name_the_field_and_the_allowed_range(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_run_config(None, overrides)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_yaml_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_run_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_run_config(bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("optimizer:\n  lr: 1\n")
    with pytest.raises(ConfigError, match="unknown section 'optimizer'"):
        load_run_config(unknown)


def test_override_values_are_yaml() -> None:
    assert parse_override("--model.bias=false") == (["model", "bias"], False)
    assert parse_override("--train.lr=0.001") == (["train", "lr"], 0.001)
    assert parse_override("--data.source=a=b.txt") == (["data", "source"], "a=b.txt")
