"""Typed configuration: frozen dataclasses validated on construction, YAML recipes, dotted overrides.

Precedence is defaults -> YAML file -> ``--section.field=value`` overrides. Unknown keys are errors,
so a typo never silently falls back to a default. A checkpoint stores its resolved config as JSON.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from gptkit.errors import ConfigError


def _require(condition: bool, name: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{name}: {message}")


def _positive(value: int | float, name: str) -> None:
    _require(value > 0, name, f"must be > 0, got {value!r}")


def _non_negative(value: int | float, name: str) -> None:
    _require(value >= 0, name, f"must be >= 0, got {value!r}")


def _choice(value: Any, name: str, allowed: tuple[Any, ...]) -> None:
    _require(value in allowed, name, f"must be one of {', '.join(map(str, allowed))}; got {value!r}")


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _type_ok(value: Any, annotation: Any) -> bool:
    """Whether ``value`` is of a config field's type, as a Python caller passes it (an int is a
    fine float; a bool is not a number; a list is a fine tuple)."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return value in args
    if args and type(None) in args:  # X | None
        return value is None or any(_type_ok(value, a) for a in args if a is not type(None))
    if origin is tuple:
        return isinstance(value, (tuple, list)) and all(_type_ok(v, args[0]) for v in value)
    if annotation is float:  # numpy scalars too (numbers.Real), but not bool
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if annotation in (bool, str):
        return isinstance(value, annotation)
    return True


def _check_fields(config: Any, section: str) -> None:
    """Every field of the type it is declared with, and no number inf or nan: a config built in
    Python (not through YAML) is checked here, and a nan or inf only shows up later as a nan loss.
    Numbers become plain int/float (numpy scalars included) and lists become tuples, so that a
    config compares, hashes and serialises the same however it was built."""
    prefix = f"{section}." if section != "sample" else ""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        annotation = _field_types(type(config))[f.name]
        if not _type_ok(value, annotation):
            raise ConfigError(f"{prefix}{f.name}: must be {_type_name(annotation)}; got {value!r}")
        if isinstance(value, numbers.Integral) and not isinstance(value, (int, bool)):
            value = int(value)
        elif isinstance(value, numbers.Real) and not isinstance(value, (int, float)):
            value = float(value)
        elif isinstance(value, list):
            value = tuple(value)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{prefix}{f.name}: must be a finite number; got {value}")
        object.__setattr__(config, f.name, value)  # frozen dataclass: normalise in place


def _type_name(annotation: Any) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if args and type(None) in args:
        return " or ".join(_type_name(a) for a in args if a is not type(None)) + " or null"
    if origin is tuple:
        return "a list of strings"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(annotation, str(annotation))


# torch.Generator.manual_seed takes seeds up to 2**64 - 1; seeds are offset by ranks and samples.
MAX_SEED = 2**63 - 1


def _seed(value: int | None, name: str) -> None:
    if value is not None:
        _require(0 <= value <= MAX_SEED, name, f"must be in [0, 2**63 - 1]; got {value}")


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Shape and parts of a decoder-only transformer.

    The defaults give GPT-2's architecture (learned positions, LayerNorm, GELU MLP, full multi-head
    attention, biases, tied embeddings). Each modern option is independent of the others.
    """

    vocab_size: int = 50257
    block_size: int = 1024  # maximum context length in tokens
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None  # None: same as n_head (multi-head); 1: multi-query; between: grouped-query
    d_model: int = 768
    d_ff: int | None = None  # hidden width of the MLP; None: 4*d_model (gelu) or ~8/3*d_model (swiglu)
    dropout: float = 0.0
    bias: bool = True
    tie_embeddings: bool = True
    position: Literal["learned", "rope"] = "learned"
    rope_base: float = 10000.0
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = 1e-5
    mlp: Literal["gelu", "swiglu"] = "gelu"
    qk_norm: bool = False
    init_std: float = 0.02

    def __post_init__(self) -> None:
        _check_fields(self, "model")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "d_model"):
            _positive(getattr(self, name), f"model.{name}")
        _require(
            self.d_model % self.n_head == 0,
            "model.d_model",
            f"must be divisible by model.n_head ({self.n_head}); got {self.d_model}",
        )
        if self.n_kv_head is not None:
            _positive(self.n_kv_head, "model.n_kv_head")
            _require(
                self.n_head % self.n_kv_head == 0,
                "model.n_head",
                f"must be divisible by model.n_kv_head ({self.n_kv_head}); got {self.n_head}",
            )
        if self.d_ff is not None:
            _positive(self.d_ff, "model.d_ff")
        _require(0.0 <= self.dropout < 1.0, "model.dropout", f"must be in [0, 1); got {self.dropout}")
        _choice(self.position, "model.position", ("learned", "rope"))
        _choice(self.norm, "model.norm", ("layernorm", "rmsnorm"))
        _choice(self.mlp, "model.mlp", ("gelu", "swiglu"))
        _positive(self.rope_base, "model.rope_base")
        _positive(self.norm_eps, "model.norm_eps")
        _positive(self.init_std, "model.init_std")
        if self.position == "rope":
            _require(
                self.head_dim % 2 == 0,
                "model.d_model / model.n_head",
                f"RoPE needs an even head dimension; got {self.d_model}/{self.n_head} = {self.head_dim}",
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def mlp_hidden(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        if self.mlp == "gelu":
            return 4 * self.d_model
        # SwiGLU has three matrices instead of two: 2/3 of 4*d keeps the parameter count, rounded to 64.
        return 64 * math.ceil(int(8 * self.d_model / 3) / 64)


# --------------------------------------------------------------------------------------------
# Data, training, sampling
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where the corpus comes from and how it is tokenized."""

    source: str = "shakespeare"  # "shakespeare" (built in), a .txt file, a folder of .txt files, or .jsonl
    dir: str = "data/shakespeare-char"  # prepared token shards, meta.json and tokenizer.json live here
    tokenizer: Literal["char", "bpe"] = "char"
    vocab_size: int = 4096  # for "bpe" only; a char vocabulary is what the corpus contains
    val_fraction: float = 0.1

    def __post_init__(self) -> None:
        _check_fields(self, "data")
        _choice(self.tokenizer, "data.tokenizer", ("char", "bpe"))
        _require(
            257 <= self.vocab_size <= 2**24, "data.vocab_size", f"must be in [257, 2**24]; got {self.vocab_size}"
        )
        _require(
            0.0 < self.val_fraction < 1.0, "data.val_fraction", f"must be in (0, 1); got {self.val_fraction}"
        )
        _require(bool(self.source), "data.source", "must not be empty")
        _require(bool(self.dir), "data.dir", "must not be empty")


STRATEGIES = ("single", "ddp", "fsdp", "tp", "fsdp+tp")
SHARDED_STRATEGIES = ("fsdp", "tp", "fsdp+tp")  # parameters become DTensors


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """One training run: optimisation, schedule, evaluation and checkpointing."""

    out_dir: str = "out/run"
    max_steps: int = 2000
    batch_size: int = 12  # sequences per micro-batch (per process)
    grad_accum_steps: int = 1
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    lr_decay_steps: int | None = None  # None: decay over max_steps
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    eval_interval: int = 250
    eval_batches: int = 20
    log_interval: int = 10
    tensorboard: bool = False  # also write the logged metrics as TensorBoard scalars to out_dir/tensorboard
    checkpoint_interval: int = 1000  # 0: only at the end
    seed: int = 1337
    optimizer: Literal["adamw", "muon"] = "adamw"  # muon: Muon for hidden matrices, AdamW for the rest
    muon_momentum: float = 0.95
    schedule: Literal["cosine", "wsd"] = "cosine"
    decay_fraction: float = 0.2  # wsd: share of the post-warm-up steps spent decaying to min_lr
    # Wall-clock budget: stop when spent. The schedule then follows the clock, unless lr_decay_steps is set.
    max_seconds: float | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compile: bool = False
    # fp32: everything in float32. bf16/fp16: autocast forward+loss, float32 master weights;
    # fp16 also scales the loss (GradScaler) and skips steps whose gradients overflow.
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    activation_checkpointing: bool = False  # recompute each block's activations in backward
    # single: one process. ddp: one replica per process under torchrun, gradients all-reduced.
    # fsdp: FSDP2, parameters, gradients and optimizer state sharded over the ranks.
    # tp: tensor parallel, each block's attention heads and MLP hidden units split over tp_size ranks
    # that all see the same data. fsdp+tp: a 2-D mesh (dp = world / tp_size, tp_size), TP inside
    # and FSDP across. See gptkit/distributed/mesh.py.
    strategy: Literal["single", "ddp", "fsdp", "tp", "fsdp+tp"] = "single"
    # tp: 1 means "all launched ranks" (pure TP); fsdp+tp: required, >= 2, and the world size must
    # be a multiple of it with at least 2 data-parallel groups; other strategies: must stay 1.
    tp_size: int = 1
    dist_timeout_s: float = 1800.0  # a collective that waits longer than this fails the run

    def __post_init__(self) -> None:
        _check_fields(self, "train")
        _seed(self.seed, "train.seed")
        for name in ("max_steps", "batch_size", "grad_accum_steps", "eval_batches", "log_interval"):
            _positive(getattr(self, name), f"train.{name}")
        for name in ("warmup_steps", "weight_decay", "grad_clip", "eval_interval", "checkpoint_interval"):
            _non_negative(getattr(self, name), f"train.{name}")
        _positive(self.lr, "train.lr")
        _non_negative(self.min_lr, "train.min_lr")
        _require(self.min_lr <= self.lr, "train.min_lr", f"must be <= train.lr ({self.lr}); got {self.min_lr}")
        if self.lr_decay_steps is not None:
            _positive(self.lr_decay_steps, "train.lr_decay_steps")
            # The decay starts after warm-up: ending it before would drop lr to min_lr in one step.
            _require(
                self.lr_decay_steps > self.warmup_steps, "train.lr_decay_steps",
                f"must be > train.warmup_steps ({self.warmup_steps}); got {self.lr_decay_steps}",
            )
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            _require(0.0 <= value < 1.0, f"train.{name}", f"must be in [0, 1); got {value}")
        _positive(self.eps, "train.eps")
        _choice(self.device, "train.device", ("auto", "cpu", "cuda"))
        _choice(self.optimizer, "train.optimizer", ("adamw", "muon"))
        _choice(self.schedule, "train.schedule", ("cosine", "wsd"))
        _choice(self.precision, "train.precision", ("fp32", "bf16", "fp16"))
        _choice(self.strategy, "train.strategy", STRATEGIES)
        _positive(self.tp_size, "train.tp_size")
        if self.strategy not in ("tp", "fsdp+tp"):
            _require(
                self.tp_size == 1,
                "train.tp_size",
                f"a TP degree of {self.tp_size} needs train.strategy tp or fsdp+tp; got {self.strategy}",
            )
        if self.strategy == "fsdp+tp":
            _require(
                self.tp_size >= 2,
                "train.tp_size",
                f"fsdp+tp needs a TP degree >= 2 (use strategy fsdp for none); got {self.tp_size}",
            )
        _positive(self.dist_timeout_s, "train.dist_timeout_s")
        _require(0.0 < self.decay_fraction <= 1.0, "train.decay_fraction", f"must be in (0, 1]; got {self.decay_fraction}")
        _require(0.0 <= self.muon_momentum < 1.0, "train.muon_momentum", f"must be in [0, 1); got {self.muon_momentum}")
        if self.max_seconds is not None:
            _positive(self.max_seconds, "train.max_seconds")
        _require(bool(self.out_dir), "train.out_dir", "must not be empty")


@dataclass(frozen=True, kw_only=True)
class SampleConfig:
    """How to draw tokens from a model."""

    max_new_tokens: int = 200
    temperature: float = 0.8  # 0 means greedy
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_fields(self, "sample")
        _seed(self.seed, "seed")
        _non_negative(self.max_new_tokens, "max_new_tokens")
        _non_negative(self.temperature, "temperature")
        if self.top_k is not None:
            _positive(self.top_k, "top_k")
        if self.top_p is not None:
            _require(0.0 < self.top_p <= 1.0, "top_p", f"must be in (0, 1]; got {self.top_p}")
        _positive(self.repetition_penalty, "repetition_penalty")
        if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
            raise ConfigError(f"stop: must be a list of non-empty strings; got {self.stop!r}")


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """A whole recipe, as written in a YAML file under configs/."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def __post_init__(self) -> None:
        for name, cls in (("model", ModelConfig), ("data", DataConfig), ("train", TrainConfig),
                          ("sample", SampleConfig)):
            value = getattr(self, name)
            if not isinstance(value, cls):
                hint = " (build it with run_config_from_dict for plain dicts)" if isinstance(value, dict) else ""
                raise ConfigError(f"{name}: must be a {cls.__name__}; got {type(value).__name__}{hint}")


# --------------------------------------------------------------------------------------------
# Building configs from dictionaries, YAML and overrides
# --------------------------------------------------------------------------------------------

_SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "sample": SampleConfig,
}


def _coerce(value: Any, annotation: Any) -> Any:
    """A YAML value in the form its field takes: a float YAML 1.1 read as a string ("3e-4", no
    dot) or as an int, and a single string for a list of strings. The config itself checks the
    type and range (``_check_fields`` and ``__post_init__``)."""
    args = get_args(annotation)
    if args and type(None) in args:  # Optional[X] written as X | None
        return None if value is None else _coerce(value, next(a for a in args if a is not type(None)))
    if get_origin(annotation) is tuple and isinstance(value, str):
        return (value,)
    if annotation is float and isinstance(value, (str, int)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            return value  # not a number: the config's own check names the field
    return value


def build_dataclass(cls: type, values: dict[str, Any], section: str) -> Any:
    """Construct ``cls`` from a plain dict, rejecting unknown keys and ill-typed values."""
    if not isinstance(values, dict):
        raise ConfigError(f"{section}: must be a mapping of keys to values; got {values!r}")
    hints = _field_types(cls)
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise ConfigError(f"unknown key '{section}.{unknown[0]}'; allowed keys: {', '.join(allowed)}")
    kwargs = {k: _coerce(v, hints[k]) for k, v in values.items()}
    return cls(**kwargs)


def model_config_from_dict(values: dict[str, Any]) -> ModelConfig:
    """Build a ModelConfig; the key ``preset`` starts from a named shape and the other keys override it."""
    from gptkit.model.presets import preset_values  # presets are data that lives beside the model

    if not isinstance(values, dict):
        raise ConfigError(f"model: must be a mapping of keys to values; got {values!r}")
    values = dict(values)
    preset = values.pop("preset", None)
    base = preset_values(preset) if preset is not None else {}
    return build_dataclass(ModelConfig, {**base, **values}, "model")


def run_config_from_dict(values: dict[str, Any]) -> RunConfig:
    if not isinstance(values, dict):
        raise ConfigError(f"a recipe must be a mapping with sections {', '.join(_SECTIONS)}; got {values!r}")
    unknown = sorted(set(values) - set(_SECTIONS))
    if unknown:
        raise ConfigError(f"unknown section '{unknown[0]}'; allowed sections: {', '.join(_SECTIONS)}")
    sections: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        raw = values.get(name)
        if raw is None:  # an empty section (`train:`); `train: []` or `train: 0` is refused below
            raw = {}
        sections[name] = model_config_from_dict(raw) if name == "model" else build_dataclass(cls, raw, name)
    return RunConfig(**sections)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``--section.field=value`` (or without the dashes) into a key path and a YAML value."""
    body = text[2:] if text.startswith("--") else text
    if "=" not in body:
        raise ConfigError(f"override {text!r} must look like --section.field=value")
    key, raw = body.split("=", 1)
    path = key.split(".")
    if len(path) != 2 or not all(path):
        raise ConfigError(f"override {text!r}: the key must be section.field, for example train.max_steps")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc.problem})") from None
    return path, value


class _RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error: PyYAML keeps
    the last one silently, so a recipe with two ``train:`` sections would lose the first's settings."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._keys_checked: set[yaml.MappingNode] = set()  # nodes hash by identity

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        # Checked before PyYAML resolves the node's merges (`<<: *defaults`, which later keys may
        # override): that writes the merged keys into node.value, in place, and a mapping that is
        # merged into another is flattened there, possibly before it is constructed itself.
        if node not in self._keys_checked:
            self._keys_checked.add(node)
            first_line: dict[str, int] = {}
            for key_node, _ in node.value:
                if key_node.tag != "tag:yaml.org,2002:str":  # a merge, or a key that is not text
                    continue
                line = key_node.start_mark.line + 1
                if key_node.value in first_line:
                    raise ConfigError(
                        f"{self.name}: the key {key_node.value!r} is given twice "
                        f"(lines {first_line[key_node.value]} and {line}); keep one"
                    )
                first_line[key_node.value] = line
        super().flatten_mapping(node)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    try:
        loader = _RecipeLoader(text)
        loader.name = str(path)  # for the duplicate-key message
        try:
            data = loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})".replace("\n", " ")) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping with sections {', '.join(_SECTIONS)}")
    return data


def _is_text_field(section: str, key: str, value: Any) -> bool:
    """Whether ``section.key`` holds free text (a path, a name) that ``value`` came from: then
    ``--data.source=2024`` means the string "2024", not the number YAML would read, and
    ``--train.out_dir=~`` the folder "~", not null (a ``str | None`` field keeps null as None)."""
    annotation = _field_types(_SECTIONS[section]).get(key)
    if annotation is str:
        return True
    return set(get_args(annotation)) == {str, type(None)} and value is not None


def apply_overrides(values: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """A copy of a recipe dict with ``--section.field=value`` overrides applied.

    A ``--model.preset=...`` override outranks the recipe's own shape keys: the fields the preset
    sets are dropped from the recipe's model section (other overrides still apply on top).
    """
    values = {k: dict(v) if isinstance(v, dict) else v for k, v in values.items()}
    overridden: dict[str, set[str]] = {}
    for text in overrides:
        (section, key), value = parse_override(text)
        if section not in _SECTIONS:
            raise ConfigError(f"unknown section '{section}' in {text!r}; allowed: {', '.join(_SECTIONS)}")
        current = values.setdefault(section, {})
        if not isinstance(current, dict):
            raise ConfigError(f"section '{section}' must be a mapping")
        if not isinstance(value, str) and _is_text_field(section, key, value):
            value = text.split("=", 1)[1]
        current[key] = value
        overridden.setdefault(section, set()).add(key)
    model = values.get("model")
    if "preset" in overridden.get("model", ()) and isinstance(model, dict) and model.get("preset") is not None:
        from gptkit.model.presets import preset_values

        for key in preset_values(model["preset"]):
            if key not in overridden["model"]:
                model.pop(key, None)
    return values


def load_run_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Defaults, then the YAML recipe at ``path`` (if any), then dotted overrides."""
    values: dict[str, Any] = load_yaml(path) if path is not None else {}
    return run_config_from_dict(apply_overrides(values, overrides))


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-friendly dict of a config dataclass (tuples become lists)."""
    return dataclasses.asdict(config)
