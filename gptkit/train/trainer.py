"""One Trainer for every recipe: it takes a model, a source of batches and a loss function.

Pretraining passes ``causal_lm_loss``; finetuning recipes pass their own loss (masked SFT loss,
classification loss) and their own batches, and get the same schedule, accumulation, clipping,
evaluation, metrics log and exact-resume checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn

from gptkit.checkpoint import WEIGHTS_FILE, has_sharded_state, load_model_weights
from gptkit.config import SHARDED_STRATEGIES, TrainConfig
from gptkit.distributed.parallelize import clip_grad_norm, parallelize
from gptkit.distributed.precision import PrecisionPolicy
from gptkit.distributed.setup import barrier, max_over_ranks, mean_over_ranks
from gptkit.errors import CheckpointError, GptkitError, TrainingError, first_line, reason
from gptkit.fileio import atomic_write_text
from gptkit.model import fused_trunk
from gptkit.train import tensorboard
from gptkit.train.checkpointing import (
    CHECKPOINT_DIR,
    METRICS_FILE,
    PREVIOUS_CHECKPOINT,
    SET_ASIDE,
    TENSORBOARD_DIR,
    _decode_rng,
    _encode_rng,
    is_replicated,
    load_full_training_state_sharded,
    load_sharded_training_state,
    load_training_state,
    save_sharded_training_checkpoint,
    save_training_checkpoint,
)
from gptkit.train.optim import build_optimizer
from gptkit.train.schedule import learning_rate

logger = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]


class BatchSource(Protocol):
    """What the trainer needs from a data loader: batches and a resumable position."""

    def next_batch(self) -> Batch: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def causal_lm_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean next-token cross-entropy; batch = (inputs, targets), both (B, T) token ids."""
    inputs, targets = batch
    logits = model(inputs)  # (B, T, V)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


@dataclass(frozen=True)
class StepMetrics:
    step: int  # steps completed, counting this one
    loss: float
    lr: float
    grad_norm: float
    tokens_per_second: float
    val_loss: float | None = None


@dataclass(frozen=True)
class TrainSummary:
    """What one call of :meth:`Trainer.fit` did. ``steps_trained == 0`` means nothing was left to
    train (a resumed run already at ``max_steps`` or past its ``max_seconds``): then
    ``final_loss`` and ``final_val_loss`` are None and ``tokens_per_second`` is 0."""

    steps: int  # steps completed by the run, this call's included
    final_loss: float | None  # train loss of the last step of this call; None if it trained none
    final_val_loss: float | None  # val loss of this call's last step, when evaluated there
    tokens_per_second: float
    seconds: float
    steps_trained: int  # steps run by this call


class Trainer:
    """Runs optimisation steps from ``start_step`` to ``config.max_steps``.

    ``config.strategy``, ``activation_checkpointing`` and ``compile`` are applied to ``model`` from
    outside (:func:`gptkit.distributed.parallelize`); ``config.precision`` picks the autocast dtype
    and loss scaling. Under several processes only rank 0 (``is_main``) writes metrics and
    checkpoints; the reported loss is the mean over ranks.
    """

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        *,
        train_batches: BatchSource,
        val_batches: Sequence[Batch] = (),
        loss_fn: LossFn = causal_lm_loss,
        out_dir: str | Path | None = None,
        run_config: dict[str, Any] | None = None,
        tokenizer_path: Path | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.model = model.to(device)
        self.config = config
        self.train_batches = train_batches
        self.val_batches = list(val_batches)
        self.loss_fn = loss_fn
        self.device = torch.device(device)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.run_config = run_config or {}
        # Read now, not at each save: the prepared data may be deleted or prepared anew (another
        # corpus) while the run goes on, and its checkpoints must keep the tokenizer it trains with.
        self._tokenizer_json: bytes | None = None
        if tokenizer_path is not None:
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                self._tokenizer_json = Path(tokenizer_path).read_bytes()
        # forward_model (DDP / compiled) shares parameters with self.model; checkpoints save self.model.
        # Parallelize before building the optimizer: fsdp/tp replace parameters with DTensors.
        self.forward_model: nn.Module = parallelize(self.model, config, self.device)
        self.optimizer = build_optimizer(self.model, config)
        self.step = 0
        self.train_seconds = 0.0  # wall-clock spent in fit() over all sessions of this run
        self.current_lr = 0.0
        self.skipped_steps = 0  # fp16 steps skipped for inf/nan gradients, this session
        self._batch_shape: tuple[int, int] | None = None  # (B, T) of the last micro-batch, for tokens/s
        self.last_checkpoint_step: int | None = None  # of this run (resumed from or saved), for messages
        # A run that did not resume starts metrics.jsonl afresh: the first record replaces any
        # file an earlier run left there instead of appending to its log.
        self._metrics_continue = False
        # Sharded gradients: fp16 overflow checks must agree over all ranks (see PrecisionPolicy).
        self.precision = PrecisionPolicy(config.precision, self.device, sharded=config.strategy in SHARDED_STRATEGIES)
        self.is_main = not dist.is_initialized() or dist.get_rank() == 0
        if config.tensorboard and self.out_dir is not None:
            # Now, not at the first log line after minutes of work; on every rank, though only rank 0
            # writes events: a rank that raised alone would leave the others waiting in a collective.
            tensorboard.check_available()
        self._tensorboard: tensorboard.TensorBoardLog | None = None  # opened at the first record
        self._resumed_at: int | None = None  # the step this session resumed from
        self.run_lock: Any = None  # the run directory's lock, set by start_run; fit releases it

    # ------------------------------------------------------------------ paths

    @property
    def checkpoint_dir(self) -> Path | None:
        return self.out_dir / CHECKPOINT_DIR if self.out_dir is not None else None

    @property
    def metrics_path(self) -> Path | None:
        return self.out_dir / METRICS_FILE if self.out_dir is not None else None

    # ------------------------------------------------------------------ resume

    def resume(self, checkpoint_dir: str | Path) -> None:
        """Continue from a checkpoint: weights, optimizer, RNG, data position and step."""
        directory = Path(checkpoint_dir)
        if has_sharded_state(directory):
            # Saved by several ranks: DCP reshards into this run's layout (any world size).
            state = load_sharded_training_state(directory, self.model, self.optimizer)  # type: ignore[arg-type]
        elif not is_replicated(self.model):
            # One process wrote whole tensors; this run shards them (FSDP2 / TP).
            state = load_full_training_state_sharded(directory, self.model, self.optimizer)  # type: ignore[arg-type]
        else:
            load_model_weights(self.model, directory / WEIGHTS_FILE)
            state = load_training_state(directory, self.optimizer)
        try:
            self.train_batches.load_state_dict(state["data"])
            self.step = int(state["step"])
            self.train_seconds = float(state.get("train_seconds", 0.0))
            self.precision.load_state_dict(state.get("grad_scaler") or {})
            self._restore_rank_rng(state.get("rank_rng"))
        except (GptkitError, KeyError, IndexError, TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(
                f"cannot resume {directory}: trainer_state.json does not fit this run ({first_line(exc)})"
            ) from None
        self.last_checkpoint_step = self.step
        self._resumed_at = self.step
        if self.is_main:
            self._truncate_metrics(self.step)
        self._metrics_continue = True
        barrier()  # no rank appends metrics before rank 0 has truncated them
        logger.info("resumed from %s at step %d", directory, self.step)

    def _truncate_metrics(self, step: int) -> None:
        """Drop metric records written after the checkpoint, so the log reads as one run."""
        path = self.metrics_path
        if path is None or not path.exists():
            return
        kept = []
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
                record_step = int(record["step"])
            except (ValueError, TypeError, KeyError):  # blank, or torn by a crash mid-write
                if line.strip():
                    logger.warning("%s: dropping an unreadable record %r", path, line[:80])
                continue
            if record_step <= step:
                kept.append(line)
        atomic_write_text(path, "".join(line + "\n" for line in kept))

    # ------------------------------------------------------------------ loop

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean loss over the validation batches (the same batches every time), averaged over ranks
        (a collective under several processes: every rank must hold as many batches)."""
        if not self.val_batches:
            return None
        self.model.eval()
        with self.precision.autocast():
            losses = [
                float(self.loss_fn(self.forward_model, (x.to(self.device), y.to(self.device))))
                for x, y in self.val_batches
            ]
        self.model.train()
        # Under data parallelism each rank holds its share of the set (see eval_batches), or the same
        # batches as the others: either way the mean over ranks is the loss over the whole set.
        return mean_over_ranks(sum(losses) / len(losses))

    def time_progress(self) -> float | None:
        """Fraction of the wall-clock budget used, or None when the schedule counts steps
        (no budget, or lr_decay_steps given explicitly)."""
        if self.config.max_seconds is None or self.config.lr_decay_steps is not None:
            return None
        return self.train_seconds / self.config.max_seconds

    def train_step(self) -> tuple[float, float]:
        """One optimizer step over grad_accum_steps micro-batches; returns (loss, grad norm)."""
        config = self.config
        lr = learning_rate(self.step, config, self.time_progress())
        self.current_lr = lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total_loss = 0.0
        no_sync = getattr(self.forward_model, "no_sync", None)  # DDP: all-reduce on the last micro-batch only
        for micro in range(config.grad_accum_steps):
            x, y = self.train_batches.next_batch()
            self._batch_shape = (int(x.shape[0]), int(x.shape[-1]) if x.dim() > 1 else 1)
            last = micro == config.grad_accum_steps - 1
            with no_sync() if no_sync is not None and not last else contextlib.nullcontext():
                with self.precision.autocast():
                    loss = self.loss_fn(self.forward_model, (x.to(self.device), y.to(self.device)))
                self.precision.backward(loss / config.grad_accum_steps)
            total_loss += float(loss.detach()) / config.grad_accum_steps
        # Divergence is decided on values every rank shares, so all ranks raise together and none
        # waits in a collective: the loss is all-reduced here (one rank's nan makes the mean nan),
        # and the gradient norm comes from gradients DDP has all-reduced, from DTensor shards whose
        # norm clip_grad_norm reduces over the mesh, or from TP's replicated (equal) gradients.
        total_loss = mean_over_ranks(total_loss)
        if not math.isfinite(total_loss):
            self.optimizer.zero_grad(set_to_none=True)  # no step: the weights stay as they were
            raise self._diverged(f"loss is {total_loss}", self.step + 1)
        self.precision.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
        grad_norm = clip_grad_norm(self.model.parameters(), config.grad_clip)  # also over DTensors
        # With an fp16 loss scaler an inf/nan gradient is an overflow that the scaler skips (below);
        # without one it would write inf/nan into the weights.
        if self.precision.scaler is None and not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise self._diverged(f"gradient norm is {grad_norm} (loss {total_loss:.4f})", self.step + 1)
        if not self.precision.step(self.optimizer):
            self.skipped_steps += 1
            logger.warning(
                "step %d: gradients overflowed in fp16; step skipped, loss scale now %g",
                self.step + 1,
                self.precision.loss_scale,
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return total_loss, grad_norm

    def fit(self, on_step: Callable[[StepMetrics], None] | None = None) -> TrainSummary:
        """Train until ``max_steps``; evaluate, log and checkpoint on the configured intervals.

        Releases the run directory's lock (``run_lock``, from :func:`gptkit.train.start_run`) when
        it returns or fails."""
        try:
            return self._fit(on_step)
        finally:
            fused_trunk.release_arenas()  # the fused trunk's activation buffers (CPU training)
            if self._tensorboard is not None:
                self._tensorboard.close()
                self._tensorboard = None
            if self.run_lock is not None:
                self.run_lock.release()
                self.run_lock = None

    def _fit(self, on_step: Callable[[StepMetrics], None] | None) -> TrainSummary:
        config = self.config
        self.model.train()
        start = time.perf_counter()
        seconds_before = self.train_seconds
        start_step = self.step
        tokens_per_step = 0
        loss: float | None = None
        val_loss: float | None = None
        window_start, window_tokens = time.perf_counter(), 0
        while self.step < config.max_steps and not self._out_of_time():
            loss, grad_norm = self.train_step()
            elapsed = time.perf_counter() - start
            if config.max_seconds is not None:
                # Each rank's clock started at its own moment: under a wall-clock budget all ranks
                # take the longest, so that they set the same learning rate (time_progress) and stop
                # at the same step; a rank that stopped alone would leave the others in a collective.
                elapsed = max_over_ranks(elapsed)
            self.train_seconds = seconds_before + elapsed
            if tokens_per_step == 0:
                x_shape = self.train_batches_shape()
                # Global throughput: every rank consumes its own micro-batches.
                # Data-parallel replicas see different tokens; tensor-parallel ranks share theirs.
                world_size = dist.get_world_size() if dist.is_initialized() else 1
                data_parallel = world_size // config.tp_size if config.strategy == "fsdp+tp" else (
                    1 if config.strategy == "tp" else world_size
                )
                tokens_per_step = x_shape[0] * x_shape[1] * config.grad_accum_steps * data_parallel
            window_tokens += tokens_per_step
            now = time.perf_counter()
            tokens_per_second = window_tokens / max(now - window_start, 1e-9)

            is_last = self.step == config.max_steps or self._out_of_time()
            val_loss = None
            if (config.eval_interval and self.step % config.eval_interval == 0) or is_last:
                val_loss = self.evaluate()
            metrics = StepMetrics(
                step=self.step,
                loss=loss,
                lr=self.current_lr,
                grad_norm=grad_norm,
                tokens_per_second=tokens_per_second,
                val_loss=val_loss,
            )
            if self.step % config.log_interval == 0 or val_loss is not None or is_last:
                self._log(metrics)
                window_start, window_tokens = time.perf_counter(), 0
            if (config.checkpoint_interval and self.step % config.checkpoint_interval == 0) or is_last:
                self.save_checkpoint()
            if on_step is not None:
                on_step(metrics)
        seconds = time.perf_counter() - start
        steps_done = self.step - start_step
        return TrainSummary(
            steps=self.step,
            final_loss=loss,
            final_val_loss=val_loss,
            tokens_per_second=steps_done * tokens_per_step / max(seconds, 1e-9),
            seconds=seconds,
            steps_trained=steps_done,
        )

    def _diverged(self, what: str, step: int) -> TrainingError:
        """The one-line error for a run that produced inf/nan at ``step``."""
        if self.checkpoint_dir is None:
            where = ""
        elif self.last_checkpoint_step is None:
            where = f" (no checkpoint of this run was saved to {self.checkpoint_dir})"
        else:
            where = f" (the last checkpoint is at step {self.last_checkpoint_step} in {self.checkpoint_dir})"
        return TrainingError(
            f"training diverged: {what} at step {step}{where}; lower train.lr or raise train.warmup_steps"
        )

    def weights_are_finite(self) -> bool:
        """True when no parameter holds inf/nan; the same answer on every rank (a collective
        under several processes, since FSDP/TP ranks each see only their shards)."""
        from torch.distributed.tensor import DTensor

        local = [p.to_local() if isinstance(p, DTensor) else p for p in self.model.parameters()]
        flags = [torch.isfinite(t).all() for t in local if t.numel()]
        finite = bool(torch.stack(flags).all()) if flags else True
        if dist.is_initialized() and dist.get_world_size() > 1:
            flag = torch.tensor([1.0 if finite else 0.0], dtype=torch.float64)
            if dist.get_backend() == "nccl":
                flag = flag.cuda()
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            finite = bool(flag.item() == 1.0)
        return finite

    def _drop_previous_run(self) -> None:
        """An earlier run that ``--overwrite`` moved aside goes once this run has a checkpoint."""
        if not self.is_main or self.out_dir is None:
            return
        for _, aside in SET_ASIDE:
            previous = self.out_dir / aside
            if previous.is_dir():
                shutil.rmtree(previous)
                if aside == PREVIOUS_CHECKPOINT:
                    logger.info("removed the earlier run's %s", previous)
            else:
                previous.unlink(missing_ok=True)

    def _out_of_time(self) -> bool:
        return self.config.max_seconds is not None and self.train_seconds >= self.config.max_seconds

    def train_batches_shape(self) -> tuple[int, int]:
        """(batch size, sequence length) of the last micro-batch drawn, for throughput accounting
        (any batch source: the shape is read off the batch itself)."""
        if self._batch_shape is not None:
            return self._batch_shape
        return getattr(self.train_batches, "batch_size", self.config.batch_size), getattr(
            self.train_batches, "block_size", 0
        )

    def _log(self, metrics: StepMetrics) -> None:
        record = {
            "step": metrics.step,
            "loss": metrics.loss,
            "lr": metrics.lr,
            "grad_norm": metrics.grad_norm,
            "tokens_per_s": round(metrics.tokens_per_second, 1),
        }
        if metrics.val_loss is not None:
            record["val_loss"] = metrics.val_loss
        logger.info(
            "step %d  loss %.4f%s  lr %.2e  %.0f tok/s",
            metrics.step,
            metrics.loss,
            f"  val {metrics.val_loss:.4f}" if metrics.val_loss is not None else "",
            metrics.lr,
            metrics.tokens_per_second,
        )
        if self.metrics_path is not None and self.is_main:
            try:
                self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
                if not self._metrics_continue and self.metrics_path.exists():
                    logger.info("starting a new %s (replacing an earlier run's)", self.metrics_path)
                with open(self.metrics_path, "a" if self._metrics_continue else "w", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as exc:
                raise TrainingError(
                    f"cannot write the metrics log {self.metrics_path}: {reason(exc)} "
                    f"(at step {metrics.step}; {self._last_checkpoint_note()})"
                ) from None
            if self.config.tensorboard:
                self._write_tensorboard(record)
        self._metrics_continue = True

    def _write_tensorboard(self, record: dict[str, Any]) -> None:
        assert self.out_dir is not None
        directory = self.out_dir / TENSORBOARD_DIR
        try:
            if self._tensorboard is None:
                # Opened again by a later fit() of this trainer: that continues the same run.
                self._tensorboard = tensorboard.TensorBoardLog(
                    directory, new_run=not self._metrics_continue, resumed_at=self._resumed_at
                )
                self._resumed_at = None  # purged once: a later fit() must not hide this session's events
            self._tensorboard.write(record)
        except OSError as exc:
            raise TrainingError(
                f"cannot write TensorBoard events to {directory}: {reason(exc)} "
                f"(at step {record['step']}; {self._last_checkpoint_note()})"
            ) from None

    def _last_checkpoint_note(self) -> str:
        if self.last_checkpoint_step is None:
            return "no checkpoint of this run was saved"
        return f"the last checkpoint is at step {self.last_checkpoint_step}"

    def save_checkpoint(self) -> Path | None:
        directory = self.checkpoint_dir
        if directory is None:
            return None
        if not self.weights_are_finite():  # a collective, like the save itself
            raise self._diverged("the weights hold inf/nan", self.step)
        rank_rng = self._gather_rank_rng()  # a collective: every rank takes part
        extra_state = {
            "train_seconds": self.train_seconds,
            "grad_scaler": self.precision.state_dict(),
            **({"rank_rng": rank_rng} if rank_rng is not None else {}),
        }
        # With several processes every rank writes its shards (DCP) and rank 0 adds the JSON files
        # and renames; a single process writes the one-file checkpoint.
        # One FSDP/TP rank still holds DTensors, which only the sharded writer can save.
        sharded = dist.is_initialized() and (dist.get_world_size() > 1 or not is_replicated(self.model))
        save = save_sharded_training_checkpoint if sharded else save_training_checkpoint
        try:
            save(
                directory,
                model=self.model,  # type: ignore[arg-type]
                optimizer=self.optimizer,
                step=self.step,
                run_config=self.run_config,
                data_state=self.train_batches.state_dict(),
                tokenizer_json=self._tokenizer_json,
                extra_state=extra_state,
            )
        except (OSError, SafetensorError) as exc:  # a full disk, a file size limit, a vanished folder
            kept = (
                f"the checkpoint of step {self.last_checkpoint_step} there is kept"
                if self.last_checkpoint_step is not None else "no checkpoint of this run was saved"
            )
            raise CheckpointError(
                f"cannot save the checkpoint of step {self.step} to {directory}: {reason(exc)}; {kept}"
            ) from None
        self.last_checkpoint_step = self.step
        logger.info("saved %scheckpoint at step %d to %s", "sharded " if sharded else "", self.step, directory)
        self._drop_previous_run()
        return directory

    # ------------------------------------------------------------------ per-rank random state

    def _gather_rank_rng(self) -> list[dict[str, str]] | None:
        """Every rank's RNG states (rank order), so resume restores each rank's dropout stream;
        None in a single process (the checkpoint's own RNG entry covers it)."""
        if not dist.is_initialized():
            return None
        mine = {"torch": _encode_rng(torch.get_rng_state())}
        if self.device.type == "cuda":
            mine["cuda"] = _encode_rng(torch.cuda.get_rng_state(self.device))
        states: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(states, mine)
        return states

    def _restore_rank_rng(self, states: list[dict[str, str]] | None) -> None:
        if not states or not dist.is_initialized():
            return
        rank, world_size = dist.get_rank(), dist.get_world_size()
        if len(states) != world_size:
            logger.warning(
                "checkpoint has random states of %d ranks, this run has %d; dropout will not replay exactly",
                len(states),
                world_size,
            )
            return
        torch.set_rng_state(_decode_rng(states[rank]["torch"]))
        if "cuda" in states[rank] and self.device.type == "cuda":
            torch.cuda.set_rng_state(_decode_rng(states[rank]["cuda"]), self.device)
