"""Training checkpoints: the model files plus everything needed to continue exactly.

    checkpoint/
      config.json              model config, the whole run config, step      (gptkit.checkpoint)
      model.safetensors        weights                                       (gptkit.checkpoint)
      tokenizer.json           copied from the prepared data
      optimizer.safetensors    optimizer tensors, flattened as "state.<param index>.<name>"
      trainer_state.json       step, optimizer hyper-parameters, data position, RNG states (base64)

The directory is written to a temporary sibling and renamed into place, so a crash while saving
leaves the previous checkpoint whole.

Under a process group of several ranks, or of one rank whose parameters are DTensors (FSDP2
under torchrun with one process), the model and optimizer go through
``torch.distributed.checkpoint`` (DCP) instead, so each rank writes its own shards (replicated
DDP tensors are written once; FSDP2/TP DTensors shard by shard):

    checkpoint/
      config.json              as above
      model.safetensors        only when the parameters are replicated (DDP): rank 0 has them whole
      tokenizer.json
      sharded/                 DCP: .metadata + __<rank>_<n>.distcp; keys "model.<name>", "optim.<...>"
      trainer_state.json       step, data position (global), every rank's RNG, "sharded": {"world_size": N}

Every rank writes into the same temporary sibling ``.checkpoint.sharded.tmp``, then rank 0
renames it into place after a collective, so **the run directory must be on a filesystem that
all ranks share** (one node's local disk, or NFS/Lustre across nodes). DCP loads into whatever
layout the resuming run has: a checkpoint from 2 DDP ranks resumes on 1 process, or on 4.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gptkit.checkpoint import (
    CHECKPOINT_DIR,
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    CONFIG_FILE,
    MODEL_PREFIX,
    PREVIOUS_CHECKPOINT,
    SHARDED_DIR,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    check_sharded_shapes,
    convert_row_order,
    dcp_failure,
    has_sharded_state,
    load_sharded,
    write_model_files,
)
from gptkit.config import to_dict
from gptkit.errors import CheckpointError, ConfigError, first_line
from gptkit.fileio import (
    atomic_directory, atomic_write_json, nearest_existing, publish_directory, restore_set_aside,
)
from gptkit.model.gpt import GPT

OPTIMIZER_FILE = "optimizer.safetensors"
TRAINER_STATE_FILE = "trainer_state.json"
# A run directory (train.out_dir): its checkpoint (CHECKPOINT_DIR) and metrics log, and where
# `--overwrite` keeps the earlier run's (PREVIOUS_CHECKPOINT, ...) until the new run's first checkpoint.
METRICS_FILE = "metrics.jsonl"
PREVIOUS_METRICS = "metrics.previous.jsonl"
TENSORBOARD_DIR = "tensorboard"  # event files, with train.tensorboard
PREVIOUS_TENSORBOARD = "tensorboard.previous"
# What --overwrite moves aside (name, aside name) until the new run's first save deletes it: the
# checkpoint first, then the run's logs.
SET_ASIDE = (
    (CHECKPOINT_DIR, PREVIOUS_CHECKPOINT), (METRICS_FILE, PREVIOUS_METRICS), (TENSORBOARD_DIR, PREVIOUS_TENSORBOARD)
)
# Why a resume finds no optimizer / trainer state, most often.
WEIGHTS_ONLY_HINT = (
    "a weights-only checkpoint, such as `gptkit convert` writes, holds no optimizer state or data position to "
    "continue from"
)


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
    tokenizer_json: bytes | None,
    extra_state: dict[str, Any] | None = None,
) -> None:
    """Atomically write a full training checkpoint for ``step`` completed steps; ``tokenizer_json``
    is the run's tokenizer.json as read when it started (None: no tokenizer file)."""
    with atomic_directory(directory) as tmp:
        write_model_files(tmp, model, {"run": run_config, "step": step})
        if tokenizer_json is not None:
            (tmp / TOKENIZER_FILE).write_bytes(tokenizer_json)
        tensors, optimizer_meta = _optimizer_tensors(optimizer)
        # Parameter names in index order, so another layout (FSDP/TP, whose optimizer may group
        # parameters differently) can map this state by name.
        names = {id(p): name for name, p in model.named_parameters()}
        optimizer_meta["param_names"] = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
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


def check_resumable(directory: Path) -> None:
    """Raise a one-line CheckpointError naming every file a resume from ``directory`` needs and
    does not find; cheap (no file is read), so a run can check before preparing data."""
    if (directory / SHARDED_DIR).is_dir() and not has_sharded_state(directory):
        raise CheckpointError(
            f"cannot resume {directory}: {SHARDED_DIR}/.metadata is missing (an interrupted save?)"
        )
    needed = [CONFIG_FILE, TRAINER_STATE_FILE] if has_sharded_state(directory) else [
        CONFIG_FILE, WEIGHTS_FILE, TRAINER_STATE_FILE, OPTIMIZER_FILE
    ]
    missing = [name for name in needed if not (directory / name).is_file()]
    if not missing:
        return
    verb = "is" if len(missing) == 1 else "are"
    hint = f" ({WEIGHTS_ONLY_HINT})" if set(missing) <= {TRAINER_STATE_FILE, OPTIMIZER_FILE} else ""
    raise CheckpointError(f"cannot resume {directory}: {' and '.join(missing)} {verb} missing{hint}")


def read_trainer_state(directory: Path, *, optimizer: bool = True) -> dict[str, Any]:
    """``trainer_state.json`` of ``directory``, checked for the entries a resume reads ("step",
    "data", "rng", and "optimizer" unless ``optimizer`` is False); one-line CheckpointErrors."""
    path = directory / TRAINER_STATE_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(
            f"cannot resume {directory}: {TRAINER_STATE_FILE} is missing ({WEIGHTS_ONLY_HINT})"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"cannot resume {directory}: {TRAINER_STATE_FILE} is corrupt ({first_line(exc)})"
        ) from None
    problem = None
    if not isinstance(state, dict):
        problem = "not a JSON object"
    elif type(state.get("step")) is not int or state["step"] < 0:
        problem = f"\"step\" must be a non-negative integer, got {state.get('step')!r}"
    elif not isinstance(state.get("data"), dict):
        problem = "no \"data\" position"
    elif not isinstance(state.get("rng"), dict) or not isinstance(state["rng"].get("torch"), str):
        problem = "no \"rng\" state"
    elif optimizer and not isinstance(state.get("optimizer"), dict):
        problem = "no \"optimizer\" entry"
    if problem is not None:
        raise CheckpointError(f"cannot resume {directory}: {TRAINER_STATE_FILE} is corrupt ({problem})")
    return state


def _read_tensors(directory: Path, name: str) -> dict[str, torch.Tensor]:
    """A safetensors file of a checkpoint, or a one-line CheckpointError naming it."""
    path = directory / name
    if not path.is_file():
        hint = f" ({WEIGHTS_ONLY_HINT})" if name == OPTIMIZER_FILE else ""
        raise CheckpointError(f"cannot resume {directory}: {name} is missing{hint}")
    try:
        return load_file(str(path))
    except (OSError, SafetensorError, ValueError) as exc:
        raise CheckpointError(f"cannot resume {directory}: {name} is corrupt ({first_line(exc)})") from None


def _restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(_decode_rng(state["rng"]["torch"]))
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_decode_rng(s) for s in state["rng"]["cuda"]])


def recorded_step(directory: Path) -> int | None:
    """The step a checkpoint directory says it is at (trainer_state.json, else config.json), or
    None when neither can be read; for messages, never raises."""
    for name in (TRAINER_STATE_FILE, CONFIG_FILE):
        try:
            step = json.loads((directory / name).read_text(encoding="utf-8")).get("step")
        except (OSError, UnicodeDecodeError, ValueError, AttributeError):
            continue
        if type(step) is int:
            return step
    return None


def check_run_directory(out_dir: str | Path, *, resume: bool, overwrite: bool) -> int | None:
    """Refuse, before any data preparation or training, a ``train.out_dir`` a run cannot use.

    A path that is (or lies inside) a file, or cannot be written, is a ConfigError. Without
    ``resume`` a checkpoint already there is a ConfigError unless ``overwrite`` (``start_run`` then
    sets it aside); with ``resume`` the checkpoint must be there and complete
    (CheckpointError naming each missing file). Returns the step of the checkpoint found, if any.
    """
    out = Path(out_dir)
    if resume and overwrite:
        raise ConfigError(
            "--resume and --overwrite contradict each other: resume continues the checkpoint in "
            f"train.out_dir {out}, overwrite starts over in it; pass one of them"
        )
    nearest = nearest_existing(out)  # out itself, or where it will be made
    if nearest is not None:
        if not nearest.is_dir():
            where = "is a file" if nearest == out else f"lies inside {nearest}, which is a file"
            raise ConfigError(f"train.out_dir {out} {where}, not a directory; give a directory for the run")
        if not os.access(nearest, os.W_OK | os.X_OK):
            raise ConfigError(f"train.out_dir {out}: cannot write in {nearest} (permission denied)")
    if (out / METRICS_FILE).is_dir():
        raise ConfigError(f"train.out_dir {out}: {out / METRICS_FILE} is a directory, not a file; remove it")
    checkpoint = out / CHECKPOINT_DIR
    restore_set_aside(checkpoint)  # a save that died between its two renames
    exists = checkpoint.exists() or checkpoint.is_symlink()
    previous = out / PREVIOUS_CHECKPOINT
    if not exists and previous.is_dir() and not overwrite:
        # An --overwrite run stopped before its first save: the earlier run waits here, and the
        # next save of any run in this directory would delete it (Trainer._drop_previous_run).
        step = recorded_step(previous)
        at = f" (step {step})" if step is not None else ""
        # Its logs wait beside it and go at the next save (they look like an --overwrite's leftovers):
        # renamed back with it, a resume continues them instead of the stopped run's.
        logs = [
            f"{aside} to {name}"
            for name, aside in SET_ASIDE[1:]
            if (out / aside).exists()
        ]
        with_logs = f" (and {', '.join(logs)}, in place of the stopped run's)" if logs else ""
        raise (CheckpointError if resume else ConfigError)(
            f"train.out_dir {out} holds an earlier run's checkpoint{at} in {previous}, set aside by an "
            f"--overwrite run that stopped before its first save; rename it back to {checkpoint}{with_logs} "
            f"{'to resume it' if resume else 'and pass --resume to continue it'}, or pass --overwrite to start over"
        )
    if resume:
        if not checkpoint.is_dir():
            raise CheckpointError(f"nothing to resume: no checkpoint at {checkpoint}")
        check_resumable(checkpoint)
        return read_trainer_state(checkpoint, optimizer=not has_sharded_state(checkpoint))["step"]
    if not exists:
        return None
    step = recorded_step(checkpoint)
    at = f" (step {step})" if step is not None else ""
    if not overwrite:
        raise ConfigError(
            f"train.out_dir {out} already holds a checkpoint{at}; "
            "pass --resume to continue it or --overwrite to start over"
        )
    return step


def load_training_state(directory: Path, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore optimizer and RNG states from ``directory``; return the trainer state dict."""
    state = read_trainer_state(directory)
    tensors = _read_tensors(directory, OPTIMIZER_FILE)
    # The hyper-parameters (weight decay, betas, eps, Muon momentum, ...) are this run's, as in the
    # sharded loaders: a resume may override them (`--resume --train.weight_decay=0`) and the
    # checkpoint it writes records the run config, so the optimizer must follow that config.
    # Loading the saved groups first still checks that the grouping fits (adamw vs muon).
    current = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    try:
        optimizer.load_state_dict(_optimizer_state_dict(tensors, state["optimizer"]))
        check_optimizer_state(optimizer)
        for group, hyper in zip(optimizer.param_groups, current, strict=True):
            group.update(hyper)
        _restore_rng(state)
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
        raise CheckpointError(
            f"cannot resume {directory}: training state does not fit this run ({first_line(exc)})"
        ) from None
    return state


def _needed_state(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> set[str]:
    """The per-parameter entries the step of ``group`` reads once a parameter has state."""
    from gptkit.train.muon import MuonWithAdamW

    if isinstance(optimizer, MuonWithAdamW) and group.get("use_muon"):
        return {"momentum_buffer"}
    if isinstance(optimizer, (torch.optim.AdamW, MuonWithAdamW)):
        return {"step", "exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if group.get("amsgrad") else set())
    return set()


def check_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """ValueError unless the state just loaded fits the parameters: every entry the step reads is
    there, and every tensor (but a scalar step) has its parameter's shape. ``load_state_dict``
    checks neither, and the fused AdamW kernel would read past a tensor of another shape. The
    message names the entry as optimizer.safetensors does: ``state.<parameter index>.<name>``."""
    index = 0
    for group in optimizer.param_groups:
        needed = _needed_state(optimizer, group)
        for param in group["params"]:
            state = optimizer.state.get(param)
            if state:  # none yet: the step makes it
                missing = sorted(needed - set(state))
                if missing:
                    raise ValueError(f"no state.{index}.{missing[0]}")
                for name, value in state.items():
                    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != param.shape:
                        raise ValueError(
                            f"state.{index}.{name} has shape {tuple(value.shape)}, its parameter {tuple(param.shape)}"
                        )
            index += 1


# ---------------------------------------------------------------------------------- sharded (DCP)


def is_replicated(model: torch.nn.Module) -> bool:
    """True when every parameter is a whole tensor on this rank (single process or DDP), False
    when some are DTensor shards (FSDP2 / TP)."""
    from torch.distributed.tensor import DTensor

    return not any(isinstance(p, DTensor) for p in model.parameters())


def tp_row_order(model: torch.nn.Module) -> int:
    """The TP degree whose fused-row grouping ``model``'s global qkv/up tensors are in (1: none)."""
    blocks = getattr(model, "blocks", None)
    return int(getattr(blocks[0], "_gptkit_tp", 1)) if blocks is not None and len(blocks) else 1


def _convert_optim_rows(optim_state: dict[str, Any], config: Any, from_tp: int, to_tp: int) -> None:
    for name, values in optim_state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                values[key] = convert_row_order(name, value, config, from_tp, to_tp)


def _rng_state() -> dict[str, Any]:
    rng: dict[str, Any] = {"torch": _encode_rng(torch.get_rng_state())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = [_encode_rng(s) for s in torch.cuda.get_rng_state_all()]
    return rng


def save_sharded_training_checkpoint(
    directory: Path,
    *,
    model: GPT,
    optimizer: torch.optim.Optimizer,
    step: int,
    run_config: dict[str, Any],
    data_state: dict[str, Any],
    tokenizer_json: bytes | None,
    extra_state: dict[str, Any] | None = None,
) -> None:
    """Write a checkpoint with DCP from every rank of the process group (a collective: all ranks
    call it with the same ``directory``). Atomic like the single-process one: all ranks write
    into one temporary sibling, which rank 0 renames into place once everyone has finished."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict

    rank, world_size = dist.get_rank(), dist.get_world_size()
    tmp = directory.with_name(f".{directory.name}.sharded.tmp")
    if rank == 0:
        if tmp.exists():  # left by a crash during an earlier save
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    dist.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    try:
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp / SHARDED_DIR))
    except CheckpointException as exc:
        # A rank could not write its shards (a full disk, a vanished folder): DCP raises this on
        # every rank together, as a BaseException holding each rank's traceback. Raise the failing
        # rank's own error instead (an OSError is what Trainer.save_checkpoint reports in one line).
        failure = dcp_failure(exc)
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(failure, OSError):
            raise failure from None
        raise CheckpointError(f"cannot save the sharded checkpoint {directory}: {first_line(failure)}") from None
    error: list[str | None] = [None]
    failure: Exception | None = None
    if rank == 0:
        try:
            sharded = {"world_size": world_size, "tp_row_order": tp_row_order(model)}
            extra_config = {"run": run_config, "step": step, "sharded": sharded}
            if is_replicated(model):  # rank 0 holds every weight: the single file costs little
                write_model_files(tmp, model, extra_config)
            else:
                atomic_write_json(
                    tmp / CONFIG_FILE,
                    {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "model": to_dict(model.config),
                     **extra_config},
                )
            if tokenizer_json is not None:
                (tmp / TOKENIZER_FILE).write_bytes(tokenizer_json)
            atomic_write_json(
                tmp / TRAINER_STATE_FILE,
                {
                    "step": step,
                    "data": data_state,
                    "rng": _rng_state(),
                    "sharded": sharded,
                    **(extra_state or {}),
                },
            )
            publish_directory(tmp, directory)
        except Exception as exc:  # tell the other ranks, so they fail too instead of waiting
            error[0], failure = f"{type(exc).__name__}: {exc}", exc
            shutil.rmtree(tmp, ignore_errors=True)
    dist.broadcast_object_list(error, src=0)  # nobody runs ahead of the rename
    dist.barrier()  # the broadcast can return on rank 0 first; leave the save together
    if error[0] is not None:
        if failure is not None:
            raise failure
        raise CheckpointError(f"rank 0 failed to save the checkpoint {directory}: {error[0]}")


def load_sharded_training_state(directory: Path, model: GPT, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Load model and optimizer from ``directory/sharded`` into this run's layout (any number of
    processes, one without a process group included) and restore RNG; return the trainer state."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    state = read_trainer_state(directory, optimizer=False)
    shard_dir = directory / SHARDED_DIR
    saved_tp, here_tp = int((state.get("sharded") or {}).get("tp_row_order", 1)), tp_row_order(model)
    reorder = saved_tp != here_tp
    # Another TP degree permutes the fused rows globally, which DCP's resharding cannot express:
    # then every rank loads whole tensors, converts the row order, and keeps its shard.
    options = StateDictOptions(full_state_dict=reorder and not is_replicated(model))
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    check_sharded_shapes(shard_dir, {MODEL_PREFIX + k: v for k, v in model_state.items()}, "model")
    # The optimizer's grouping follows this run's layout (TP/FSDP split groups by device mesh, so
    # a DDP run has 2 groups where a TP run has 4), and its hyper-parameters come from the run
    # config (lr is set every step): read only the per-parameter state (keyed by name) from the
    # checkpoint, never its param_groups, and keep this run's.
    current_groups = copy.deepcopy(optim_state["param_groups"])
    everything = {"model": model_state, "optim": {"state": optim_state["state"]}}
    load_sharded(everything, shard_dir)
    everything["optim"]["param_groups"] = current_groups
    if reorder:
        config = model.config
        everything["model"] = {k: convert_row_order(k, v, config, saved_tp, here_tp) for k, v in model_state.items()}
        _convert_optim_rows(everything["optim"], config, saved_tp, here_tp)
    try:
        set_state_dict(
            model, optimizer, model_state_dict=everything["model"], optim_state_dict=everything["optim"], options=options
        )
        _restore_rng(state)
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"cannot resume {directory}: training state does not fit this run ({first_line(exc)})"
        ) from None
    return state


def load_full_training_state_sharded(directory: Path, model: GPT, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Resume a single-file checkpoint (model.safetensors + optimizer.safetensors, written by one
    process) into a model whose parameters are DTensor shards (FSDP2 / TP): every rank reads the
    full tensors and ``set_state_dict`` keeps its own shard. Returns the trainer state."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    state = read_trainer_state(directory)
    weights = _read_tensors(directory, WEIGHTS_FILE)
    tensors = _read_tensors(directory, OPTIMIZER_FILE)
    if model.config.tie_embeddings and "lm_head.weight" not in weights and "token_embedding.weight" in weights:
        weights["lm_head.weight"] = weights["token_embedding.weight"]
    expected = model.state_dict()
    for name, tensor in expected.items():
        if name not in weights:
            raise CheckpointError(f"{directory / WEIGHTS_FILE} does not fit this model: no tensor {name}")
        if tuple(weights[name].shape) != tuple(tensor.shape):  # a DTensor's shape is the global one
            raise CheckpointError(
                f"{directory / WEIGHTS_FILE}: tensor {name} has shape {tuple(weights[name].shape)}, "
                f"this model needs {tuple(tensor.shape)}"
            )
    here_tp = tp_row_order(model)
    weights = {k: convert_row_order(k, v, model.config, 1, here_tp) for k, v in weights.items()}
    # The single-process optimizer state is keyed by parameter index (order of param_groups);
    # set_state_dict wants parameter names. Same recipe, same groups, same order.
    names = {id(p): name for name, p in model.named_parameters()}
    try:
        ordered = state["optimizer"].get("param_names") or [
            names[id(p)] for group in optimizer.param_groups for p in group["params"]  # older checkpoints
        ]
        by_index = _optimizer_state_dict(tensors, state["optimizer"])
        optim_state = {
            "state": {ordered[int(i)]: values for i, values in by_index["state"].items()},
            # This run's grouping (split by device mesh) and hyper-parameters; see above.
            "param_groups": [
                {**{k: v for k, v in group.items() if k != "params"}, "params": [names[id(p)] for p in group["params"]]}
                for group in optimizer.param_groups
            ],
        }
        _convert_optim_rows(optim_state, model.config, 1, here_tp)
        set_state_dict(
            model,
            optimizer,
            model_state_dict=weights,
            optim_state_dict=optim_state,
            options=StateDictOptions(full_state_dict=True),
        )
        torch.set_rng_state(_decode_rng(state["rng"]["torch"]))
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
        raise CheckpointError(
            f"cannot resume {directory}: training state does not fit this run ({first_line(exc)})"
        ) from None
    return state
