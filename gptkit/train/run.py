"""A pretraining run from a RunConfig: prepare the data if needed, build the model, train.

This is what ``gptkit train`` calls; it is also the Python entry point for a recipe.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from gptkit.checkpoint import CONFIG_FILE, model_config_from_checkpoint, read_checkpoint_config
from gptkit.config import RunConfig, TrainConfig, apply_overrides, run_config_from_dict, to_dict
from gptkit.data import load_meta, prepare_dataset
from gptkit.data.loader import BatchLoader, eval_batches
from gptkit.distributed.mesh import ParallelDims
from gptkit.distributed.setup import barrier, init_distributed
from gptkit.errors import CheckpointError, ConfigError, DataError, GptkitError, TokenizerError, reason
from gptkit.model.gpt import GPT
from gptkit.plan import check_fits_in_memory
from gptkit.tokenizer import load_tokenizer
from gptkit.train.checkpointing import CHECKPOINT_DIR, PREVIOUS_CHECKPOINT, SET_ASIDE
from gptkit.train.trainer import StepMetrics, Trainer, TrainSummary

logger = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: cuda was asked for but this machine has no CUDA device; use cpu or auto")
    return torch.device(name)


def ensure_prepared(config: RunConfig, *, progress: bool = False) -> dict:
    """Load the prepared data's metadata, preparing it first when the directory has none.

    Data prepared earlier must match ``config.data`` (source, tokenizer, BPE vocab_size,
    val_fraction): a mismatch is a DataError rather than a run on stale tokens whose checkpoint
    would record settings it was not trained with.
    """
    from gptkit.data.prepare import check_prepared_from

    data_dir = Path(config.data.dir)
    if not (data_dir / "meta.json").exists():
        logger.info("preparing %s into %s (%s tokenizer)", config.data.source, data_dir, config.data.tokenizer)
        prepare_dataset(
            config.data.source,
            data_dir,
            tokenizer=config.data.tokenizer,
            vocab_size=config.data.vocab_size,
            val_fraction=config.data.val_fraction,
            progress=progress,
        )
    meta = load_meta(data_dir)
    check_prepared_from(
        meta,
        config.data.dir,
        source=config.data.source,
        tokenizer=config.data.tokenizer,
        vocab_size=config.data.vocab_size,
        val_fraction=config.data.val_fraction,
    )
    check_prepared_tokenizer(data_dir, meta)
    return meta


def check_prepared_tokenizer(data_dir: Path, meta: dict) -> None:
    """DataError unless ``data_dir/tokenizer.json`` loads and is the tokenizer meta.json describes:
    the run copies it into every checkpoint, and a damaged one would only show when sampling."""
    path = data_dir / "tokenizer.json"
    try:
        tokenizer = load_tokenizer(path)
    except TokenizerError as exc:
        raise DataError(f"{exc}; the data set is damaged, run `gptkit prepare` again") from None
    if (tokenizer.vocab_size, tokenizer.eot_id) != (meta["vocab_size"], meta["eot_id"]):
        raise DataError(
            f"{path} does not fit {data_dir / 'meta.json'} (vocabulary {tokenizer.vocab_size} and end-of-text id "
            f"{tokenizer.eot_id}, meta.json says {meta['vocab_size']} and {meta['eot_id']}); the data set is "
            "damaged, run `gptkit prepare` again"
        )


def resume_run_config(config: RunConfig, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """The run config stored in ``<out_dir>/checkpoint``, with the command line's overrides on top.

    ``config`` only tells where the run lives (train.out_dir); everything else comes from the
    checkpoint, so a resumed run continues with exactly the settings it started with.
    """
    from gptkit.train.checkpointing import check_run_directory

    checkpoint_dir = Path(config.train.out_dir) / CHECKPOINT_DIR
    if not checkpoint_dir.exists():
        # Puts back a checkpoint a dying save left renamed aside, or says in one line why there is none.
        check_run_directory(config.train.out_dir, resume=True, overwrite=False)
    stored = read_checkpoint_config(checkpoint_dir)
    if not isinstance(stored.get("run"), dict):
        raise CheckpointError(f"{checkpoint_dir} holds no training run config, so it cannot be resumed")
    run = dict(stored["run"])
    # The run lives where its checkpoint was found, not where it was first trained: a run directory
    # that was moved or copied since resumes (and saves) in its new place, never in the old one.
    if isinstance(run.get("train"), dict):
        run["train"] = {**run["train"], "out_dir": config.train.out_dir}
    try:
        return run_config_from_dict(apply_overrides(run, overrides))
    except ConfigError:
        # The overrides may be what makes an older run's config valid again (a check added since
        # it was saved): only a stored config that stays invalid is the checkpoint's fault.
        try:
            run_config_from_dict(run)
        except ConfigError as exc:
            # A key this gptkit does not know (a checkpoint of another version) cannot be overridden.
            advice = (
                f"remove it from {checkpoint_dir / CONFIG_FILE} to resume" if str(exc).startswith("unknown ")
                else "override that field to resume"
            )
            raise CheckpointError(f"{checkpoint_dir}: stored run config is not valid ({exc}); {advice}") from None
        raise


def build_trainer(config: RunConfig, *, progress: bool = False) -> Trainer:
    """Everything a run needs, wired together: data, model (vocabulary from the data), trainer."""
    train_config: TrainConfig = config.train
    # Join the process group first: a bad launch fails before any work, and only rank 0 prepares data.
    world = init_distributed(
        train_config.strategy, resolve_device(train_config.device), timeout_s=train_config.dist_timeout_s
    )
    if not world.is_main:
        logging.getLogger("gptkit").setLevel(logging.WARNING)  # rank 0 logs for the run
    # The layout (dp x tp) is checked against the launch and the model before any work.
    dims = ParallelDims.from_config(train_config, world.world_size)
    dims.validate_model(config.model)
    dp_rank = dims.dp_rank(world.rank)
    if world.world_size > 1:
        _check_ranks_agree(config)
    if world.world_size == 1:
        meta = ensure_prepared(config, progress=progress)
    else:
        meta = _prepare_on_rank_0(config, rank=world.rank, progress=progress)
    torch.manual_seed(train_config.seed)
    model_config = config.model
    if model_config.vocab_size != meta["vocab_size"]:
        # The vocabulary is the tokenizer's: a preset's 50257 would waste the head on unused rows.
        model_config = dataclasses.replace(model_config, vocab_size=int(meta["vocab_size"]))
    config = dataclasses.replace(config, model=model_config)
    check_fits_in_memory(model_config, trains_here=world.world_size == 1 and world.device.type == "cpu")
    model = GPT(model_config)
    if world.world_size > 1:
        # Same initial weights everywhere (DDP also broadcasts rank 0's), then a stream of random
        # numbers per data-parallel rank, so replicas draw different dropout masks while the ranks
        # of one TP group (same data, replicated activations) draw the same ones.
        torch.manual_seed(train_config.seed + dp_rank)
    logger.info("model: %s parameters", f"{model.num_parameters():,}")
    data_dir = Path(config.data.dir)
    train_batches = BatchLoader(
        data_dir,
        "train",
        train_config.batch_size,
        model_config.block_size,
        seed=train_config.seed,
        rank=dp_rank,  # TP ranks read the same batches: data parallelism is over "dp" only
        world_size=dims.dp,
    )
    # Each data-parallel rank evaluates its share of the set one process with the global batch
    # would (the trainer averages over ranks), so the val loss does not depend on the world size.
    val = eval_batches(
        data_dir, "val", train_config.batch_size, model_config.block_size, train_config.eval_batches,
        rank=dp_rank, world_size=dims.dp,
    )
    return Trainer(
        model,
        train_config,
        train_batches=train_batches,
        val_batches=val,
        out_dir=train_config.out_dir,
        run_config=to_dict(config),
        tokenizer_path=data_dir / "tokenizer.json",
        device=world.device,
    )


def _raise_together(error: GptkitError | None) -> None:
    """A collective: every rank raises the error of the lowest rank that had one, so a rank that
    fails alone (rank 0 preparing the data, a rank that cannot see a shared directory) neither
    leaves the others waiting in the next collective until train.dist_timeout_s nor makes them
    die with a traceback when its exit closes their connections."""
    errors: list[GptkitError | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(errors, error)
    first = next((found for found in errors if found is not None), None)
    if first is not None:
        raise first from None


# Fields that may differ between ranks: paths that can name each node's own copy of the corpus
# and of the prepared data (docs/multi-node.md).
_MAY_DIFFER_BY_RANK = {("data", "source"), ("data", "dir")}


def _check_ranks_agree(config: RunConfig) -> None:
    """A collective: every rank must run the same recipe. Ranks launched with different overrides
    (another train.lr on one node, say) would otherwise train replicas that drift apart without an
    error, or stop at different steps and abort in a collective. Every rank raises the same
    ConfigError, naming the first field that differs."""
    mine = {
        f"{section}.{key}": value
        for section, values in to_dict(config).items()
        for key, value in values.items()
        if (section, key) not in _MAY_DIFFER_BY_RANK
    }
    recipes: list[dict | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(recipes, mine)
    reference = recipes[0]
    assert reference is not None
    for rank, theirs in enumerate(recipes[1:], start=1):
        assert theirs is not None
        differing = [name for name in reference if reference[name] != theirs.get(name)]
        if differing:
            name = differing[0]
            raise ConfigError(
                f"rank {rank} was launched with another recipe than rank 0: {name} is {theirs.get(name)!r} there, "
                f"{reference[name]!r} on rank 0; launch every rank with the same recipe and overrides"
            )


def _prepare_on_rank_0(config: RunConfig, *, rank: int, progress: bool) -> dict:
    """The prepared data's metadata, under several processes: rank 0 prepares the data (once, for
    all) while the others wait, then every rank reads it. Rank 0 also makes a file (removed after) in
    train.out_dir that every rank must see: all ranks write their checkpoint shards into that
    directory, and on storage that is not shared each rank's shards would land on its own disk,
    leaving a checkpoint that cannot be read, with no error."""
    out_dir = Path(config.train.out_dir)
    marker: list[str | None] = [None]
    error: GptkitError | None = None
    is_main = rank == 0
    if is_main:
        try:
            meta = ensure_prepared(config, progress=progress)
            marker[0] = f".gptkit-shared-{os.getpid()}-{os.urandom(6).hex()}"
            try:
                out_dir.mkdir(parents=True, exist_ok=True)
                (out_dir / marker[0]).touch()
            except OSError as exc:
                raise ConfigError(f"train.out_dir {out_dir}: cannot write in it ({reason(exc)})") from None
        except GptkitError as exc:
            error = exc
    _raise_together(error)
    torch.distributed.broadcast_object_list(marker, src=0)
    try:
        if not is_main:
            try:
                meta = load_meta(Path(config.data.dir))
                # A file just made on a network filesystem can take a while to show on another node
                # (NFS caches a directory's entries for up to a minute by default): wait that long,
                # within the collective timeout the others wait in meanwhile.
                deadline = time.monotonic() + min(60.0, config.train.dist_timeout_s / 2)
                while not (out_dir / marker[0]).exists() and time.monotonic() < deadline:
                    time.sleep(0.2)
                if not (out_dir / marker[0]).exists():
                    raise ConfigError(
                        f"train.out_dir {out_dir} is not shared: rank {rank} does not see the file rank 0 wrote there; "
                        "every rank writes its checkpoint shards into it, so it must be one directory on a "
                        "filesystem all ranks share (see docs/multi-node.md)"
                    )
            except GptkitError as exc:
                error = exc
        _raise_together(error)
    finally:
        if is_main and marker[0] is not None:
            with contextlib.suppress(OSError):
                (out_dir / marker[0]).unlink()
    return meta


def start_run(
    config: RunConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = False
) -> Trainer:
    """A trainer ready to ``fit``; with ``resume`` it continues from ``<out_dir>/checkpoint``.

    Without ``resume``, a checkpoint already in train.out_dir is a ConfigError unless
    ``overwrite``: once the new run is set up, the old run's checkpoint, metrics.jsonl and
    TensorBoard events are moved aside (``checkpoint.previous``, ``metrics.previous.jsonl``,
    ``tensorboard.previous``) and deleted at the new run's first
    save, so the directory never mixes two runs and a new run that fails early loses nothing.
    ``resume`` and ``overwrite`` together are a ConfigError.
    """
    from gptkit.train.checkpointing import check_run_directory

    # Before data preparation and model building: a bad out_dir fails in a second, not after a run.
    found_step = check_run_directory(config.train.out_dir, resume=resume, overwrite=overwrite)
    lock = None
    if int(os.environ.get("RANK", "0")) == 0:  # rank 0 writes the run directory for all ranks
        lock = lock_run_directory(Path(config.train.out_dir))
    try:
        if lock is not None:
            # Checked again under the lock: a run that held it until now may have left a checkpoint.
            found_step = check_run_directory(config.train.out_dir, resume=resume, overwrite=overwrite)
        trainer = _start_run(config, found_step, resume=resume, overwrite=overwrite, progress=progress)
    except BaseException:
        if lock is not None:
            lock.release()
            if lock.created is not None:  # a run that fails before it starts leaves no directory
                with contextlib.suppress(OSError):
                    lock.created.rmdir()  # only if still empty
        raise
    trainer.run_lock = lock
    return trainer


def _start_run(
    config: RunConfig, found_step: int | None, *, resume: bool, overwrite: bool, progress: bool
) -> Trainer:
    if resume and found_step is not None and found_step > config.train.max_steps:
        raise _max_steps_below(config.train.max_steps, found_step)
    trainer = build_trainer(config, progress=progress)
    if overwrite and found_step is not None:
        _start_over(Path(config.train.out_dir), found_step, is_main=trainer.is_main)
    if resume:
        checkpoint_dir = trainer.checkpoint_dir  # present and complete: check_run_directory saw to it
        assert checkpoint_dir is not None
        stored = read_checkpoint_config(checkpoint_dir)
        stored_model = model_config_from_checkpoint(stored, checkpoint_dir)
        if stored_model != trainer.model.config:
            diffs = [
                f"model.{f.name} {getattr(stored_model, f.name)!r} -> {getattr(trainer.model.config, f.name)!r}"
                for f in dataclasses.fields(stored_model)
                if getattr(stored_model, f.name) != getattr(trainer.model.config, f.name)
            ]
            raise CheckpointError(f"cannot resume {checkpoint_dir}: the model config changed ({'; '.join(diffs)})")
        trainer.resume(checkpoint_dir)  # at found_step, which is <= max_steps (checked above)
        if trainer.step == config.train.max_steps:
            logger.info(
                "checkpoint is already at step %d = train.max_steps; nothing to train "
                "(give a larger train.max_steps to continue)",
                trainer.step,
            )
    return trainer


# Run directories locked by this process (their resolved paths): a second run into one of them from
# the same process (the API, tests) neither waits for nor takes the lock it already holds.
_RUN_LOCKS: set[str] = set()


class RunLock:
    """An exclusive lock on a run directory, held until :meth:`release` (``Trainer.fit`` releases
    it when it returns or fails) or until this process ends."""

    def __init__(self, key: str, fd: int, created: Path | None = None) -> None:
        self.key, self.fd = key, fd
        self.created = created  # the run directory, when taking the lock made it

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None
            _RUN_LOCKS.discard(self.key)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.release()


def lock_run_directory(out_dir: Path) -> RunLock | None:
    """Create ``out_dir`` and take an exclusive lock on it (flock on the directory itself: no file
    is added), so two runs never write one run directory at once; they would interleave
    metrics.jsonl and replace each other's checkpoints. ConfigError when another process holds it
    or the directory cannot be made. None where this process holds it already, or the file
    system has no such locks (the run then goes on unlocked, as before)."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        return None
    try:
        created = None if out_dir.is_dir() else out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        key = str(out_dir.resolve())
        if key in _RUN_LOCKS:
            return None
        fd = os.open(out_dir, os.O_RDONLY)
    except OSError as exc:
        raise ConfigError(f"train.out_dir {out_dir}: cannot create it ({reason(exc)})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(
            f"train.out_dir {out_dir} is in use by another gptkit run; wait for it to end or choose another "
            "train.out_dir"
        ) from None
    except OSError:  # no flock on directories here (NFS)
        os.close(fd)
        return None
    _RUN_LOCKS.add(key)
    return RunLock(key, fd, created)


def _max_steps_below(max_steps: int, step: int) -> ConfigError:
    return ConfigError(
        f"train.max_steps {max_steps} is below the checkpoint's step {step}; give a larger train.max_steps to continue"
    )


def _start_over(out_dir: Path, step: int, *, is_main: bool) -> None:
    """--overwrite: move the earlier run's checkpoint and metrics log aside before the new run
    writes (the trainer deletes them at its first save; see ``Trainer.save_checkpoint``)."""
    if is_main:
        logger.warning(
            "train.out_dir %s: the earlier run (step %d) is moved to %s until this run saves its first checkpoint",
            out_dir, step, PREVIOUS_CHECKPOINT,
        )
        for name, aside in SET_ASIDE:
            if (out_dir / aside).is_dir():
                shutil.rmtree(out_dir / aside)
            if (out_dir / name).exists():
                os.replace(out_dir / name, out_dir / aside)
    barrier()  # no rank writes before the old run is out of the way


def run_training(
    config: RunConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    on_step: Callable[[StepMetrics], None] | None = None,
    progress: bool = False,
) -> TrainSummary:
    """Train ``config`` to train.max_steps; with ``resume`` continue exactly from its checkpoint,
    with ``overwrite`` start over in a train.out_dir that holds one (see :func:`start_run`)."""
    return start_run(config, resume=resume, overwrite=overwrite, progress=progress).fit(on_step=on_step)
