"""The public Python API: gptkit.load (gptkit checkpoints for every option combination, run
directories, Hugging Face directories), gptkit.load_tokenizer and gptkit.generate."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

import gptkit
from gptkit.checkpoint import write_model_files
from gptkit.errors import CheckpointError
from gptkit.model import GPT, ModelConfig
from gptkit.tokenizer import train_char_tokenizer

BASE = ModelConfig(vocab_size=80, block_size=32, n_layer=2, n_head=4, d_model=32)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"position": "rope", "norm": "rmsnorm", "mlp": "swiglu", "n_kv_head": 2, "bias": False,
         "tie_embeddings": False},
        {"position": "rope", "n_kv_head": 1, "qk_norm": True, "tie_embeddings": True, "bias": False},
    ],
)
def test_checkpoint_round_trip_keeps_logits(tmp_path: Path, options: dict) -> None:
    torch.manual_seed(0)
    model = GPT(dataclasses.replace(BASE, **options)).eval()
    write_model_files(tmp_path / "ckpt", model)
    loaded = gptkit.load(tmp_path / "ckpt")
    assert loaded.config == model.config and not loaded.training
    tokens = torch.randint(0, 80, (2, 12))
    torch.testing.assert_close(loaded(tokens), model(tokens), atol=0, rtol=0)


def test_load_accepts_a_run_directory_and_a_hugging_face_directory(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from gptkit.model.hf import save_hf

    torch.manual_seed(0)
    model = GPT(BASE).eval()
    write_model_files(tmp_path / "run" / "checkpoint", model)
    save_hf(model, tmp_path / "hf")
    tokens = torch.randint(0, 80, (1, 10))
    torch.testing.assert_close(gptkit.load(tmp_path / "run")(tokens), model(tokens), atol=0, rtol=0)
    torch.testing.assert_close(gptkit.load(tmp_path / "hf")(tokens), model(tokens), atol=1e-5, rtol=1e-5)


def test_load_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        gptkit.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"has no config.json \(give a checkpoint directory, or a run directory"):
        gptkit.load(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        gptkit.load_tokenizer(tmp_path / "empty")
    # A run whose only checkpoint was set aside by an --overwrite that stopped before its first save:
    # the error says where it is and how to get it back, and loads nothing else.
    write_model_files(tmp_path / "run" / "checkpoint.previous", GPT(BASE))
    with pytest.raises(CheckpointError, match=r"earlier run's checkpoint in .*checkpoint\.previous, .* rename it to "):
        gptkit.load(tmp_path / "run")
    (tmp_path / "run" / "checkpoint.previous").rename(tmp_path / "run" / "checkpoint")
    assert gptkit.load(tmp_path / "run").config == BASE


def test_arguments_of_the_wrong_kind_are_typed_errors(tmp_path: Path) -> None:
    """Not an AttributeError from deep inside generation, nor pathlib's TypeError."""
    from gptkit.errors import RequestError, TokenizerError

    tokenizer = train_char_tokenizer(["hello"])
    model = GPT(dataclasses.replace(BASE, vocab_size=tokenizer.vocab_size)).eval()
    with pytest.raises(RequestError, match="model must be a gptkit GPT .*; got CharTokenizer"):
        gptkit.generate(tokenizer, model, "he")  # swapped
    with pytest.raises(RequestError, match="model must be a gptkit GPT .*; got str"):
        gptkit.generate(str(tmp_path), tokenizer, "he")
    with pytest.raises(RequestError, match="tokenizer must be a gptkit Tokenizer .*; got NoneType"):
        gptkit.generate(model, None, "he")
    with pytest.raises(CheckpointError, match="path must be a checkpoint or model directory .*; got NoneType"):
        gptkit.load(None)
    with pytest.raises(TokenizerError, match="path must be a directory or a tokenizer.json .*; got int"):
        gptkit.load_tokenizer(3)
    assert gptkit.generate(model, tokenizer, "he", max_new_tokens=2, seed=0).finish_reason in ("length", "eot")


def test_weights_of_another_shape_are_refused(tmp_path: Path) -> None:
    write_model_files(tmp_path / "a", GPT(BASE))
    write_model_files(tmp_path / "b", GPT(dataclasses.replace(BASE, d_model=64)))
    (tmp_path / "a" / "model.safetensors").write_bytes((tmp_path / "b" / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor .* has shape \(64,?.*\), the config needs \(32"):
        gptkit.load(tmp_path / "a")


def test_generate_end_to_end(tmp_path: Path) -> None:
    tokenizer = train_char_tokenizer(["hello world"])
    tokenizer.save(tmp_path / "ckpt")
    torch.manual_seed(0)
    write_model_files(tmp_path / "ckpt", GPT(dataclasses.replace(BASE, vocab_size=tokenizer.vocab_size)))
    model, tok = gptkit.load(tmp_path / "ckpt"), gptkit.load_tokenizer(tmp_path / "ckpt")
    completion = gptkit.generate(model, tok, "hello", max_new_tokens=8, temperature=0.0)
    again = gptkit.generate(model, tok, "hello", max_new_tokens=8, temperature=0.0)
    assert completion == again and completion.finish_reason in {"length", "eot"}
    assert tok.decode(completion.token_ids) == completion.text


def test_load_checks_the_device_before_reading_anything(tmp_path: Path) -> None:
    from gptkit.errors import ConfigError

    write_model_files(tmp_path / "ckpt", GPT(BASE))
    with pytest.raises(ConfigError, match=r"^device 'gpu' is not a device torch knows; use 'cpu', 'cuda'"):
        gptkit.load(tmp_path / "ckpt", device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"^device 'cuda': this machine has no CUDA device"):
            gptkit.load(tmp_path / "ckpt", device="cuda")
    assert gptkit.load(tmp_path / "ckpt", device=torch.device("cpu")).token_embedding.weight.device.type == "cpu"


def test_a_single_stop_string_is_one_stop_string(tmp_path: Path) -> None:
    """stop="ab" means the string "ab", not the characters "a" and "b"."""
    tokenizer = train_char_tokenizer(["abcdefgh "])
    torch.manual_seed(3)
    model = GPT(dataclasses.replace(BASE, vocab_size=tokenizer.vocab_size, init_std=0.5)).eval()
    free = gptkit.generate(model, tokenizer, "a", max_new_tokens=24, temperature=0.0)
    text = free.text
    # A two-character stop string whose first occurrence comes after one of its characters has
    # already appeared: as a string it cuts the text there; split into characters, earlier.
    cut = next(i for i in range(1, len(text) - 1)
               if text.find(text[i:i + 2]) == i and min(text.find(text[i]), text.find(text[i + 1])) < i)
    stop = text[cut:cut + 2]
    as_string = gptkit.generate(model, tokenizer, "a", max_new_tokens=24, temperature=0.0, stop=stop)
    as_list = gptkit.generate(model, tokenizer, "a", max_new_tokens=24, temperature=0.0, stop=[stop])
    assert as_string == as_list and as_string.text == text[:cut] and as_string.finish_reason == "stop"


def test_generate_takes_stop_none_and_refuses_a_stop_that_is_not_text(tmp_path: Path) -> None:
    from gptkit.errors import ConfigError

    tokenizer = train_char_tokenizer(["hello world"])
    torch.manual_seed(0)
    model = GPT(dataclasses.replace(BASE, vocab_size=tokenizer.vocab_size)).eval()
    plain = gptkit.generate(model, tokenizer, "hello", max_new_tokens=6, temperature=0.0)
    assert gptkit.generate(model, tokenizer, "hello", max_new_tokens=6, temperature=0.0, stop=None) == plain
    for stop in (5, 1.5):
        with pytest.raises(ConfigError, match="stop: must be"):
            gptkit.generate(model, tokenizer, "hello", max_new_tokens=6, stop=stop)  # type: ignore[arg-type]


def test_generate_passes_every_sampling_option_on(tmp_path: Path) -> None:
    """top_k, top_p and repetition_penalty reach the decoder: a nucleus of one token is greedy at
    any temperature, and the penalty gives decode_tokens' penalised tokens."""
    from gptkit.generate import decode_tokens

    tokenizer = train_char_tokenizer(["hello world"])
    torch.manual_seed(0)
    model = GPT(dataclasses.replace(BASE, vocab_size=tokenizer.vocab_size)).eval()
    greedy = gptkit.generate(model, tokenizer, "hello", max_new_tokens=12, temperature=0.0)
    for options in ({"top_k": 1}, {"top_p": 1e-9}):
        assert gptkit.generate(model, tokenizer, "hello", max_new_tokens=12, temperature=3.0, seed=0,
                               **options) == greedy, options
    assert gptkit.generate(model, tokenizer, "hello", max_new_tokens=12, temperature=3.0, seed=0) != greedy
    penalised = gptkit.generate(model, tokenizer, "hello", max_new_tokens=12, temperature=0.0, repetition_penalty=1.5)
    steps = decode_tokens(model, torch.tensor([tokenizer.encode("hello")]), max_new_tokens=12, temperature=0.0,
                          repetition_penalty=1.5)
    expected = [int(t) for t in steps]
    assert len(penalised.token_ids) >= 3 and penalised.token_ids == expected[: len(penalised.token_ids)]
    assert penalised.token_ids != greedy.token_ids[: len(penalised.token_ids)]


def test_load_refuses_a_config_too_big_for_this_machine_before_building_it(tmp_path: Path) -> None:
    """A hand-edited config.json (n_layer=10^8) would otherwise build blocks until memory runs out."""
    import json

    write_model_files(tmp_path / "ckpt", GPT(BASE))
    config_path = tmp_path / "ckpt" / "config.json"
    config = json.loads(config_path.read_text())
    config["model"]["n_layer"] = 100_000_000
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config\.json: the model has [\d,]+ parameters.*cannot be loaded here"):
        gptkit.load(tmp_path / "ckpt")  # refused from the config alone: building it would take hours
