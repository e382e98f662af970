"""The on-disk model checkpoint: a directory with

    config.json         {"format": "gptkit-checkpoint", "version": 1, "model": {...}, ...}
    model.safetensors   the weights (a tied LM head is stored once, as the token embedding)
    tokenizer.json      the tokenizer, when the model has one
    sharded/            (runs on several processes) torch.distributed.checkpoint shards of the
                        model and optimizer, keys "model.<name>" and "optim.…"

A checkpoint written by several processes always has sharded/; it has model.safetensors too when
the parameters were replicated (DDP), since rank 0 then holds them whole. When it has only
sharded/ (FSDP/TP), :func:`load_checkpoint_model` consolidates the shards in this one process,
transparently; ``gptkit convert <run> <out> --to gptkit`` does it once and writes the single file.

The trainer adds its own files (optimizer, RNG and data position) beside these; everything that
only needs the model (generate, serve, evaluate) reads just the three above.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gptkit.config import ModelConfig, build_dataclass, to_dict
from gptkit.errors import CheckpointError, ConfigError, first_line
from gptkit.fileio import atomic_write_json
from gptkit.model.gpt import GPT
from gptkit.plan import check_fits_in_memory

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "gptkit-checkpoint"
CHECKPOINT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
SHARDED_DIR = "sharded"
MODEL_PREFIX = "model."  # keys of the model's tensors inside sharded/
# A run directory (train.out_dir) holds its checkpoint here; `--overwrite` keeps the earlier run's in
# PREVIOUS_CHECKPOINT until the new run's first save.
CHECKPOINT_DIR = "checkpoint"
PREVIOUS_CHECKPOINT = "checkpoint.previous"


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


def _missing_config_hint(directory: Path) -> str:
    """What a directory without config.json may be instead of a checkpoint, for the error."""
    aside = directory / PREVIOUS_CHECKPOINT
    if (aside / CONFIG_FILE).is_file():
        return (
            f"; it holds an earlier run's checkpoint in {aside}, set aside by an --overwrite run that stopped "
            f"before its first save: rename it to {directory / CHECKPOINT_DIR} to use it"
        )
    return f" (give a checkpoint directory, or a run directory that holds {CHECKPOINT_DIR}/)"


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
        raise CheckpointError(f"checkpoint {directory} has no {CONFIG_FILE}{_missing_config_hint(directory)}") from None
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


# ---------------------------------------------------------------------------------- TP row order
#
# Tensor parallelism regroups the rows of fused projections (qkv = [q, k, v], swiglu up =
# [gate, up]) so that TP rank r's contiguous block holds [q_r, k_r, v_r]; the *global* tensor of a
# TP run is then in "row order tp". A sharded checkpoint records that degree ("tp_row_order" in
# config.json and trainer_state.json) and readers convert: canonical = saved[argsort(order(tp))].


def fused_row_order(sizes: list[int], tp: int) -> torch.Tensor:
    """Index ``new = old[order]`` that regroups parts of ``sizes`` rows as [p0_0, p1_0, ..., p0_1, ...]
    (part_r = r-th of tp equal slices of each part); the identity for tp = 1."""
    offsets = [0]
    for size in sizes[:-1]:
        offsets.append(offsets[-1] + size)
    order = [
        torch.arange(start + r * (size // tp), start + (r + 1) * (size // tp))
        for r in range(tp)
        for start, size in zip(offsets, sizes)
    ]
    return torch.cat(order)


def _fused_sizes(name: str, rows: int, config: ModelConfig) -> list[int] | None:
    if name.endswith(("attn.qkv.weight", "attn.qkv.bias")):
        return [config.n_head * config.head_dim, config.kv_heads * config.head_dim, config.kv_heads * config.head_dim]
    if config.mlp == "swiglu" and name.endswith(("mlp.up.weight", "mlp.up.bias")):
        return [rows // 2, rows // 2]
    return None


def convert_row_order(name: str, tensor: torch.Tensor, config: ModelConfig, from_tp: int, to_tp: int) -> torch.Tensor:
    """``tensor`` (a full parameter, or optimizer state shaped like it) in row order ``to_tp``."""
    if from_tp == to_tp or tensor.dim() == 0:
        return tensor
    sizes = _fused_sizes(name, tensor.shape[0], config)
    if sizes is None:
        return tensor
    to_canonical = torch.argsort(fused_row_order(sizes, from_tp))
    return tensor[to_canonical[fused_row_order(sizes, to_tp)]]


def has_sharded_state(directory: Path) -> bool:
    return (directory / SHARDED_DIR / ".metadata").is_file()


def read_sharded_metadata(shard_dir: Path) -> dict[str, Any]:
    """DCP's index of ``shard_dir``: key -> storage metadata (``.size`` for tensors)."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        return dict(FileSystemReader(str(shard_dir)).read_metadata().state_dict_metadata)
    except FileNotFoundError:
        raise CheckpointError(f"sharded checkpoint {shard_dir} has no .metadata (incomplete save?)") from None
    except Exception as exc:  # DCP raises assorted pickle/OS errors for damaged files
        raise CheckpointError(f"corrupt sharded checkpoint {shard_dir}: {type(exc).__name__}: {exc}") from None


def check_sharded_shapes(shard_dir: Path, expected: dict[str, Any], what: str) -> None:
    """Raise a one-line CheckpointError when a key of ``expected`` (name -> tensor with the
    global shape) is missing in ``shard_dir`` or has another shape there."""
    stored = read_sharded_metadata(shard_dir)
    for key, tensor in expected.items():
        if not isinstance(tensor, torch.Tensor):
            continue
        if key not in stored:
            raise CheckpointError(f"{shard_dir} does not fit this {what}: no tensor {key}")
        size = getattr(stored[key], "size", None)
        if size is None:
            raise CheckpointError(f"{shard_dir} does not fit this {what}: {key} is not a tensor there")
        if tuple(size) != tuple(tensor.shape):
            raise CheckpointError(
                f"{shard_dir}: tensor {key} has shape {tuple(size)}, this {what} needs {tuple(tensor.shape)}"
            )


def dcp_failure(exc: BaseException) -> BaseException:
    """The exception behind a DCP ``CheckpointException`` (that of the lowest failing rank): its
    own message is a header line followed by every rank's traceback."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        inner = failures[min(failures)]
        return inner[0] if isinstance(inner, tuple) else inner
    return exc


def load_sharded(state: dict[str, Any], shard_dir: Path) -> None:
    """``dcp.load`` into ``state`` in place, in the current layout (any number of processes,
    including one without a process group); errors become one-line CheckpointErrors."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
            dcp.load(state, checkpoint_id=str(shard_dir))
    # CheckpointException (a shard file missing or unreadable on some rank) derives from
    # BaseException, not Exception, so it is named here; DCP raises it on every rank together.
    except (Exception, CheckpointException) as exc:
        raise CheckpointError(f"cannot read sharded checkpoint {shard_dir}: {first_line(dcp_failure(exc))}") from None


def load_sharded_model_weights(model: GPT, directory: Path) -> None:
    """Gather the model's tensors from ``directory/sharded`` into ``model`` (plain, one process)."""
    shard_dir = directory / SHARDED_DIR
    state = {MODEL_PREFIX + name: tensor for name, tensor in model.state_dict().items()}
    check_sharded_shapes(shard_dir, state, "model config")
    load_sharded(state, shard_dir)
    from_tp = int((read_checkpoint_config(directory).get("sharded") or {}).get("tp_row_order", 1))
    model.load_state_dict(
        {key[len(MODEL_PREFIX):]: convert_row_order(key[len(MODEL_PREFIX):], t, model.config, from_tp, 1)
         for key, t in state.items()}
    )


def load_checkpoint_model(path: str | Path, *, device: str | torch.device = "cpu") -> GPT:
    """A GPT in eval mode from a gptkit checkpoint directory (single file, or sharded only)."""
    directory = Path(path)
    config = read_checkpoint_config(directory)
    model_config = model_config_from_checkpoint(config, directory)
    try:  # before building it: a hand-edited shape could otherwise take the machine's memory
        check_fits_in_memory(model_config, trains_here=False, advice="the checkpoint cannot be loaded here")
    except ConfigError as exc:
        raise CheckpointError(f"{directory / CONFIG_FILE}: {exc}") from None
    model = GPT(model_config)
    if not (directory / WEIGHTS_FILE).exists() and has_sharded_state(directory):
        logger.info(
            "%s has sharded weights only; consolidating them in this process "
            "(`gptkit convert %s OUT --to gptkit` does it once)", directory, directory,
        )
        load_sharded_model_weights(model, directory)
    else:
        load_model_weights(model, directory / WEIGHTS_FILE)
    return model.to(device).eval()
