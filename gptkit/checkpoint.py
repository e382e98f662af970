"""The on-disk model checkpoint: a directory with

    config.json         {"format": "gptkit-checkpoint", "version": 1, "model": {...}, ...}
    model.safetensors   the weights (a tied LM head is stored once, as the token embedding)
    tokenizer.json      the tokenizer, when the model has one

The trainer adds its own files (optimizer, RNG and data position) beside these; everything that
only needs the model (generate, serve, evaluate) reads just the three above.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gptkit.config import ModelConfig, build_dataclass, to_dict
from gptkit.errors import CheckpointError, ConfigError
from gptkit.fileio import atomic_write_json
from gptkit.model.gpt import GPT

CHECKPOINT_FORMAT = "gptkit-checkpoint"
CHECKPOINT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"


def model_state_for_saving(model: GPT) -> dict[str, torch.Tensor]:
    """The model's tensors, contiguous and on CPU, without the tied head's duplicate."""
    state = model.state_dict()
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    return {name: tensor.detach().to("cpu").contiguous() for name, tensor in state.items()}


def write_model_files(directory: Path, model: GPT, extra_config: dict[str, Any] | None = None) -> None:
    """Write config.json and model.safetensors into ``directory`` (usually a temporary one)."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file(model_state_for_saving(model), str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    config = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "model": to_dict(model.config),
        **(extra_config or {}),
    }
    atomic_write_json(directory / CONFIG_FILE, config)


def read_checkpoint_config(path: str | Path) -> dict[str, Any]:
    """Read and check config.json of a gptkit checkpoint directory."""
    directory = Path(path)
    if not directory.exists():
        raise CheckpointError(f"checkpoint not found: {directory}")
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint must be a directory with {CONFIG_FILE} and {WEIGHTS_FILE}: {directory}")
    config_path = directory / CONFIG_FILE
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {directory} has no {CONFIG_FILE}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"corrupt checkpoint config {config_path}: {exc}") from None
    if not isinstance(config, dict) or config.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{config_path} is not a gptkit checkpoint config (no \"format\": \"{CHECKPOINT_FORMAT}\")")
    if config.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{config_path}: unsupported checkpoint version {config.get('version')!r}")
    return config


def model_config_from_checkpoint(config: dict[str, Any], where: str | Path) -> ModelConfig:
    try:
        return build_dataclass(ModelConfig, config.get("model"), "model")
    except ConfigError as exc:
        raise CheckpointError(f"{where}: invalid model config in checkpoint ({exc})") from None


def load_model_weights(model: GPT, weights_path: Path) -> None:
    """Load safetensors weights into ``model`` strictly (every tensor present, every shape equal)."""
    try:
        state = load_file(str(weights_path))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint weights not found: {weights_path}") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"corrupt checkpoint weights {weights_path}: {exc}") from None
    expected = model.state_dict()
    if model.config.tie_embeddings:
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise CheckpointError(f"{weights_path} does not match the model config: {detail}")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(
                f"{weights_path}: tensor {name} has shape {tuple(tensor.shape)}, "
                f"the config needs {tuple(expected[name].shape)}"
            )
    model.load_state_dict(state, strict=False)


def load_checkpoint_model(path: str | Path, *, device: str | torch.device = "cpu") -> GPT:
    """A GPT in eval mode from a gptkit checkpoint directory."""
    directory = Path(path)
    config = read_checkpoint_config(directory)
    model = GPT(model_config_from_checkpoint(config, directory))
    load_model_weights(model, directory / WEIGHTS_FILE)
    return model.to(device).eval()
