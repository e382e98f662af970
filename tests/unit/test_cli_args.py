"""The command line's own parts, in process: argument errors, escapes, recipe and destination checks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gptkit.cli import (
    _check_convert_destination, _check_recipe_path, _join_spaced_overrides, _unescape, build_parser, main,
)
from gptkit.errors import ConfigError


def test_usage_mistakes_are_one_line_naming_the_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["generate", "run", "--stop"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err == "error: argument --stop: expected one argument (see `gptkit generate --help`)\n"


@pytest.mark.parametrize("typed, meant", [
    (["--train.max_steps", "200"], ["--train.max_steps=200"]),
    (["--train.lr", "-1e-3", "x.yaml"], ["--train.lr=-1e-3", "x.yaml"]),
    (["--data.source", "notes.txt", "--train.compile=true"], ["--data.source=notes.txt", "--train.compile=true"]),
    (["--train.compile", "-v"], ["--train.compile", "-v"]),  # an option is not a value
    (["--", "--train.max_steps", "2"], ["--", "--train.max_steps", "2"]),
    (["--prompt", "x.y"], ["--prompt", "x.y"]),  # only dotted keys are joined
])
def test_overrides_take_their_value_after_a_space(typed: list[str], meant: list[str]) -> None:
    assert _join_spaced_overrides(typed) == meant


def test_an_override_without_a_value_names_both_forms(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["train", "--train.compile"])
    assert info.value.code == 2
    assert capsys.readouterr().err == (
        "error: --train.compile needs a value: --train.compile=VALUE or --train.compile VALUE "
        "(see `gptkit train --help`)\n"
    )


def test_an_override_whose_value_holds_a_space_is_not_taken_for_the_recipe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """argparse reads an argument holding a space as a positional one: `gptkit prepare
    --data.source="my corpus.txt"` was refused as a recipe path that "looks like a corpus"."""
    import json

    monkeypatch.chdir(tmp_path)
    Path("my corpus.txt").write_text("to be or not to be, that is the question. " * 40)
    Path("b c.txt").write_text("all the world's a stage, and all the men and women merely players. " * 30)
    assert main(["prepare", "--data.source=my corpus.txt", "--data.dir=d"]) == 0
    assert json.loads(Path("d/meta.json").read_text())["source"] == "my corpus.txt"
    # With a recipe after it, and the same key twice: command-line order, so the last one wins.
    Path("r.yaml").write_text("data: {dir: e}\n")
    assert main(["prepare", "--data.source", "my corpus.txt", "r.yaml", "--data.source=b c.txt"]) == 0
    assert json.loads(Path("e/meta.json").read_text())["source"] == "b c.txt"


def test_version_prints_gptkit_and_torch_versions(capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    import gptkit

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"gptkit {gptkit.__version__} (torch {torch.__version__})\n"


def test_verbose_works_before_and_after_the_command() -> None:
    parser = build_parser()
    assert parser.parse_args(["-v", "plan"]).verbose is True
    assert parser.parse_args(["plan", "-v"]).verbose is True
    assert parser.parse_args(["plan"]).verbose is False


def test_train_help_lists_the_recipe_keys(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "train.{out_dir, max_steps," in out and "data.{source, dir, tokenizer" in out and "model.{vocab_size" in out


@pytest.mark.parametrize(
    "typed, meant",
    [(r"\n\n", "\n\n"), (r"a\tb", "a\tb"), (r"\r\n", "\r\n"), (r"\\n", "\\n"), (r"c:\path", "c:\\path"), ("x", "x")],
)
def test_stop_strings_read_shell_escapes(typed: str, meant: str) -> None:
    assert _unescape(typed) == meant


def test_a_corpus_given_as_the_recipe_says_how_to_pass_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"hamlet.txt looks like a corpus, not a YAML recipe: pass it as --data.source=hamlet.txt"):
        _check_recipe_path("hamlet.txt")
    _check_recipe_path("configs/shakespeare-char.yaml")  # recipes pass, existing or not
    _check_recipe_path(None)


def make_model_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"x")
    return path


def test_convert_never_replaces_the_source_or_what_holds_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    checkpoint = make_model_dir(run / "checkpoint")
    monkeypatch.chdir(tmp_path)
    for destination in (run, checkpoint, tmp_path, Path(".")):
        with pytest.raises(ConfigError, match="is or contains the (source|current directory)"):
            _check_convert_destination(Path("run"), checkpoint, destination, force=True)
    with pytest.raises(ConfigError, match="is or contains the current directory"):
        _check_convert_destination(Path("/elsewhere/run"), Path("/elsewhere/run/checkpoint"), tmp_path.parent,
                                   force=True)


def test_convert_force_replaces_only_a_model_directory(tmp_path: Path) -> None:
    source = make_model_dir(tmp_path / "src")
    previous = make_model_dir(tmp_path / "hf")
    (previous / "tokenizer.json").write_text("{}")
    (previous / "generation_config.json").write_text("{}")
    with pytest.raises(ConfigError, match="hf exists; pass --force to replace it"):
        _check_convert_destination(source, source, previous, force=False)
    _check_convert_destination(source, source, previous, force=True)  # an earlier export: fine
    (tmp_path / "empty").mkdir()
    _check_convert_destination(source, source, tmp_path / "empty", force=False)  # nothing to lose
    _check_convert_destination(source, source, tmp_path / "new", force=False)
    work = make_model_dir(tmp_path / "work")
    (work / "notes.txt").write_text("mine")
    (work / "data").mkdir()
    with pytest.raises(ConfigError, match=r"holds more than a model \(data, notes.txt\)"):
        _check_convert_destination(source, source, work, force=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="exists and is not a directory"):
        _check_convert_destination(source, source, tmp_path / "file", force=True)


def _tiny_checkpoint(directory: Path) -> None:
    import torch

    from gptkit.checkpoint import write_model_files
    from gptkit.model import GPT, ModelConfig
    from gptkit.tokenizer import train_char_tokenizer

    tokenizer = train_char_tokenizer(["hello world\r\n"])
    tokenizer.save(directory)
    torch.manual_seed(0)
    write_model_files(directory, GPT(ModelConfig(vocab_size=tokenizer.vocab_size, block_size=16, n_layer=1,
                                                 n_head=2, d_model=16)))


def test_num_samples_at_the_largest_seed_draw_every_sample(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _tiny_checkpoint(tmp_path / "ckpt")
    code = main(["generate", str(tmp_path / "ckpt"), "--prompt", "he", "--max-new-tokens", "3",
                 "--seed", str(2**63 - 1), "--num-samples", "2"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "--- sample 2 ---" in captured.out


def test_prompt_file_is_read_exactly_as_stored(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """As prepare reads a corpus: "\\r\\n" and a lone "\\r" reach the model (and the echo) unchanged."""
    _tiny_checkpoint(tmp_path / "ckpt")
    (tmp_path / "prompt.txt").write_bytes(b"hello\r\nworld\r")
    code = main(["generate", str(tmp_path / "ckpt"), "--prompt-file", str(tmp_path / "prompt.txt"),
                 "--max-new-tokens", "0"])
    assert code == 0
    assert capsys.readouterr().out == "hello\r\nworld\r\n"


def test_prompt_and_prompt_file_together_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _tiny_checkpoint(tmp_path / "ckpt")
    (tmp_path / "prompt.txt").write_text("hello")
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", str(tmp_path / "ckpt"), "--prompt", "he", "--prompt-file", str(tmp_path / "prompt.txt")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "--prompt-file: not allowed with argument --prompt" in err and "\n" not in err


def test_generate_takes_the_recipes_sample_settings_and_flags_win(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    from gptkit.checkpoint import write_model_files
    from gptkit.model import GPT, ModelConfig
    from gptkit.tokenizer import train_char_tokenizer

    tokenizer = train_char_tokenizer(["hello world"])
    tokenizer.save(tmp_path / "ckpt")
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tokenizer.vocab_size, block_size=64, n_layer=1, n_head=2, d_model=16))
    recipe = {"sample": {"max_new_tokens": 5, "temperature": 0.0, "top_k": None, "top_p": None,
                         "repetition_penalty": 1.0, "seed": None, "stop": []}}
    write_model_files(tmp_path / "ckpt", model, {"run": recipe})

    def sample(*flags: str) -> str:
        assert main(["generate", str(tmp_path / "ckpt"), "--prompt", "he", *flags]) == 0
        return capsys.readouterr().out

    def greedy(n: int, penalty: float = 1.0) -> str:
        from gptkit.generate import apply_repetition_penalty

        ids = tokenizer.encode("he")
        with torch.no_grad():
            for _ in range(n):
                logits = model(torch.tensor([ids]))[:, -1]
                seen = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, torch.tensor([ids]), True)
                ids.append(int(apply_repetition_penalty(logits, seen, penalty).argmax()))
        return tokenizer.decode(ids) + "\n"

    assert greedy(5) != greedy(9)
    assert sample() == greedy(5)  # the recipe's 5 tokens at temperature 0
    assert sample("--max-new-tokens", "9") == greedy(9)  # the flag wins, the recipe's temperature stays
    # Each sampling flag reaches the decoder: at temperature 3 only a nucleus of one token is greedy.
    assert sample("--temperature", "3", "--seed", "1") != greedy(5)
    assert sample("--temperature", "3", "--seed", "1", "--top-k", "1") == greedy(5)
    assert sample("--temperature", "3", "--seed", "1", "--top-p", "1e-9") == greedy(5)
    assert greedy(9, 1.5) != greedy(9)
    assert sample("--max-new-tokens", "9", "--repetition-penalty", "1.5") == greedy(9, 1.5)


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--top-k", "0"], "error: --top-k: must be > 0, got 0\n"),
        (["--top-p", "2"], "error: --top-p: must be in (0, 1]; got 2.0\n"),
        (["--temperature", "-1"], "error: --temperature: must be >= 0, got -1.0\n"),
        (["--repetition-penalty", "0"], "error: --repetition-penalty: must be > 0"),
        (["--max-new-tokens", "-3"], "error: --max-new-tokens: must be >= 0"),
    ],
)
def test_a_bad_sampling_flag_is_named_as_the_flag(
    flags: list[str], named: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Checked before the checkpoint is read (there is none here), and named as typed."""
    assert main(["generate", str(tmp_path / "nowhere"), *flags]) == 1
    assert capsys.readouterr().err.startswith(named)


def test_an_invalid_sample_setting_saved_with_the_checkpoint_names_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from gptkit.checkpoint import write_model_files
    from gptkit.model import GPT, ModelConfig
    from gptkit.tokenizer import train_char_tokenizer

    tokenizer = train_char_tokenizer(["hello world"])
    tokenizer.save(tmp_path / "ckpt")
    model = GPT(ModelConfig(vocab_size=tokenizer.vocab_size, block_size=16, n_layer=1, n_head=2, d_model=16))
    write_model_files(tmp_path / "ckpt", model, {"run": {"sample": {"temperature": -1, "max_new_tokens": 2}}})
    assert main(["generate", str(tmp_path / "ckpt"), "--prompt", "he"]) == 1
    assert capsys.readouterr().err == (
        f"error: {tmp_path / 'ckpt' / 'config.json'}: the recipe saved with the checkpoint has an invalid "
        "sample.temperature (temperature: must be >= 0, got -1); pass --temperature to override it\n"
    )
    # The flag overrides the bad value.
    assert main(["generate", str(tmp_path / "ckpt"), "--prompt", "he", "--temperature", "0"]) == 0


def test_sigterm_raised_while_a_log_line_is_written_is_not_swallowed() -> None:
    """The progress bar routes log lines through tqdm's handler, which swallows any exception but
    Ctrl-C's: SIGTERM's exception must get through it as KeyboardInterrupt does (a run went on)."""
    import logging

    from tqdm.contrib.logging import logging_redirect_tqdm

    from gptkit.cli import Terminated

    class SigtermWhileFormatting:
        def __str__(self) -> str:
            raise Terminated()

    logger = logging.getLogger("gptkit.test_sigterm")
    logger.addHandler(logging.StreamHandler())
    logger.propagate = False  # only tqdm's handler sees the record (pytest's own would raise it)
    try:
        with pytest.raises(Terminated), logging_redirect_tqdm(loggers=[logger]):
            logger.warning(SigtermWhileFormatting())
    finally:
        logger.handlers.clear()


def test_train_keeps_freed_memory_unless_malloc_is_configured(monkeypatch) -> None:
    """`gptkit train` raises glibc's trim and mmap thresholds (no page faults re-filling freed
    activations every step); a user's own MALLOC_* or glibc.malloc tunables win."""
    import platform

    from gptkit.cli import _keep_freed_memory

    for name in [n for n in os.environ if n.startswith("MALLOC_")]:
        monkeypatch.delenv(name)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert _keep_freed_memory() is True
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert _keep_freed_memory() is False
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=131072")
    assert _keep_freed_memory() is False
    monkeypatch.delenv("GLIBC_TUNABLES")
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")  # another of glibc's knobs: ours still apply
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert _keep_freed_memory() is True


def test_the_same_spaced_override_given_twice_keeps_its_last_place(tmp_path: Path) -> None:
    """--data.source="a b" --data.source=c --data.source="a b": the last one given wins ("a b"), even
    though the first, holding a space, landed in the recipe's place and was put back."""
    import json

    corpus = tmp_path / "my corpus.txt"
    corpus.write_text("to be or not to be, that is the question. " * 40)
    missing = tmp_path / "missing.txt"
    argv = ["prepare", f"--data.source={corpus}", f"--data.source={missing}", f"--data.source={corpus}",
            f"--data.dir={tmp_path / 'data'}", "--data.tokenizer=char"]
    assert main(argv) == 0
    assert json.loads((tmp_path / "data" / "meta.json").read_text())["source_path"] == str(corpus)
