"""Each modern option changes what it should: RoPE, RMSNorm, SwiGLU, GQA, bias, tying, QK-norm;
Muon and the warm-up-stable-decay schedule."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from gptkit.config import ModelConfig, TrainConfig
from gptkit.errors import ConfigError
from gptkit.model import GPT
from gptkit.model.layers import RMSNorm, RotaryEmbedding, apply_rotary
from gptkit.train.muon import MuonWithAdamW, orthogonalize
from gptkit.train.optim import build_optimizer, hidden_matrices
from gptkit.train.schedule import learning_rate
from gptkit.train.trainer import causal_lm_loss

BASE = ModelConfig(vocab_size=64, block_size=32, n_layer=2, n_head=4, d_model=32)


def test_rope_scores_depend_only_on_the_offset() -> None:
    """<R(m) q, R(n) k> is the same for every pair (m, n) with the same m - n."""
    torch.manual_seed(0)
    rope = RotaryEmbedding(head_dim=16, max_len=64, base=10000.0)
    q, k = torch.randn(16), torch.randn(16)

    def score(m: int, n: int) -> float:
        cos, sin = rope.cos, rope.sin
        qm = apply_rotary(q.view(1, 1, 1, 16), cos[m], sin[m])
        kn = apply_rotary(k.view(1, 1, 1, 16), cos[n], sin[n])
        return float((qm * kn).sum())

    assert score(5, 2) == pytest.approx(score(40, 37), abs=1e-5)
    assert score(9, 9) == pytest.approx(score(0, 0), abs=1e-5)
    assert score(5, 2) != pytest.approx(score(5, 3), abs=1e-3)
    # rotation keeps the norm
    rotated = apply_rotary(q.view(1, 1, 1, 16), rope.cos[17], rope.sin[17])
    assert rotated.norm().item() == pytest.approx(q.norm().item(), rel=1e-5)


def test_rope_model_has_no_position_table_and_shifted_inputs_see_the_same_context() -> None:
    torch.manual_seed(0)
    model = GPT(dataclasses.replace(BASE, position="rope")).eval()
    assert model.position_embedding is None
    assert GPT(BASE).num_parameters() - model.num_parameters() == BASE.block_size * BASE.d_model
    # The model's own attention, its RoPE tables taken at positions 0..T-1 or s..s+T-1: the same
    # output, since only the offsets between queries and keys enter the scores.
    from gptkit.model.layers import AttentionContext

    x = torch.randn(2, 10, BASE.d_model)
    attn = model.blocks[0].attn

    def at(start: int) -> torch.Tensor:
        positions = torch.arange(start, start + 10).expand(2, 10)
        return attn(x, 0, AttentionContext(rope=model.rotary.tables(positions, 10), mask=None, is_causal=True,
                                           cache=None))

    with torch.no_grad():
        torch.testing.assert_close(at(7), at(0), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(at(21), at(0), atol=1e-5, rtol=1e-5)


def test_rope_base_changes_the_angles() -> None:
    a = RotaryEmbedding(8, 16, 10000.0)
    b = RotaryEmbedding(8, 16, 500.0)
    assert not torch.allclose(a.cos, b.cos)


def test_rmsnorm_output_has_unit_rms() -> None:
    norm = RMSNorm(64, eps=1e-6)
    x = torch.randn(5, 64) * 7 + 3
    y = norm(x)
    assert torch.allclose(y.pow(2).mean(-1).sqrt(), torch.ones(5), atol=1e-4)
    assert not torch.allclose(y.mean(-1), torch.zeros(5), atol=1e-2)  # no centring, unlike LayerNorm


def test_rmsnorm_model_has_no_norm_biases() -> None:
    model = GPT(dataclasses.replace(BASE, norm="rmsnorm"))
    assert isinstance(model.final_norm, RMSNorm)
    assert not hasattr(model.final_norm, "bias")


def test_swiglu_has_gate_and_up_and_default_width() -> None:
    config = dataclasses.replace(BASE, mlp="swiglu", d_model=96, n_head=4)
    model = GPT(config)
    hidden = config.mlp_hidden
    assert hidden == 256  # 8/3 * 96 = 256
    assert model.blocks[0].mlp.up.weight.shape == (2 * hidden, 96)
    assert model.blocks[0].mlp.down.weight.shape == (96, hidden)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_gqa_parameter_count(kv_heads: int) -> None:
    config = dataclasses.replace(BASE, n_kv_head=kv_heads)
    model = GPT(config)
    head_dim = config.head_dim
    qkv_rows = (config.n_head + 2 * kv_heads) * head_dim
    assert model.blocks[0].attn.qkv.weight.shape == (qkv_rows, config.d_model)
    full = GPT(BASE).num_parameters()
    saved_per_layer = 2 * (config.n_head - kv_heads) * head_dim * (config.d_model + 1)  # weights + biases
    assert full - model.num_parameters() == config.n_layer * saved_per_layer


def test_bias_off_removes_every_bias() -> None:
    model = GPT(dataclasses.replace(BASE, bias=False))
    assert not [name for name, _ in model.named_parameters() if name.endswith("bias")]
    assert [name for name, _ in GPT(BASE).named_parameters() if name.endswith("bias")]


def test_qk_norm_normalises_queries_and_keys() -> None:
    model = GPT(dataclasses.replace(BASE, qk_norm=True))
    attn = model.blocks[0].attn
    assert isinstance(attn.q_norm, RMSNorm) and attn.q_norm.weight.shape == (BASE.head_dim,)
    assert GPT(dataclasses.replace(BASE, qk_norm=True)).num_parameters() == GPT(BASE).num_parameters() + (
        BASE.n_layer * 2 * BASE.head_dim
    )


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"n_head": 4, "n_kv_head": 3}, "model.n_head: must be divisible by model.n_kv_head (3); got 4"),
        ({"position": "rope", "n_head": 32, "d_model": 96}, "RoPE needs an even head dimension; got 96/32 = 3"),
    ],
)
def test_bad_option_combinations(fields: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        dataclasses.replace(BASE, **fields)
    assert message in str(info.value)


# ----------------------------------------------------------------------------- optimizers


def test_orthogonalize_moves_singular_values_near_one() -> None:
    torch.manual_seed(0)
    for shape in [(64, 32), (32, 96)]:
        rank = min(shape)
        u, _ = torch.linalg.qr(torch.randn(shape[0], rank))
        v, _ = torch.linalg.qr(torch.randn(shape[1], rank))
        g = u @ torch.diag(torch.logspace(-2, 0, rank)) @ v.T  # singular values 0.01 .. 1
        before = torch.linalg.svdvals(g)
        after = torch.linalg.svdvals(orthogonalize(g))
        assert before.max() / before.min() > 50  # badly conditioned gradient
        assert after.min() > 0.5 and after.max() < 1.3  # every direction gets a similar step


def test_muon_update_is_orthogonalised() -> None:
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.zeros(48, 24))
    optimizer = MuonWithAdamW([{"params": [weight], "use_muon": True, "lr": 1.0, "nesterov": False,
                                "momentum": 0.0}])
    weight.grad = torch.randn(48, 24) @ torch.diag(torch.logspace(-2, 0, 24))
    optimizer.step()
    update = -weight.detach() / (0.2 * 48**0.5)
    singular = torch.linalg.svdvals(update)
    assert singular.min() > 0.5 and singular.max() < 1.3


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_both_optimizers_reduce_the_loss(name: str) -> None:
    torch.manual_seed(0)
    model = GPT(dataclasses.replace(BASE, position="rope", norm="rmsnorm", mlp="swiglu", bias=False))
    config = TrainConfig(optimizer=name, lr=3e-3, weight_decay=0.0)
    optimizer = build_optimizer(model, config)
    x = torch.randint(0, 64, (8, 16))
    batch = (x[:, :-1], x[:, 1:])
    first = float(causal_lm_loss(model, batch).detach())
    for _ in range(30):
        loss = causal_lm_loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert float(causal_lm_loss(model, batch).detach()) < first - 1.0


def test_muon_takes_only_hidden_matrices() -> None:
    model = GPT(BASE)
    optimizer = build_optimizer(model, TrainConfig(optimizer="muon"))
    muon_group = next(g for g in optimizer.param_groups if g["use_muon"])
    assert {id(p) for p in muon_group["params"]} == {id(p) for p in hidden_matrices(model)}
    assert all(id(p) != id(model.token_embedding.weight) for p in muon_group["params"])
    total = sum(len(g["params"]) for g in optimizer.param_groups)
    assert total == len(list(model.parameters()))


def test_muon_run_decays_matrices_only() -> None:
    """Under Muon too, weight decay is for matrices (Muon's and AdamW's); biases and norm scales get none."""
    model = GPT(BASE)
    optimizer = build_optimizer(model, TrainConfig(optimizer="muon", weight_decay=0.1))
    for group in optimizer.param_groups:
        dims = {p.dim() for p in group["params"]}
        assert dims and group["weight_decay"] == (0.1 if dims == {2} else 0.0), (dims, group["weight_decay"])
    assert {p.dim() for g in optimizer.param_groups if g["weight_decay"] == 0.0 for p in g["params"]} == {1}


def test_wsd_schedule_is_flat_then_decays() -> None:
    config = TrainConfig(lr=1e-3, min_lr=1e-5, warmup_steps=10, max_steps=110, schedule="wsd", decay_fraction=0.2)
    lrs = [learning_rate(step, config) for step in range(111)]
    assert all(lr == pytest.approx(1e-3) for lr in lrs[10:90])
    assert lrs[100] == pytest.approx(1e-3 + (1e-5 - 1e-3) * 0.5, rel=1e-6)
    assert lrs[110] == pytest.approx(1e-5)
    # Under a time budget, progress is the clock's
    assert learning_rate(50, config, progress=0.95) < learning_rate(50, config, progress=0.5)
