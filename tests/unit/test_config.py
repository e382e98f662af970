"""Recipes: defaults -> YAML -> dotted overrides, with unknown keys and bad values rejected."""

from __future__ import annotations

from pathlib import Path

import pytest

from gptkit.config import load_run_config, load_yaml, parse_override, to_dict
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
        (["--train.warmup_steps=50", "--train.lr_decay_steps=50"],
         "train.lr_decay_steps: must be > train.warmup_steps (50); got 50"),
        (["--data.tokenizer=wordpiece"], "data.tokenizer: must be one of char, bpe"),
        (["--model.bias=maybe"], "model.bias: must be true or false"),
        (["--train.max_steps"], "must look like --section.field=value"),
        (["--train.lr=.inf"], "train.lr: must be a finite number; got inf"),
        (["--train.beta1=.nan"], "train.beta1: must be a finite number; got nan"),
        (["--data.val_fraction=-.inf"], "data.val_fraction: must be a finite number"),
        (["--sample.temperature=.inf"], "temperature: must be a finite number"),
        (["--train.seed=99999999999999999999999"], "train.seed: must be in [0, 2**63 - 1]"),
        (["--sample.seed=-1"], "seed: must be in [0, 2**63 - 1]; got -1"),
        (["--model.preset=[1, 2]"], "model.preset: unknown preset [1, 2]; known presets: gpt2"),
        (["--model=[1, 2]"], "the key must be section.field"),
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


def test_a_key_given_twice_in_a_recipe_is_an_error(tmp_path: Path) -> None:
    # PyYAML alone keeps the last of two equal keys: the first train section would be lost.
    twice = tmp_path / "twice.yaml"
    twice.write_text("train:\n  max_steps: 5\nmodel:\n  n_layer: 2\ntrain:\n  lr: 0.01\n")
    with pytest.raises(ConfigError, match=r"twice.yaml: the key 'train' is given twice \(lines 1 and 5\); keep one"):
        load_run_config(twice)
    inner = tmp_path / "inner.yaml"
    inner.write_text("train:\n  lr: 0.01\n  lr: 0.02\n")
    with pytest.raises(ConfigError, match=r"the key 'lr' is given twice \(lines 2 and 3\)"):
        load_run_config(inner)
    # A YAML merge (`<<`) may still be overridden by a key of the mapping itself.
    merged = tmp_path / "merged.yaml"
    merged.write_text("train:\n  <<: {lr: 0.01, max_steps: 7}\n  lr: 0.02\n")
    config = load_run_config(merged)
    assert (config.train.lr, config.train.max_steps) == (0.02, 7)


def test_a_merged_mapping_that_overrides_its_own_merge_is_no_duplicate(tmp_path: Path) -> None:
    # `fast` overrides the lr it merges from `base`, and is merged into `train` before it is
    # constructed itself (it stands deeper in the file): still one lr per mapping as written. The
    # recipe's real mistake, the section it does not know, is what is reported.
    chained = tmp_path / "chained.yaml"
    chained.write_text(
        "defaults:\n  base: &base {lr: 0.01, max_steps: 7}\n  fast: &fast\n    <<: *base\n    lr: 0.02\n"
        "train:\n  <<: *fast\n"
    )
    assert load_yaml(chained)["train"] == {"lr": 0.02, "max_steps": 7}
    with pytest.raises(ConfigError, match="unknown section 'defaults'"):
        load_run_config(chained)
    # A key twice in a mapping that is only merged is still found.
    inline = tmp_path / "inline.yaml"
    inline.write_text("train:\n  <<: {lr: 0.01, lr: 0.02}\n")
    with pytest.raises(ConfigError, match=r"the key 'lr' is given twice \(lines 2 and 2\)"):
        load_run_config(inline)


def test_override_values_are_yaml() -> None:
    assert parse_override("--model.bias=false") == (["model", "bias"], False)
    assert parse_override("--train.lr=0.001") == (["train", "lr"], 0.001)
    assert parse_override("--data.source=a=b.txt") == (["data", "source"], "a=b.txt")


def test_a_section_that_is_not_a_mapping_is_one_line_error(tmp_path: Path) -> None:
    for section in ("model", "train", "data"):
        recipe = tmp_path / f"{section}.yaml"
        recipe.write_text(f"{section}: [1, 2]\n")
        with pytest.raises(ConfigError, match=f"^{section}: must be a mapping of keys to values; got \\[1, 2\\]$"):
            load_run_config(recipe)


@pytest.mark.parametrize("value", ["[]", "0", "false", "''", "{}"])
def test_an_empty_value_that_is_not_a_mapping_is_no_empty_section(tmp_path: Path, value: str) -> None:
    # `train: []` or `train: false` is a slip, not "no settings": refused like `train: [1, 2]`;
    # `train:` (null) and `train: {}` are empty sections.
    for section in ("model", "data", "train", "sample"):
        recipe = tmp_path / f"{section}.yaml"
        recipe.write_text(f"{section}: {value}\n")
        if value == "{}":
            assert load_run_config(recipe) == load_run_config(None)
            continue
        with pytest.raises(ConfigError, match=f"^{section}: must be a mapping of keys to values; got "):
            load_run_config(recipe)
    (tmp_path / "null.yaml").write_text("train:\n")
    assert load_run_config(tmp_path / "null.yaml") == load_run_config(None)


def test_preset_override_outranks_the_recipe_shape(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  n_layer: 4\n  n_head: 4\n  d_model: 128\n  block_size: 64\ntrain:\n  max_steps: 9\n")
    config = load_run_config(recipe, ["--model.preset=gpt2"])
    assert (config.model.n_layer, config.model.n_head, config.model.d_model) == (12, 12, 768)
    assert config.model.block_size == 1024 and config.train.max_steps == 9
    # Other overrides still apply on top of the preset, whatever their order.
    config = load_run_config(recipe, ["--model.n_layer=2", "--model.preset=gpt2"])
    assert (config.model.n_layer, config.model.d_model) == (2, 768)
    # A preset written in the recipe itself is the base its own keys override.
    recipe.write_text("model:\n  preset: gpt2\n  n_layer: 3\n")
    assert load_run_config(recipe).model.n_layer == 3


def test_text_fields_take_the_override_as_written() -> None:
    config = load_run_config(None, ["--data.source=2024", "--data.dir=007", "--train.out_dir=true"])
    assert (config.data.source, config.data.dir, config.train.out_dir) == ("2024", "007", "true")
    assert load_run_config(None, ["--train.out_dir=~"]).train.out_dir == "~"  # not YAML's null
    # Typed fields still parse the value.
    assert load_run_config(None, ["--train.max_steps=2024"]).train.max_steps == 2024


def test_configs_built_in_python_check_types() -> None:
    from gptkit.config import DataConfig, ModelConfig, RunConfig, SampleConfig, TrainConfig

    cases = [
        (lambda: ModelConfig(d_model=32.0), "model.d_model: must be an integer; got 32.0"),
        (lambda: ModelConfig(n_layer="2"), "model.n_layer: must be an integer; got '2'"),
        (lambda: ModelConfig(bias=1), "model.bias: must be true or false; got 1"),
        (lambda: TrainConfig(lr="1e-3"), "train.lr: must be a number; got '1e-3'"),
        (lambda: TrainConfig(max_steps=True), "train.max_steps: must be an integer; got True"),
        (lambda: DataConfig(source=None), "data.source: must be a string; got None"),
        (lambda: SampleConfig(top_k=2.5), "top_k: must be an integer or null; got 2.5"),
        (lambda: SampleConfig(stop=("a", 1)), "stop: must be a list of strings"),
        (lambda: RunConfig(model={"n_layer": 1}), "model: must be a ModelConfig; got dict"),
    ]
    for build, message in cases:
        with pytest.raises(ConfigError) as info:
            build()
        assert message in str(info.value)
    # What a Python caller naturally writes still works: an int for a float, a list for a tuple.
    assert TrainConfig(lr=1).lr == 1 and SampleConfig(stop=["a"]).stop == ("a",)
    import numpy as np

    config = TrainConfig(lr=np.float32(0.5), max_steps=np.int64(7))
    assert (type(config.lr), type(config.max_steps), config.max_steps) == (float, int, 7)
    assert hash(SampleConfig(stop=["a"])) == hash(SampleConfig(stop=("a",)))
