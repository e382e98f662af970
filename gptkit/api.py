"""The small, stable Python API: load a model and its tokenizer, and generate text.

    import gptkit
    model = gptkit.load("out/shakespeare-char")          # gptkit checkpoint or Hugging Face GPT-2 dir
    tokenizer = gptkit.load_tokenizer("out/shakespeare-char")
    logits = model(torch.tensor([[1, 2, 3]]))             # (B, T, vocab)
    print(gptkit.generate(model, tokenizer, "ROMEO:", max_new_tokens=100).text)
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from gptkit.checkpoint import CHECKPOINT_DIR, CONFIG_FILE, TOKENIZER_FILE, load_checkpoint_model
from gptkit.config import ModelConfig, SampleConfig
from gptkit.errors import CheckpointError, ConfigError, RequestError, TokenizerError
from gptkit.generate.generator import Completion, generate_text
from gptkit.model.gpt import GPT
from gptkit.model.hf import is_hf_directory, load_hf  # transformers itself is imported lazily
from gptkit.tokenizer import Tokenizer
from gptkit.tokenizer import load_tokenizer as _load_tokenizer_file


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """Accept a checkpoint directory or a run directory that holds ``checkpoint/``."""
    path = Path(path)
    if not (path / CONFIG_FILE).exists() and (path / CHECKPOINT_DIR / CONFIG_FILE).exists():
        return path / CHECKPOINT_DIR
    return path


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch.device, or a ConfigError naming it when this machine cannot use it."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device {device!r} is not a device torch knows; use 'cpu', 'cuda', 'cuda:N' or 'mps'") from None
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"device {device!r}: this machine has no CUDA device; use 'cpu'")
        if resolved.index is not None and resolved.index >= count:
            raise ConfigError(f"device {device!r}: this machine has {count} CUDA device(s)")
    elif resolved.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"device {device!r}: this machine has no MPS device; use 'cpu'")
    elif resolved.type not in ("cpu", "meta"):
        raise ConfigError(f"device {device!r} is not supported; use 'cpu', 'cuda' or 'mps'")
    return resolved


def load(path: str | Path, *, device: str | torch.device = "cpu") -> GPT:
    """A model in eval mode from a gptkit checkpoint (or run) directory, or a Hugging Face GPT-2 /
    Llama directory saved with ``save_pretrained``."""
    if not isinstance(path, (str, os.PathLike)):
        raise CheckpointError(
            f"path must be a checkpoint or model directory (a str or os.PathLike); got {type(path).__name__}"
        )
    device = check_device(device)
    directory = resolve_checkpoint_dir(path)
    if is_hf_directory(directory):
        return load_hf(directory).to(device).eval()
    return load_checkpoint_model(directory, device=device)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of a checkpoint or run directory, a prepared data directory, or a tokenizer.json."""
    if not isinstance(path, (str, os.PathLike)):
        raise TokenizerError(
            f"path must be a directory or a tokenizer.json (a str or os.PathLike); got {type(path).__name__}"
        )
    path = Path(path)
    if path.is_dir():
        path = resolve_checkpoint_dir(path)
        if not (path / TOKENIZER_FILE).exists():
            raise CheckpointError(f"no {TOKENIZER_FILE} in {path}")
    return _load_tokenizer_file(path)


def generate(
    model: GPT,
    tokenizer: Tokenizer,
    prompt: str,
    *,
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    stop: str | tuple[str, ...] | list[str] | None = (),
) -> Completion:
    """Complete ``prompt``; returns a Completion with ``.text``, ``.token_ids`` and ``.finish_reason``."""
    if not isinstance(getattr(model, "config", None), ModelConfig):  # a GPT, or one wrapped (torch.compile)
        raise RequestError(f"model must be a gptkit GPT (see gptkit.load); got {type(model).__name__}")
    if not isinstance(tokenizer, Tokenizer):
        raise RequestError(
            f"tokenizer must be a gptkit Tokenizer (see gptkit.load_tokenizer); got {type(tokenizer).__name__}"
        )
    if stop is None:
        stop = ()  # no stop strings, as transformers' stop_strings=None
    elif not isinstance(stop, (str, tuple, list)):
        raise ConfigError(f"stop: must be a string or a list of non-empty strings; got {stop!r}")
    sample = SampleConfig(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
        stop=(stop,) if isinstance(stop, str) else tuple(stop),  # one string is one stop string
    )
    return generate_text(model, tokenizer, prompt, sample)
