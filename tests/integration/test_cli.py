"""The ``gptkit`` command line, run as a real process: the whole path from a text file to a
sample and a Hugging Face export, and one-line errors (no traceback, nothing half-written)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TEXT = "".join(f"ROMEO {i}: But soft, what light through yonder window breaks? It is the east.\n" for i in range(300))


def gptkit(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "gptkit.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    if check and result.returncode != 0:
        raise AssertionError(f"gptkit {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result


def finished_tiny_run(root: Path, *, max_steps: int, train_extra: str = "") -> Path:
    """``root`` with a corpus, a recipe of absolute paths for a 1-layer model, and that recipe's run
    finished in ``root / "run"`` (trained in this process: quicker than the CLI). Returns ``root``."""
    from gptkit.config import load_run_config
    from gptkit.train import run_training

    (root / "corpus.txt").write_text(TEXT, encoding="utf-8")
    (root / "recipe.yaml").write_text(
        "model: {n_layer: 1, n_head: 2, d_model: 16, block_size: 16}\n"
        f"data: {{source: {root / 'corpus.txt'}, dir: {root / 'prepared'}}}\n"
        f"train: {{out_dir: {root / 'run'}, max_steps: {max_steps}, batch_size: 4, eval_batches: 1, warmup_steps: 1"
        f"{train_extra}}}\n"
    )
    run_training(load_run_config(root / "recipe.yaml", []))
    return root


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit status 1 and the error as the last line of stderr, whole on that line (log lines of
    work done before the mistake was found may come first)."""
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    assert result.stderr.rstrip("\n").splitlines()[-1] == lines[0], result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    (root / "corpus.txt").write_text(TEXT, encoding="utf-8")
    (root / "recipe.yaml").write_text(
        "model: {n_layer: 2, n_head: 2, d_model: 32, block_size: 32}\n"
        "data: {source: corpus.txt, dir: prepared}\n"
        "train: {out_dir: run, max_steps: 30, batch_size: 8, eval_interval: 10, eval_batches: 2,"
        " log_interval: 10, warmup_steps: 5, lr: 0.003}\n"
    )
    return root


@pytest.fixture(scope="module")
def trained(workdir: Path) -> Path:
    result = gptkit("train", "recipe.yaml", "--quiet", cwd=workdir)
    assert "val loss" in result.stdout
    return workdir / "run"


def test_every_command_has_help(tmp_path: Path) -> None:
    for command in ("prepare", "train", "generate", "convert"):
        result = gptkit(command, "--help", cwd=tmp_path)
        assert "usage: gptkit " + command in result.stdout


def test_prepare_writes_shards_and_metadata(workdir: Path) -> None:
    result = gptkit("prepare", "recipe.yaml", "--data.dir=prepared-explicit", cwd=workdir)
    assert "prepared corpus.txt" in result.stdout
    meta = json.loads((workdir / "prepared-explicit" / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["splits"]["val"]["tokens"] > 0


def test_train_then_generate_streams_text(trained: Path, workdir: Path) -> None:
    metrics = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 30 and "val_loss" in metrics[-1]
    result = gptkit("generate", "run", "--prompt", "ROMEO", "--max-new-tokens", "40", "--seed", "1", cwd=workdir)
    assert result.stdout.startswith("ROMEO") and len(result.stdout) > len("ROMEO") + 10


def test_resume_extends_a_run(trained: Path, workdir: Path) -> None:
    result = gptkit("train", "recipe.yaml", "--resume", "--quiet", "--train.max_steps=35",
                    "--train.out_dir=run", cwd=workdir)
    assert "step 35" in result.stdout
    state = json.loads((trained / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 35


def test_convert_to_hugging_face_and_back(trained: Path, workdir: Path) -> None:
    pytest.importorskip("transformers")
    gptkit("convert", "run", "hf-export", cwd=workdir)
    assert (workdir / "hf-export" / "config.json").exists()
    gptkit("convert", "hf-export", "back", cwd=workdir)
    a = gptkit("generate", "run", "--prompt", "ROMEO", "--temperature", "0", "--max-new-tokens", "20", cwd=workdir)
    b = gptkit("generate", "back", "--prompt", "ROMEO", "--temperature", "0", "--max-new-tokens", "20", cwd=workdir)
    c = gptkit("generate", "hf-export", "--prompt", "ROMEO", "--temperature", "0", "--max-new-tokens", "20",
               "--tokenizer", "run", cwd=workdir)
    # The export's own tokenizer.json (the character tokenizer in Hugging Face's format) serves too.
    d = gptkit("generate", "hf-export", "--prompt", "ROMEO", "--temperature", "0", "--max-new-tokens", "20", cwd=workdir)
    assert a.stdout == b.stdout == c.stdout == d.stdout
    # ... and converting back restores gptkit's own tokenizer file, byte for byte.
    assert (workdir / "back" / "tokenizer.json").read_bytes() == (trained / "checkpoint" / "tokenizer.json").read_bytes()
    exists = gptkit("convert", "run", "hf-export", cwd=workdir, check=False)
    assert_one_line_error(exists, "hf-export exists", "--force")
    # The tokenizer's <|endoftext|> is the export's BOS/EOS, so transformers' generate stops there.
    from gptkit.api import load_tokenizer

    eot = load_tokenizer(trained).eot_id
    for name in ("config.json", "generation_config.json"):
        exported = json.loads((workdir / "hf-export" / name).read_text())
        assert exported["eos_token_id"] == exported["bos_token_id"] == eot
    # transformers loads the exported tokenizer as it is and encodes like gptkit's (unknown
    # characters through the same byte fallback), so the export works in a transformers pipeline.
    import transformers

    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(workdir / "hf-export")
    text = "ROMEO: caf\u00e9 \u65e5\u672c \U0001F600\n" + "<|endoftext|>" + "JULIET"
    assert hf_tokenizer(text)["input_ids"] == load_tokenizer(trained).encode(text)
    assert hf_tokenizer.decode(hf_tokenizer(text)["input_ids"]) == text
    assert hf_tokenizer.eos_token_id == eot
    # --force never replaces the source run (or a folder holding it).
    before = sorted(p.name for p in (trained / "checkpoint").iterdir())
    assert_one_line_error(gptkit("convert", "run", "run", "--force", cwd=workdir, check=False),
                          "is or contains the source")
    assert sorted(p.name for p in (trained / "checkpoint").iterdir()) == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_generate_on_cuda_without_cuda(trained: Path, workdir: Path) -> None:
    assert_one_line_error(gptkit("generate", "run", "--device", "cuda", cwd=workdir, check=False),
                          "device 'cuda': this machine has no CUDA device")


def test_generate_stop_escape_and_bad_options(trained: Path, workdir: Path, tmp_path: Path) -> None:
    # "\n" typed in the shell stops at the first newline (the corpus has one per line).
    result = gptkit("generate", "run", "--prompt", "ROMEO", "--max-new-tokens", "200", "--seed", "1",
                    "--stop", "\\n", cwd=workdir)
    assert result.stdout.count("\n") == 1 and result.stdout.endswith("\n")  # the line break after the sample
    assert_one_line_error(gptkit("generate", "run", "--seed", str(10**23), cwd=workdir, check=False),
                          "seed: must be in [0, 2**63 - 1]")
    # A tokenizer larger than the model's vocabulary fails before the prompt is printed.
    from gptkit.tokenizer.bpe import train_bpe_tokenizer

    train_bpe_tokenizer([TEXT], 300, min_frequency=1).save(tmp_path / "bpe.json")
    mismatch = gptkit("generate", "run", "--prompt", "hi", "--tokenizer", str(tmp_path / "bpe.json"),
                      cwd=workdir, check=False)
    assert_one_line_error(mismatch, "tokenizer has", "but the model only")
    assert mismatch.stdout == ""


# ------------------------------------------------------------------------------ bad input


def test_missing_checkpoint(tmp_path: Path) -> None:
    assert_one_line_error(gptkit("generate", "nowhere", cwd=tmp_path, check=False), "checkpoint not found: nowhere")


def test_corrupt_checkpoint(trained: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((trained / "checkpoint" / "config.json").read_text())
    (broken / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    assert_one_line_error(gptkit("generate", str(broken), cwd=tmp_path, check=False), "corrupt checkpoint weights")
    (broken / "config.json").write_text("{not json")
    assert_one_line_error(gptkit("generate", str(broken), cwd=tmp_path, check=False), "corrupt checkpoint config")


def test_convert_a_damaged_hugging_face_directory(tmp_path: Path) -> None:
    """Only gptkit's one line on stderr (no traceback, no transformers report or progress bar),
    and nothing written."""
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=61, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "hf")
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    (tmp_path / "hf" / "model.safetensors").unlink()
    (tmp_path / "hf" / "pytorch_model.bin").write_bytes(b"")  # an older save's pickle, empty
    result = gptkit("convert", "hf", "out", cwd=tmp_path, check=False)
    assert_one_line_error(result, "cannot load Hugging Face model from hf")
    (tmp_path / "hf" / "pytorch_model.bin").unlink()
    del weights["transformer.h.1.ln_2.bias"]
    save_file(weights, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    result = gptkit("convert", "hf", "out", cwd=tmp_path, check=False)
    assert_one_line_error(result, "missing weights ['transformer.h.1.ln_2.bias']")
    assert result.stderr.count("\n") == 1, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_unknown_config_key(workdir: Path) -> None:
    result = gptkit("train", "recipe.yaml", "--train.learning_rate=1", cwd=workdir, check=False)
    assert_one_line_error(result, "unknown key 'train.learning_rate'", "allowed keys")


def test_out_of_range_value(workdir: Path, tmp_path: Path) -> None:
    result = gptkit("train", "recipe.yaml", "--model.dropout=2", f"--train.out_dir={tmp_path / 'x'}",
                    cwd=workdir, check=False)
    assert_one_line_error(result, "model.dropout: must be in [0, 1); got 2")
    assert not (tmp_path / "x").exists()


def test_prompt_longer_than_context(trained: Path, workdir: Path) -> None:
    result = gptkit("generate", "run", "--prompt", "R" * 100, cwd=workdir, check=False)
    assert_one_line_error(result, "prompt is 100 tokens", "context of 32 tokens")
    assert result.stdout == ""


def test_empty_corpus(tmp_path: Path) -> None:
    (tmp_path / "blank.txt").write_text("  \n\n", encoding="utf-8")
    result = gptkit("prepare", "--data.source=blank.txt", "--data.dir=out", cwd=tmp_path, check=False)
    assert_one_line_error(result, "corpus blank.txt is empty")
    assert not (tmp_path / "out").exists()


def test_unreadable_corpus_file(tmp_path: Path) -> None:
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00\x81 not utf-8")
    result = gptkit("train", "--data.source=binary.txt", "--data.dir=out", "--train.out_dir=run",
                    cwd=tmp_path, check=False)
    assert_one_line_error(result, "binary.txt", "UTF-8")
    assert not (tmp_path / "out").exists() and not (tmp_path / "run").exists()


def test_not_a_recipe_file(tmp_path: Path) -> None:
    assert_one_line_error(gptkit("train", "missing.yaml", cwd=tmp_path, check=False), "config file not found")


def test_generate_to_a_stdout_that_is_not_utf8(trained: Path, workdir: Path) -> None:
    """A pipe or terminal in ASCII gets replacement marks for what it cannot show, not a crash."""
    env = {**os.environ, "PYTHONIOENCODING": "ascii"}
    result = subprocess.run(
        [sys.executable, "-m", "gptkit.cli", "generate", "run", "--prompt", "h\u00e9 ROMEO", "--max-new-tokens", "5",
         "--seed", "1"],
        cwd=workdir, env=env, capture_output=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert result.stdout.startswith(b"h? ROMEO")
