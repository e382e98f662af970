"""The ``gptkit`` command line: prepare, train, generate, convert, plan.

Every verb takes ``--help``. Recipes are YAML files (see configs/) and any field can be overridden
with ``--section.field=value``. A user mistake prints one line starting with "error:" and exits 1
(2 for a malformed command line, as argparse does).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import signal
import sys
import time
from pathlib import Path
from collections.abc import Container
from typing import Any

from gptkit.errors import ConfigError, GptkitError

logger = logging.getLogger("gptkit")



class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (with where to look) instead of the usage block."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def _fields_help(*sections: str) -> str:
    """The recipe keys of ``sections``, for the epilog of a command that takes overrides."""
    from gptkit.config import _SECTIONS

    lines = []
    for section in sections:
        names = ", ".join(f.name for f in dataclasses.fields(_SECTIONS[section]))
        lines.append(f"  {section}.{{{names}}}")
    return "recipe keys (override with --section.field=value):\n" + "\n".join(lines)


def _check_recipe_path(path: str | None) -> None:
    """The positional argument of prepare/train is a YAML recipe; a corpus there is a common slip."""
    if path is None or Path(path).suffix.lower() in (".yaml", ".yml"):
        return
    if Path(path).is_dir() or Path(path).suffix.lower() in (".txt", ".jsonl"):
        raise ConfigError(
            f"{path} looks like a corpus, not a YAML recipe: pass it as --data.source={path} "
            "(with a recipe such as configs/shakespeare-char.yaml, or none for the defaults)"
        )


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def _unescape(text: str) -> str:
    r"""``\n``, ``\t``, ``\r`` and ``\\`` as typed in a shell argument become the characters they name
    (as llama.cpp reads them); any other backslash is kept as it is."""
    return re.sub(r"\\([ntr\\])", lambda m: _ESCAPES[m.group(1)], text)


_DOTTED_KEY = re.compile(r"--[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")
_NUMBER = re.compile(r"-\.?\d")


def _join_spaced_overrides(argv: list[str]) -> list[str]:
    """``--train.max_steps 200`` as ``--train.max_steps=200``, the way most command lines take
    values (argparse would otherwise read ``200`` as the recipe path). A value may be a negative
    number but not another option."""
    joined: list[str] = []
    index = 0
    while index < len(argv):
        arg = argv[index]
        if arg == "--":
            joined.extend(argv[index:])
            break
        following = argv[index + 1] if index + 1 < len(argv) else None
        if _DOTTED_KEY.fullmatch(arg) and following is not None and (
            not following.startswith("-") or _NUMBER.match(following)
        ):
            joined.append(f"{arg}={following}")
            index += 2
        else:
            joined.append(arg)
            index += 1
    return joined


def _split_overrides(parser: argparse.ArgumentParser, extra: list[str]) -> list[str]:
    """Unknown arguments must be dotted overrides; anything else is a usage error."""
    overrides = []
    for arg in extra:
        body = arg[2:] if arg.startswith("--") else ""
        if _DOTTED_KEY.fullmatch(arg):
            parser.error(f"{arg} needs a value: {arg}=VALUE or {arg} VALUE")
        if "=" not in body or "." not in body.split("=", 1)[0]:
            parser.error(f"unrecognized argument {arg!r} (overrides look like --section.field=value)")
        overrides.append(arg)
    return overrides


# ---------------------------------------------------------------------------------- prepare


def cmd_prepare(args: argparse.Namespace, overrides: list[str]) -> int:
    from gptkit.config import load_run_config
    from gptkit.data import prepare_dataset

    _check_recipe_path(args.config)
    config = load_run_config(args.config, overrides)
    data = config.data
    started = time.perf_counter()
    meta = prepare_dataset(
        data.source,
        data.dir,
        tokenizer=data.tokenizer,
        vocab_size=data.vocab_size,
        val_fraction=data.val_fraction,
        progress=True,
    )
    splits, documents = meta["splits"], meta["documents"]
    print(
        f"prepared {data.source} -> {data.dir}: {documents} document{'' if documents == 1 else 's'}, "
        f"vocabulary {meta['vocab_size']}, "
        f"{splits['train']['tokens']:,} train / {splits['val']['tokens']:,} val tokens "
        f"({meta['dtype']}) in {time.perf_counter() - started:.1f}s"
    )
    return 0


# ---------------------------------------------------------------------------------- train


# glibc's mallopt parameters, and the values `gptkit train` sets (see _keep_freed_memory).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_TRIM_THRESHOLD = 1 << 30  # keep up to 1 GiB of freed memory at the top of the heap
_MMAP_THRESHOLD = 32 << 20  # glibc's largest: tensors up to 32 MiB come from the heap, not mmap
_THRESHOLDS = ("trim_threshold", "mmap_threshold", "top_pad", "mmap_max")  # glibc's own knobs for this


def _keep_freed_memory() -> bool:
    """Let this training process keep the memory it frees, instead of glibc giving it back.

    Every step frees and re-allocates the same activation and gradient buffers. By default glibc
    returns freed memory at the top of the heap (and every block above its adaptive mmap threshold)
    to the OS, and the next step faults it back in, page by page, zeroed: ~1,000 page faults per
    step at the default recipe's shape, 2-10% of the step on the 2-core test machine
    (benchmarks/README.md). This is what MALLOC_TRIM_THRESHOLD_ / MALLOC_MMAP_THRESHOLD_ do; a user
    who set these in the environment (or as glibc.malloc tunables) keeps them. Only the CLI does this: importing gptkit changes no
    process-wide setting. Returns whether the parameters were set (False off glibc)."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if any(f"MALLOC_{name.upper()}_" in os.environ or f"glibc.malloc.{name}" in tunables for name in _THRESHOLDS):
        return False
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl without mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)) and bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD))


def cmd_train(args: argparse.Namespace, overrides: list[str]) -> int:
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from gptkit.config import load_run_config
    from gptkit.train import resume_run_config
    from gptkit.train.run import start_run

    _check_recipe_path(args.config)
    config = load_run_config(args.config, overrides)
    if args.resume:
        config = resume_run_config(config, overrides)
    _keep_freed_memory()
    trainer = start_run(config, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet)
    bar = tqdm(
        total=config.train.max_steps,
        initial=trainer.step,
        desc="train",
        unit="step",
        dynamic_ncols=True,
        disable=args.quiet or not trainer.is_main,  # one bar, on rank 0
    )
    last_val: list[float] = []
    is_main = trainer.is_main

    def on_step(metrics) -> None:
        bar.update(1)
        if metrics.val_loss is not None:
            last_val[:] = [metrics.val_loss]
        postfix = {"loss": f"{metrics.loss:.4f}", "tok/s": f"{metrics.tokens_per_second:,.0f}"}
        if last_val:
            postfix["val"] = f"{last_val[0]:.4f}"
        bar.set_postfix(postfix, refresh=False)

    try:
        with logging_redirect_tqdm():
            summary = trainer.fit(on_step=on_step)
    finally:
        bar.close()
    from gptkit.distributed.setup import shutdown_distributed

    checkpoint_dir = trainer.checkpoint_dir
    del trainer  # its model and optimizer hold the process group's buffers; free them first
    shutdown_distributed()
    if not is_main:
        return 0
    if summary.steps_trained == 0 or summary.final_loss is None:
        print(
            f"nothing to train: the run is already at step {summary.steps} (train.max_steps or train.max_seconds "
            f"reached); checkpoint in {checkpoint_dir}"
        )
        return 0
    val = f"{summary.final_val_loss:.4f}" if summary.final_val_loss is not None else "n/a"
    print(
        f"done: step {summary.steps}, train loss {summary.final_loss:.4f}, val loss {val}, "
        f"{summary.tokens_per_second:,.0f} tokens/s, {summary.seconds:.0f}s; "
        f"checkpoint in {checkpoint_dir}"
    )
    return 0


# ---------------------------------------------------------------------------------- generate


def _recipe_sample_settings(checkpoint: str) -> dict[str, Any]:
    """The ``sample`` section of the run config saved with a gptkit checkpoint ({} for a Hugging
    Face directory, or a checkpoint written without one)."""
    from gptkit.api import resolve_checkpoint_dir
    from gptkit.checkpoint import read_checkpoint_config
    from gptkit.config import SampleConfig
    from gptkit.model.hf import is_hf_directory

    directory = resolve_checkpoint_dir(checkpoint)
    if is_hf_directory(directory):
        return {}
    run = read_checkpoint_config(directory).get("run")
    section = run.get("sample") if isinstance(run, dict) else None
    if not isinstance(section, dict):
        return {}
    known = {f.name for f in dataclasses.fields(SampleConfig)}
    return {name: value for name, value in section.items() if name in known}


def cmd_generate(args: argparse.Namespace, overrides: list[str]) -> int:
    import torch

    from gptkit.api import load, load_tokenizer, resolve_checkpoint_dir
    from gptkit.checkpoint import CONFIG_FILE
    from gptkit.config import MAX_SEED, SampleConfig
    from gptkit.errors import CheckpointError
    from gptkit.generate import stream_text
    from gptkit.generate.generator import check_vocabularies, encode_prompt

    if overrides:
        raise ConfigError(f"generate takes no recipe overrides; got {overrides[0]!r} (see gptkit generate --help)")
    if args.num_samples < 1:
        raise ConfigError(f"--num-samples must be >= 1; got {args.num_samples}")
    given = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "repetition_penalty": args.repetition_penalty,
        "seed": args.seed,
        "stop": tuple(_unescape(stop) for stop in args.stop) if args.stop else None,
    }
    given = {name: value for name, value in given.items() if value is not None}
    try:
        SampleConfig(**given)  # a bad flag fails before the model is read
    except ConfigError as exc:  # "top_k: ..." names the field: name the flag that set it
        raise ConfigError(_named_as_flag(str(exc), given)) from None
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model = load(args.checkpoint, device=device)
    # The flags given win over the recipe's sample section stored with the checkpoint, which wins
    # over SampleConfig's defaults.
    recipe = {name: value for name, value in _recipe_sample_settings(args.checkpoint).items() if name not in given}
    for name, value in recipe.items():  # each field is checked alone: the flags given passed already
        try:
            SampleConfig(**{name: value})
        except ConfigError as exc:
            path = resolve_checkpoint_dir(args.checkpoint) / CONFIG_FILE
            raise CheckpointError(
                f"{path}: the recipe saved with the checkpoint has an invalid sample.{name} ({exc}); "
                f"pass --{name.replace('_', '-')} to override it"
            ) from None
    sample = SampleConfig(**{**recipe, **given})
    tokenizer = load_tokenizer(args.tokenizer or args.checkpoint)
    check_vocabularies(model, tokenizer)  # before anything is printed
    prompt = args.prompt
    if args.prompt_file:
        try:
            # Exactly as stored, as prepare reads a corpus: no newline translation ("\r\n" stays).
            prompt = Path(args.prompt_file).read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read --prompt-file {args.prompt_file}: {exc}") from None
    encode_prompt(tokenizer, prompt, model.config.block_size)  # a bad prompt fails before anything prints
    out = sys.stdout
    if hasattr(out, "reconfigure"):  # a terminal or pipe that is not UTF-8: never a crash mid-sample
        out.reconfigure(errors="replace")
    for i in range(args.num_samples):
        if args.num_samples > 1:
            out.write(f"--- sample {i + 1} ---\n")
        out.write(prompt)
        out.flush()
        for piece in stream_text(model, tokenizer, prompt, sample):
            out.write(piece)
            out.flush()
        out.write("\n")
        if sample.seed is not None:  # different samples, still reproducible
            # Wrap at the top of the seed range (2**63 - 1) instead of failing after a sample.
            sample = dataclasses.replace(sample, seed=(sample.seed + 1) % (MAX_SEED + 1))
    return 0


# ---------------------------------------------------------------------------------- convert

def _check_convert_destination(given: Path, source: Path, destination: Path, *, force: bool) -> None:
    """Refuse a destination whose replacement would lose anything but an earlier conversion."""
    from gptkit.model.hf import check_replaceable_model_directory

    target = destination.resolve()
    for protected in {given.resolve(), source.resolve()}:
        if target == protected or target in protected.parents:
            raise ConfigError(f"destination {destination} is or contains the source {given}; choose another directory")
    # the current directory, a file, more than a model; an earlier model only with --force
    check_replaceable_model_directory(destination, replace=force)


def _hf_tokenizer_files(tokenizer: Any, path: Path, model: Any) -> dict[str, str]:
    """The tokenizer files of a Hugging Face export: a BPE tokenizer.json is Hugging Face's format
    already; a character tokenizer is written in that format (``CharTokenizer.to_hf_json``), with a
    tokenizer_config.json that makes ``AutoTokenizer`` load it as it is."""
    from gptkit.tokenizer import EOT_TOKEN, CharTokenizer

    if not isinstance(tokenizer, CharTokenizer):
        return {"tokenizer.json": path.read_text(encoding="utf-8")}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOT_TOKEN,
        "eos_token": EOT_TOKEN,
        "model_max_length": model.config.block_size,
    }
    return {"tokenizer.json": tokenizer.to_hf_json(), "tokenizer_config.json": json.dumps(config, indent=2) + "\n"}


def cmd_convert(args: argparse.Namespace, overrides: list[str]) -> int:
    from safetensors import SafetensorError

    from gptkit.api import load, load_tokenizer, resolve_checkpoint_dir
    from gptkit.checkpoint import TOKENIZER_FILE, write_model_files
    from gptkit.errors import TokenizerError, reason
    from gptkit.fileio import atomic_directory
    from gptkit.model.hf import is_hf_directory, save_hf
    from gptkit.tokenizer import CharTokenizer

    if overrides:
        raise ConfigError(f"convert takes no recipe overrides; got {overrides[0]!r}")
    source = resolve_checkpoint_dir(args.source)
    destination = Path(args.destination)
    _check_convert_destination(Path(args.source), source, destination, force=args.force)
    target = args.to or ("gptkit" if is_hf_directory(source) else "hf")
    model = load(source)
    tokenizer_path = source / TOKENIZER_FILE
    tokenizer = None
    if tokenizer_path.exists():
        try:
            tokenizer = load_tokenizer(tokenizer_path)
        except TokenizerError:
            if target == "hf":
                raise
            # Into gptkit: a tokenizer gptkit cannot read (yet) is copied as it is, for other tools.
    try:
        if target == "hf":
            save_hf(
                model, destination, eot_id=None if tokenizer is None else tokenizer.eot_id,
                tokenizer_files=None if tokenizer is None else _hf_tokenizer_files(tokenizer, tokenizer_path, model),
            )
        else:
            import shutil

            with atomic_directory(destination) as tmp:
                write_model_files(tmp, model)
                if isinstance(tokenizer, CharTokenizer):  # gptkit's own format, also when it came from an export
                    tokenizer.save(tmp)
                elif tokenizer_path.exists():
                    shutil.copyfile(tokenizer_path, tmp / TOKENIZER_FILE)
    except (OSError, SafetensorError) as exc:  # a full disk, a read-only place, a file in the way
        where = f" ({exc.filename})" if isinstance(exc, OSError) and exc.filename else ""
        raise ConfigError(f"cannot write {destination}: {reason(exc)}{where}; nothing was written there") from None
    print(f"converted {source} -> {destination} ({target}, {model.num_parameters():,} parameters)")
    return 0


# ---------------------------------------------------------------------------------- plan


# The ModelConfig fields `gptkit plan` sets from flags: its errors name the flag, not the field.
_PLAN_FLAGS = {
    "n_layer": "--n-layer", "n_head": "--n-head", "n_kv_head": "--n-kv-head", "d_model": "--d-model",
    "d_ff": "--d-ff", "vocab_size": "--vocab-size", "mlp": "--mlp", "tie_embeddings": "--tie",
    "block_size": "--seq-len",
}


# The arguments of gptkit.plan.plan that `gptkit plan` sets from flags of the same names.
_PLAN_ARGS = ("seq_len", "global_batch", "micro_batch", "gpu", "gpus", "strategy", "tp", "tokens", "mfu",
              "precision", "preset")


def _named_as_flag(message: str, names: Container[str]) -> str:
    """``message`` with a leading "top_k: ..." (a field or argument in ``names``) as "--top-k: ...",
    the flag the user typed."""
    return re.sub(r"^(\w+):", lambda m: f"--{m.group(1).replace('_', '-')}:" if m.group(1) in names else m.group(0),
                  message)


def cmd_plan(args: argparse.Namespace, overrides: list[str]) -> int:
    import json

    from gptkit.config import ModelConfig
    from gptkit.plan import format_plan, parse_quantity, plan, plan_as_dict, resolve_model

    if overrides:
        raise ConfigError(f"plan takes no recipe overrides; got {overrides[0]!r} (see gptkit plan --help)")
    shape = {
        "n_layer": args.n_layer,
        "n_head": args.n_head,
        "n_kv_head": args.n_kv_head,
        "d_model": args.d_model,
        "d_ff": args.d_ff,
        "vocab_size": args.vocab_size,
        "mlp": args.mlp,
        "tie_embeddings": args.tie,
    }
    shape = {k: v for k, v in shape.items() if v is not None}
    try:
        if args.preset is not None:
            config, preset = resolve_model(args.preset)
            model = dataclasses.replace(config, **shape) if shape else preset
        else:
            if args.seq_len is not None:
                shape["block_size"] = args.seq_len
            model = ModelConfig(**shape)
        result = plan(
            model,
            seq_len=args.seq_len,
            global_batch=args.global_batch,
            micro_batch=args.micro_batch,
            gpu=args.gpu,
            gpus=args.gpus,
            strategy=args.strategy,
            tp=args.tp,
            tokens=parse_quantity(args.tokens, "tokens") if args.tokens is not None else None,
            mfu=args.mfu,
            precision=args.precision,
            checkpointing=args.checkpointing,
        )
    except ConfigError as exc:
        # Errors name config fields ("model.block_size: ...") or plan()'s arguments ("gpus: ..."):
        # name the flags that set them instead.
        message = re.sub(r"\bmodel\.(\w+)", lambda m: _PLAN_FLAGS.get(m.group(1), m.group(0)), str(exc))
        raise ConfigError(_named_as_flag(message, _PLAN_ARGS)) from None
    if args.json:
        print(json.dumps(plan_as_dict(result), indent=2))
    else:
        print(format_plan(result))
    return 0


# ---------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="gptkit",
        description="Build, train and sample GPT-style language models.",
        epilog="Run `gptkit <command> --help` for the options of each command.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    import torch

    from gptkit import __version__

    parser.add_argument("--version", action="version", version=f"gptkit {__version__} (torch {torch.__version__})")
    # -v also after the command; SUPPRESS keeps the value given before it when it is not repeated.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    commands = parser.add_subparsers(dest="command", metavar="command", required=True)
    raw = argparse.RawDescriptionHelpFormatter

    prepare = commands.add_parser(
        "prepare",
        parents=[common],
        formatter_class=raw,
        help="clean and tokenize a corpus into memory-mapped shards",
        description="Tokenize data.source into token shards, meta.json and tokenizer.json under data.dir.\n"
        "Sources: shakespeare (built in), a .txt file, a folder of .txt files, a .jsonl file with a text field.",
        epilog="example: gptkit prepare --data.source=notes.txt --data.dir=data/notes --data.tokenizer=bpe "
        "--data.vocab_size=2048\n\n" + _fields_help("data"),
    )
    prepare.add_argument("config", nargs="?", help="YAML recipe (optional)")
    prepare.set_defaults(func=cmd_prepare)

    train = commands.add_parser(
        "train",
        parents=[common],
        formatter_class=raw,
        help="train a model from a YAML recipe",
        description="Train (preparing the data first if needed); checkpoints go to train.out_dir/checkpoint.",
        epilog="example: gptkit train configs/shakespeare-char.yaml --train.max_steps=200 --model.n_layer=2\n"
        "--model.preset=NAME (gpt2, gpt2-medium, gpt2-large, gpt2-xl, gpt-micro, gpt-mini, gpt-small-cpu, ...) "
        "sets the shape over the recipe's own shape keys; other --model.* flags override the preset.\n\n" + _fields_help("model", "data", "train"),
    )
    train.add_argument("config", nargs="?", help="YAML recipe, e.g. configs/shakespeare-char.yaml")
    modes = train.add_mutually_exclusive_group()
    modes.add_argument("--resume", action="store_true", help="continue exactly from train.out_dir/checkpoint")
    modes.add_argument(
        "--overwrite", action="store_true",
        help="start over in a train.out_dir that holds a checkpoint (the earlier run's checkpoint, metrics.jsonl "
        "and tensorboard wait in checkpoint.previous, metrics.previous.jsonl and tensorboard.previous until the "
        "new run's first save)",
    )
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(func=cmd_train)

    generate = commands.add_parser(
        "generate",
        parents=[common],
        help="sample text from a checkpoint, streaming to the terminal",
        description="Generate from a gptkit checkpoint (or run directory) or a Hugging Face GPT-2 directory.",
        epilog='example: gptkit generate out/shakespeare-char --prompt "ROMEO:" --top-k 50 --seed 1 --stop "\\n\\n"',
    )
    generate.add_argument("checkpoint", help="checkpoint or run directory (e.g. out/shakespeare-char)")
    prompt_source = generate.add_mutually_exclusive_group()
    prompt_source.add_argument("--prompt", default="", help="text to continue (default: start of a document)")
    prompt_source.add_argument("--prompt-file", help="read the prompt from this UTF-8 file")
    # Sampling flags left out take the recipe's `sample:` section saved with the checkpoint, then
    # the defaults named in the help.
    generate.add_argument("--max-new-tokens", type=int, help="tokens to generate (default 200)")
    generate.add_argument("--temperature", type=float, help="0 = greedy (default 0.8)")
    generate.add_argument("--top-k", type=int, help="sample from the k likeliest tokens (default: all)")
    generate.add_argument("--top-p", type=float,
                          help="sample from the smallest set of tokens whose probabilities reach p (default: off)")
    generate.add_argument("--repetition-penalty", type=float,
                          help="> 1 makes tokens already in the text less likely (CTRL-style; default 1.0 = off)")
    generate.add_argument("--seed", type=int,
                          help="random seed for reproducible samples (default: a fresh one each run)")
    generate.add_argument("--stop", action="append",
                          help="stop when this string appears (repeatable); \\n, \\t, \\r and \\\\ are read as escapes; "
                               "write --stop=-x for a string that starts with '-'")
    generate.add_argument("--num-samples", type=int, default=1, help="samples to draw, one after the other (default 1)")
    generate.add_argument("--tokenizer", help="tokenizer.json or a directory holding one (default: the checkpoint's)")
    generate.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                          help="default auto: cuda when available")
    generate.set_defaults(func=cmd_generate)

    convert = commands.add_parser(
        "convert",
        parents=[common],
        help="convert between gptkit checkpoints and Hugging Face directories",
        description="gptkit checkpoint -> Hugging Face (GPT2LMHeadModel / LlamaForCausalLM) directory, or back.",
    )
    convert.add_argument("source", help="gptkit checkpoint/run directory or Hugging Face model directory")
    convert.add_argument("destination", help="directory to write")
    convert.add_argument(
        "--to",
        choices=["hf", "gptkit"],
        help="target format (default: the other one); --to gptkit on a sharded checkpoint of a multi-process "
        "run gathers its shards into one model.safetensors",
    )
    convert.add_argument(
        "--force", action="store_true",
        help="replace an existing destination that holds only a model (never the source or other files)",
    )
    convert.set_defaults(func=cmd_convert)

    plan = commands.add_parser(
        "plan",
        parents=[common],
        help="estimate parameters, FLOPs, memory per GPU and time to train at scale",
        description="Plan a training run by arithmetic: parameters, training FLOPs, memory per GPU for "
        "weights, gradients, AdamW state and activations under a parallel strategy, whether it fits, "
        "step time and days to train; suggests a strategy that fits when it does not.",
        epilog="Shape flags override the preset's fields; without --preset they start from GPT-2's shape. "
        "Extra presets: gpt3-1.3b, gpt3-2.7b, gpt3-6.7b, gpt3-13b, gpt3-175b, llama-2-7b, llama-2-70b, "
        "llama-3-405b, gpt-1t.",
    )
    plan.add_argument("--preset", help="model preset, e.g. gpt2, gpt3-175b, llama-2-70b")
    plan.add_argument("--n-layer", type=int)
    plan.add_argument("--n-head", type=int)
    plan.add_argument("--n-kv-head", type=int)
    plan.add_argument("--d-model", type=int)
    plan.add_argument("--d-ff", type=int)
    plan.add_argument("--vocab-size", type=int)
    plan.add_argument("--mlp", choices=["gelu", "swiglu"])
    plan.add_argument("--tie", action=argparse.BooleanOptionalAction, default=None, help="tie embeddings")
    plan.add_argument("--seq-len", type=int, help="tokens per sequence (default: the model's block size)")
    plan.add_argument("--global-batch", type=int, help="sequences per optimizer step (default: ~2^19 tokens)")
    plan.add_argument("--micro-batch", type=int, help="sequences per GPU per forward (default: no accumulation)")
    plan.add_argument("--gpu", default="H100", help="A100, H100 or H200 (default H100)")
    plan.add_argument("--gpus", type=int, default=1, help="number of GPUs (default 1)")
    plan.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp", "tp", "fsdp+tp"])
    plan.add_argument("--tp", type=int, help="tensor-parallel degree (default: all GPUs for tp; for fsdp+tp the largest of 8, 4, 2 that divides "
                           "the head count and leaves 2 data-parallel groups)")
    plan.add_argument("--tokens", help="training tokens, e.g. 300e9 or 300B (default: 20 per parameter)")
    plan.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilization (default 0.4)")
    plan.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    plan.add_argument("--checkpointing", action="store_true", help="full activation checkpointing")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.set_defaults(func=cmd_plan)
    return parser


def _override_in_recipe_slot(args: argparse.Namespace, extra: list[str], argv: list[str]) -> list[str]:
    """argparse reads an argument that holds a space as a positional one, so
    ``--data.source="my corpus.txt"`` lands in the recipe's place: put it back among the overrides
    (in command-line order, since the last of two equal keys wins) and give the recipe's place to
    the first plain argument left over, if any. Returns the arguments to read as overrides."""
    config = getattr(args, "config", None)
    if config is None or not _OVERRIDE.fullmatch(config):
        return extra
    first_plain = next((index for index, arg in enumerate(extra) if not arg.startswith("-")), None)
    args.config = None if first_plain is None else extra[first_plain]
    rest = [arg for index, arg in enumerate(extra) if index != first_plain] + [config]
    # Each argument takes its own place in argv: two equal strings (the same key and value given
    # twice) must not both take the first one's place, or a later other value would end up last.
    places: dict[str, list[int]] = {}
    for index, arg in enumerate(argv):
        places.setdefault(arg, []).append(index)
    keyed = [(places[arg].pop(0) if places.get(arg) else len(argv), arg) for arg in rest]
    return [arg for _, arg in sorted(keyed, key=lambda pair: pair[0])]


_OVERRIDE = re.compile(_DOTTED_KEY.pattern + "=.*", re.DOTALL)  # --section.field=value


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = _join_spaced_overrides(sys.argv[1:] if argv is None else list(argv))
    args, extra = parser.parse_known_args(argv)
    subparser = parser._subparsers._group_actions[0].choices[args.command]  # type: ignore[union-attr]
    overrides = _split_overrides(subparser, _override_in_recipe_slot(args, extra, argv))
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    previous = _catch_sigterm()
    try:
        return args.func(args, overrides)
    except GptkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Terminated:  # before KeyboardInterrupt, its base class
        print("error: terminated by SIGTERM", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class Terminated(KeyboardInterrupt):
    """SIGTERM (what torchrun, schedulers and ``kill`` send) arrived: unwind like Ctrl-C, so that
    every temporary file and directory is removed on the way out, and say so in one line. A
    KeyboardInterrupt so that code which lets Ctrl-C through lets it through too (tqdm's logging
    handler swallows any other exception raised while it writes a line)."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


def _catch_sigterm() -> Any:
    """Turn SIGTERM into :class:`Terminated` while a command runs; returns the handler it replaced
    (None when left alone: not the main thread, a torchrun worker, or someone else's handler is
    installed)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    if "TORCHELASTIC_RUN_ID" in os.environ:
        # A torchrun worker: its agent sends SIGTERM to stop the ranks when one fails, and a rank
        # blocked in a collective would not run a Python handler until it was killed outright.
        return None
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return None
    return signal.signal(signal.SIGTERM, _raise_terminated)


if __name__ == "__main__":
    sys.exit(main())
