"""Training checkpoints: the model files plus everything needed to continue exactly.

    checkpoint/
      config.json              model config, the whole run config, step      (gptkit.checkpoint)
      model.safetensors        weights                                       (gptkit.checkpoint)
      tokenizer.json           copied from the prepared data
      optimizer.safetensors    optimizer tensors, flattened as "state.<param index>.<name>"
      trainer_state.json       step, optimizer hyper-parameters, data position, RNG states (base64)

The directory is written to a temporary sibling and renamed into place, so a crash while saving
leaves the previous checkpoint whole.
"""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gptkit.checkpoint import TOKENIZER_FILE, write_model_files
from gptkit.errors import CheckpointError
from gptkit.fileio import atomic_directory, atomic_write_json
from gptkit.model.gpt import GPT

OPTIMIZER_FILE = "optimizer.safetensors"
TRAINER_STATE_FILE = "trainer_state.json"


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict into tensors (for safetensors) and JSON-able values."""
    state_dict = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, param_state in state_dict["state"].items():
        for name, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{name}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _optimizer_state_dict(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = tensor
    for index, values in meta.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def _encode_rng(state: torch.Tensor) -> str:
    return base64.b64encode(state.numpy().tobytes()).decode("ascii")


def _decode_rng(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


def save_training_checkpoint(
    directory: Path,
    *,
    model: GPT,
    optimizer: torch.optim.Optimizer,
    step: int,
    run_config: dict[str, Any],
    data_state: dict[str, Any],
    tokenizer_path: Path | None,
    extra_state: dict[str, Any] | None = None,
) -> None:
    """Atomically write a full training checkpoint for ``step`` completed steps."""
    with atomic_directory(directory) as tmp:
        write_model_files(tmp, model, {"run": run_config, "step": step})
        if tokenizer_path is not None and tokenizer_path.exists():
            shutil.copyfile(tokenizer_path, tmp / TOKENIZER_FILE)
        tensors, optimizer_meta = _optimizer_tensors(optimizer)
        save_file(tensors, str(tmp / OPTIMIZER_FILE))
        rng = {"torch": _encode_rng(torch.get_rng_state())}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = [_encode_rng(s) for s in torch.cuda.get_rng_state_all()]
        atomic_write_json(
            tmp / TRAINER_STATE_FILE,
            {
                "step": step,
                "optimizer": optimizer_meta,
                "data": data_state,
                "rng": rng,
                **(extra_state or {}),
            },
        )


def load_training_state(directory: Path, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore optimizer and RNG states from ``directory``; return the trainer state dict."""
    state_path = directory / TRAINER_STATE_FILE
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
        tensors = load_file(str(directory / OPTIMIZER_FILE))
    except FileNotFoundError as exc:
        raise CheckpointError(f"cannot resume from {directory}: missing {Path(exc.filename).name}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, SafetensorError) as exc:
        raise CheckpointError(f"cannot resume from {directory}: corrupt training state ({exc})") from None
    try:
        optimizer.load_state_dict(_optimizer_state_dict(tensors, state["optimizer"]))
        torch.set_rng_state(_decode_rng(state["rng"]["torch"]))
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([_decode_rng(s) for s in state["rng"]["cuda"]])
    except (KeyError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"cannot resume from {directory}: training state does not fit this run ({exc})") from None
    return state
