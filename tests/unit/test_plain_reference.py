"""benchmarks/_plain_gpt.py, the plain PyTorch reference of the training benchmark, computes what
gptkit's GPT-2 computes (or the benchmark's third row would time a different model)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from gptkit.model import GPT, ModelConfig

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "_plain_gpt.py"


def load_plain_gpt():
    spec = importlib.util.spec_from_file_location("plain_gpt", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.PlainGPT


@pytest.mark.parametrize("bias", [True, False])
def test_plain_reference_matches_gptkit_forward_and_gradients(bias: bool) -> None:
    torch.manual_seed(0)
    config = ModelConfig(n_layer=2, n_head=4, d_model=64, block_size=32, vocab_size=97, dropout=0.0, bias=bias,
                         init_std=0.2)  # activations of order 1, where GELU variants differ
    model = GPT(config).train()
    plain = load_plain_gpt()(config).train()
    plain.load_state_dict(model.state_dict())  # strict: every name matches
    tokens = torch.randint(0, config.vocab_size, (3, 32))
    torch.testing.assert_close(plain(tokens), model(tokens), rtol=1e-5, atol=1e-5)
    model(tokens).square().mean().backward()
    plain(tokens).square().mean().backward()
    plain_grads = dict(plain.named_parameters())
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(plain_grads[name].grad, parameter.grad, rtol=1e-4, atol=1e-6)


def test_plain_reference_refuses_other_architectures() -> None:
    with pytest.raises(ValueError, match="GPT-2 architecture only"):
        load_plain_gpt()(ModelConfig(n_layer=1, n_head=2, d_model=32, block_size=8, vocab_size=11, position="rope"))
