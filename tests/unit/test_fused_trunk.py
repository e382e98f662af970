"""The fused CPU training path (gptkit/model/fused_trunk.py: embeddings, blocks and final norm as
one autograd node) computes what the modules compute one at a time, forward and backward, step
after step; it runs only where it is that computation, and leaves every other case to the modules."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import shutil

import pytest
import torch
import torch.nn.functional as F

from gptkit.model import GPT, ModelConfig, fused_trunk
from gptkit.model.layers import AttentionContext

from call_counter import Calls  # noqa: E402  (tests/unit, on sys.path)

pytestmark = pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler on this machine"
)

SMALL = ModelConfig(n_layer=3, n_head=4, d_model=32, block_size=40, vocab_size=61, dropout=0.0)
CAUSAL = AttentionContext(rope=None, mask=None, is_causal=True, cache=None)


def FusedCalls(monkeypatch: pytest.MonkeyPatch, *, allowed: bool = True) -> Calls:
    """Counts the fused node's forwards (and can forbid them) by wrapping ``fused_trunk.run``."""
    return Calls(monkeypatch, fused_trunk, "run", allowed=allowed, forbidden="the fused blocks ran where they must not")


def model_and_copy(seed: int = 0, **overrides) -> tuple[GPT, GPT]:
    torch.manual_seed(seed)
    model = GPT(dataclasses.replace(SMALL, **overrides)).train()
    return model, copy.deepcopy(model)


def loss_of(model: GPT, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def gradients(model: GPT) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def test_the_kernels_build_and_the_default_model_takes_the_fused_path() -> None:
    model, _ = model_and_copy()
    assert fused_trunk.applies(model, torch.randint(0, 61, (2, 16)))


@pytest.mark.parametrize(
    "overrides, B, T",
    [
        ({}, 3, 33),  # T not a multiple of 4 or 8
        ({"bias": False}, 2, 20),  # no biases anywhere: the kernels' NULL paths
        ({"n_kv_head": 2}, 2, 16),  # grouped-query attention
        ({"n_kv_head": 1, "d_model": 36, "n_head": 3}, 2, 9),  # multi-query, head width 12, C not a multiple of 8
        ({"n_layer": 1}, 1, 2),  # one block, the shortest sequence the node takes
        ({"d_ff": 40}, 2, 12),  # an MLP width that is not 4 * d_model
        # Llama-style parts (the fast recipe's): RoPE, RMSNorm, SwiGLU, no biases
        ({"position": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False}, 3, 33),
        ({"position": "rope"}, 2, 17),
        ({"norm": "rmsnorm"}, 2, 16),
        ({"mlp": "swiglu", "d_ff": 24}, 2, 16),  # with biases
        ({"position": "rope", "n_kv_head": 2, "norm": "rmsnorm"}, 2, 12),
        ({"block_size": 140}, 1, 135),  # longer than SAVE_PROBS_MAX_T: the backward recomputes the softmax
    ],
)
def test_forward_and_gradients_match_the_modules(overrides: dict, B: int, T: int) -> None:
    fused, modules = model_and_copy(**overrides)
    tokens = torch.randint(0, 61, (B, T + 1), generator=torch.Generator().manual_seed(1))
    assert fused_trunk.applies(fused, tokens[:, :-1])  # else this compares the modules with themselves
    loss_fused = loss_of(fused, tokens)
    loss_fused.backward()
    with fused_trunk.unfused():
        loss_modules = loss_of(modules, tokens)
        loss_modules.backward()
    torch.testing.assert_close(loss_fused, loss_modules, rtol=1e-6, atol=1e-6)
    got, want = gradients(fused), gradients(modules)
    for name in want:
        scale = want[name].abs().max().item() + 1e-12
        assert (got[name] - want[name]).abs().max().item() <= 2e-5 * scale, name


def test_as_close_to_float64_as_the_modules_are() -> None:
    """Against the same model in float64, the fused gradients err no more than the modules' do."""
    fused, modules = model_and_copy(seed=3)
    exact = copy.deepcopy(modules).double()
    tokens = torch.randint(0, 61, (4, 41), generator=torch.Generator().manual_seed(2))
    loss_of(fused, tokens).backward()
    with fused_trunk.unfused():
        loss_of(modules, tokens).backward()
    loss_of(exact, tokens).backward()
    for (name, p_fused), p_modules, p_exact in zip(fused.named_parameters(), modules.parameters(), exact.parameters()):
        err_fused = (p_fused.grad.double() - p_exact.grad).abs().max().item()
        err_modules = (p_modules.grad.double() - p_exact.grad).abs().max().item()
        assert err_fused <= 4 * err_modules + 1e-9, (name, err_fused, err_modules)


def test_training_steps_reuse_the_arena_and_match_the_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    """AdamW steps on changing batches: every step's loss matches (stale buffers would not), and
    the node ran every step."""
    calls = FusedCalls(monkeypatch)
    fused, modules = model_and_copy(seed=4)
    two = torch.randint(0, 61, (2, 5, 30), generator=torch.Generator().manual_seed(3))
    batches = two[[0, 1, 0, 1, 0, 1, 0, 1]]  # two batches in turn: the loss falls as they are learnt

    def train(model: GPT) -> list[float]:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        losses = []
        for batch in batches:
            loss = loss_of(model, batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        return losses

    with_node = train(fused)
    assert calls.count == len(batches)
    with fused_trunk.unfused():
        with_modules = train(modules)
    assert calls.count == len(batches)
    assert with_node[-1] < with_node[0]  # it trains
    assert with_node == pytest.approx(with_modules, abs=2e-5, rel=0)


def test_identical_results_run_to_run() -> None:
    """Two runs from the same seed agree bit for bit (what exact resume relies on)."""
    tokens = torch.randint(0, 61, (3, 30), generator=torch.Generator().manual_seed(4))
    runs = []
    for _ in range(2):
        model, _ = model_and_copy(seed=5)
        loss_of(model, tokens).backward()
        runs.append(gradients(model))
    for name in runs[0]:
        assert torch.equal(runs[0][name], runs[1][name]), name


def test_two_graphs_alive_at_once_each_get_their_own_activations() -> None:
    """Two forwards before either backward (say, two micro-batches kept for later): the second must
    not overwrite the first's saved activations."""
    fused, modules = model_and_copy(seed=6)
    gen = torch.Generator().manual_seed(5)
    first, second = torch.randint(0, 61, (2, 25), generator=gen), torch.randint(0, 61, (2, 25), generator=gen)
    loss_of(fused, first).backward()  # one step first: its arena now waits in the pool
    fused.zero_grad(set_to_none=True)
    loss_a, loss_b = loss_of(fused, first), loss_of(fused, second)
    (loss_a + 2 * loss_b).backward()
    with fused_trunk.unfused():
        (loss_of(modules, first) + 2 * loss_of(modules, second)).backward()
    for (name, p), q in zip(fused.named_parameters(), modules.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=2e-5, atol=2e-6, msg=name)


def test_retain_graph_then_a_second_backward() -> None:
    fused, modules = model_and_copy(seed=7)
    tokens = torch.randint(0, 61, (2, 20), generator=torch.Generator().manual_seed(6))
    loss = loss_of(fused, tokens)
    loss.backward(retain_graph=True)
    loss_of(fused, tokens).backward()  # another step's graph in between: it must take another arena
    loss.backward()
    with fused_trunk.unfused():
        reference = loss_of(modules, tokens)
        (3 * reference).backward()
    for (name, p), q in zip(fused.named_parameters(), modules.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=2e-5, atol=2e-6, msg=name)


def test_a_graph_dropped_without_backward_hands_its_arena_back() -> None:
    model, _ = model_and_copy(seed=8)
    tokens = torch.randint(0, 61, (2, 20))
    fused_trunk._pool.clear()
    loss = loss_of(model, tokens)
    del loss  # e.g. a validation forward under grad, never differentiated
    gc.collect()
    (arenas,) = fused_trunk._pool.values()
    assert len(arenas) == 1
    kept = arenas[0]
    loss_of(model, tokens).backward()
    (arenas,) = fused_trunk._pool.values()
    assert arenas == [kept]  # taken by the next forward, handed back by its backward


def test_double_backward_matches_the_modules() -> None:
    """create_graph=True (a gradient penalty): the gradients come from a recomputed graph of ATen
    ops, so they are differentiable."""
    fused, modules = model_and_copy(seed=9)
    tokens = torch.randint(0, 61, (2, 16), generator=torch.Generator().manual_seed(7))

    def penalty(model: GPT) -> list[torch.Tensor]:
        loss = loss_of(model, tokens)
        grads = torch.autograd.grad(loss, list(model.parameters()), create_graph=True)
        sum(g.pow(2).sum() for g in grads).backward()
        return [p.grad for p in model.parameters()]

    got = penalty(fused)
    with fused_trunk.unfused():
        want = penalty(modules)
    for a, b in zip(got, want):
        assert (a - b).abs().max().item() <= 1e-4 * b.abs().max().item()


@pytest.mark.parametrize("unfused", [False, True])
@pytest.mark.parametrize("overrides", [{}, {"position": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False}])
def test_batched_gradients_equal_one_gradient_per_vector(overrides: dict, unfused: bool) -> None:
    """autograd.grad(..., is_grads_batched=True) (vmap over the backward, e.g. for Jacobian rows):
    the kernels cannot read vmap's batched tensors, so their backwards take ATen's ops instead, and
    each batched gradient equals the gradient for its vector alone."""
    model, _ = model_and_copy(seed=11, **overrides)
    tokens = torch.randint(0, 61, (2, 16), generator=torch.Generator().manual_seed(3))
    params = list(model.parameters())
    with fused_trunk.unfused() if unfused else contextlib.nullcontext():
        assert fused_trunk.applies(model, tokens) is (False if unfused else True)
        logits = model(tokens)
        vectors = torch.randn(3, *logits.shape, generator=torch.Generator().manual_seed(5))
        batched = torch.autograd.grad(logits, params, vectors, is_grads_batched=True, retain_graph=True)
        for k in range(len(vectors)):
            one_by_one = torch.autograd.grad(logits, params, vectors[k], retain_graph=True)
            for b, g in zip(batched, one_by_one):
                assert (b[k] - g).abs().max().item() <= 1e-5 * max(g.abs().max().item(), 1e-6)


@pytest.mark.parametrize("overrides", [{"qk_norm": True}, {"dropout": 0.1}, {"position": "rope", "qk_norm": True}])
def test_other_architectures_run_module_by_module(monkeypatch: pytest.MonkeyPatch, overrides: dict) -> None:
    FusedCalls(monkeypatch, allowed=False)
    model, _ = model_and_copy(**overrides)
    loss_of(model, torch.randint(0, 61, (2, 12))).backward()


def test_cases_it_leaves_to_the_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    FusedCalls(monkeypatch, allowed=False)
    model, _ = model_and_copy()
    tokens = torch.randint(0, 61, (2, 12))
    with torch.no_grad():
        model(tokens)  # no graph to build
    model.eval()
    model(tokens).sum().backward()  # eval mode
    model.train()
    model(tokens[:, :1]).sum().backward()  # one token
    with fused_trunk.unfused():
        model(tokens).sum().backward()
    model.double()
    model(tokens).sum().backward()  # not float32
    model.float()
    model.blocks[1].mlp.up.weight.requires_grad_(False)  # a frozen parameter
    model(tokens).sum().backward()
    model.blocks[1].mlp.up.weight.requires_grad_(True)
    handle = model.blocks[0].attn.register_forward_hook(lambda *args: None)  # a hook would be skipped
    model(tokens).sum().backward()
    handle.remove()
    handle = model.final_norm.register_forward_pre_hook(lambda *args: None)
    model(tokens).sum().backward()
    handle.remove()
    model.position_embedding.weight.requires_grad_(False)  # frozen embeddings
    model(tokens).sum().backward()
    model.position_embedding.weight.requires_grad_(True)
    model.token_embedding.padding_idx = 0  # a padding row has no gradient in nn.Embedding
    model(tokens).sum().backward()
    model.token_embedding.padding_idx = None
    with pytest.raises(ValueError, match="exceeds block_size"):  # longer than the context: the usual error
        model(torch.randint(0, 61, (2, SMALL.block_size + 1)))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # mixed precision: the modules compute in bfloat16
        model(tokens).float().sum().backward()
    cache = model.new_kv_cache(2)
    with torch.no_grad():
        model(tokens, kv_cache=cache)


def test_activation_checkpointing_keeps_the_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    from gptkit.distributed import apply_activation_checkpointing

    FusedCalls(monkeypatch, allowed=False)
    model, _ = model_and_copy()
    apply_activation_checkpointing(model)
    loss_of(model, torch.randint(0, 61, (2, 12))).backward()


def test_torch_compile_traces_the_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under torch.compile the ctypes kernels are invisible: the applies check says no while tracing."""
    model, _ = model_and_copy()
    x = torch.randn(2, 8, 32)
    seen: list[bool] = []

    def check(x: torch.Tensor) -> torch.Tensor:
        seen.append(fused_trunk.applies(model, tokens))
        return x * 2

    tokens = torch.randint(0, 61, (2, 8))
    compiled = torch.compile(check, backend="eager")
    compiled(x)
    assert seen == [False]
    assert fused_trunk.applies(model, tokens)  # and yes outside


def test_a_token_id_out_of_range_is_nn_embeddings_error_and_loses_nothing() -> None:
    model, _ = model_and_copy()
    tokens = torch.randint(0, 61, (2, 12))
    loss_of(model, tokens).backward()  # an arena waits in the pool
    bad = tokens.clone()
    bad[1, 5] = 61
    with pytest.raises(IndexError, match="index out of range"):
        model(bad)
    with fused_trunk.unfused(), pytest.raises(IndexError, match="index out of range"):
        model(bad)
    bad[1, 5] = -1
    with pytest.raises(IndexError, match="index out of range"):
        model(bad)
    model.zero_grad(set_to_none=True)
    loss_of(model, tokens).backward()  # and the next step is fine
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_autocast_runs_the_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    """train.precision bf16/fp16 on CPU: the modules run their matmuls in the lower precision under
    autocast; the node (float32 throughout) would silently ignore it."""
    FusedCalls(monkeypatch, allowed=False)
    model, _ = model_and_copy()
    tokens = torch.randint(0, 61, (2, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not fused_trunk.applies(model, tokens)
        loss_of(model, tokens).backward()


@pytest.mark.parametrize(
    "strip",
    [lambda m: setattr(m.blocks[0].attn.out, "bias", None), lambda m: setattr(m.blocks[2].mlp.down, "bias", None)],
    ids=["no out bias in block 0", "no down bias in block 2"],
)
def test_biases_removed_from_some_linears_only(strip) -> None:
    """Each block's down-projection bias gets its own gradient, whatever the other biases are."""
    fused, modules = model_and_copy()
    strip(fused)
    strip(modules)
    tokens = torch.randint(0, 61, (2, 17), generator=torch.Generator().manual_seed(1))
    assert fused_trunk.applies(fused, tokens)
    loss_of(fused, tokens).backward()
    with fused_trunk.unfused():
        loss_of(modules, tokens).backward()
    for (name, p), q in zip(fused.named_parameters(), modules.parameters()):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, rtol=2e-5, atol=2e-6, msg=name)


def test_blocks_of_different_shapes_run_module_by_module(monkeypatch: pytest.MonkeyPatch) -> None:
    """The node sizes its buffers and head split from block 0: a block with other head counts or
    another MLP width (pruned, distilled) must leave the model to the modules."""
    from torch import nn

    from gptkit.model.layers import CausalSelfAttention

    FusedCalls(monkeypatch, allowed=False)
    tokens = torch.randint(0, 61, (2, 17))
    model, _ = model_and_copy()
    model.blocks[1].attn = CausalSelfAttention(dataclasses.replace(SMALL, n_head=2)).train()  # same shapes
    loss_of(model, tokens).backward()
    model, _ = model_and_copy()
    model.blocks[1].mlp.up, model.blocks[1].mlp.down = nn.Linear(32, 256), nn.Linear(256, 32)
    loss_of(model, tokens).backward()


def test_a_position_table_shorter_than_the_sequence_is_the_modules_error() -> None:
    model, _ = model_and_copy()
    model.config = dataclasses.replace(model.config, block_size=80)  # the table keeps its 40 rows
    tokens = torch.randint(0, 61, (2, 60))
    with pytest.raises(RuntimeError, match="must match the size"):
        model(tokens)


def test_an_overflowing_residual_stream_is_nan_as_in_the_modules() -> None:
    """Rows whose LayerNorm variance overflows come out NaN (so the Trainer's divergence check
    fires), not 1/sqrt(inf) = 0."""
    fused, modules = model_and_copy()
    for model in (fused, modules):
        with torch.no_grad():
            model.blocks[0].mlp.down.weight.mul_(1e38)
    tokens = torch.randint(0, 61, (2, 17), generator=torch.Generator().manual_seed(1))
    assert fused_trunk.applies(fused, tokens)
    with fused_trunk.unfused():
        assert not torch.isfinite(loss_of(modules, tokens))
    assert not torch.isfinite(loss_of(fused, tokens))


def test_a_default_device_other_than_the_cpu_changes_nothing() -> None:
    """torch.set_default_device / `with torch.device(...)` make factory calls without a device
    allocate there; the node's buffers must still be CPU memory (they were meta tensors, null
    pointers the kernels wrote through: a segmentation fault)."""
    fused, modules = model_and_copy(seed=11)
    tokens = torch.randint(0, 61, (2, 17), generator=torch.Generator().manual_seed(11))
    with torch.device("meta"):
        assert fused_trunk.applies(fused, tokens[:, :-1])
        loss = loss_of(fused, tokens)
        loss.backward()
    with fused_trunk.unfused():
        reference = loss_of(modules, tokens)
        reference.backward()
    assert loss.device.type == "cpu"
    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=1e-6)
    for (name, p), q in zip(fused.named_parameters(), modules.parameters()):
        assert p.grad.device.type == "cpu", name
        torch.testing.assert_close(p.grad, q.grad, rtol=2e-5, atol=2e-6, msg=name)


def test_rope_tables_the_kernel_cannot_read_as_built_leave_the_modules_in_charge(monkeypatch: pytest.MonkeyPatch) -> None:
    """RoPE's tables are read by address: another dtype, a short or narrow table, or a Parameter in
    their place sends the model to the modules (third review)."""
    tokens = torch.randint(0, 61, (2, 16))
    for change in ("float64 sin", "short", "narrow", "parameter"):
        model, _ = model_and_copy(position="rope")
        rotary = model.rotary
        if change == "float64 sin":
            rotary.sin = rotary.sin.double()
        elif change == "short":
            rotary.sin = rotary.sin[:4].clone()
        elif change == "narrow":
            rotary.cos, rotary.sin = rotary.cos[:, :1].clone(), rotary.sin[:, :1].clone()
        else:
            del rotary._buffers["cos"]
            rotary.cos = torch.nn.Parameter(rotary.sin.clone(), requires_grad=False)
        assert not fused_trunk.applies(model, tokens), change


def test_rope_gradient_is_the_transpose_for_any_tables() -> None:
    """The backward rotation is the exact transpose of the forward one, even for tables whose two
    halves differ (RotaryEmbedding's are equal, which would hide a swapped index)."""
    fused, modules = model_and_copy(seed=11, position="rope")
    gen = torch.Generator().manual_seed(8)
    for model in (fused, modules):
        model.rotary.cos.copy_(torch.rand(model.rotary.cos.shape, generator=gen))
        gen.manual_seed(8)
    gen.manual_seed(9)
    sin = torch.rand(fused.rotary.sin.shape, generator=gen)
    fused.rotary.sin.copy_(sin)
    modules.rotary.sin.copy_(sin)
    tokens = torch.randint(0, 61, (2, 21), generator=torch.Generator().manual_seed(10))
    assert fused_trunk.applies(fused, tokens[:, :-1])
    loss_of(fused, tokens).backward()
    with fused_trunk.unfused():
        loss_of(modules, tokens).backward()
    for (name, p), q in zip(fused.named_parameters(), modules.parameters()):
        scale = q.grad.abs().max().item() + 1e-12
        assert (p.grad - q.grad).abs().max().item() <= 2e-5 * scale, name


_TEAM_CHECK = """
import hashlib, torch
from gptkit.model import GPT, ModelConfig, fused_trunk
torch.set_num_threads(2)
digest = hashlib.sha256()
for extra in ({}, {"position": "rope", "norm": "rmsnorm", "mlp": "swiglu"}):
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=4, d_model=32, block_size=40, vocab_size=61, dropout=0.0, **extra)).train()
    tokens = torch.randint(0, 61, (4, 40), generator=torch.Generator().manual_seed(1))
    assert fused_trunk.applies(model, tokens)
    model(tokens).square().mean().backward()
    for p in model.parameters():
        digest.update(p.grad.numpy().tobytes())
print(digest.hexdigest())
"""


def test_gradients_do_not_depend_on_the_team_openmp_gives() -> None:
    """Asked for 2 threads, the fused trunk's gradients are the same bits when OpenMP runs a smaller
    team (OMP_THREAD_LIMIT here; OMP_DYNAMIC does so under load): the row kernels' and the gemm
    kernel's column sums are split by the threads asked for (exact resume relies on it)."""
    import os
    import subprocess
    import sys

    def digest(**env: str) -> str:
        return subprocess.run([sys.executable, "-c", _TEAM_CHECK], env={**os.environ, **env}, check=True,
                              capture_output=True, text=True, timeout=120).stdout.strip()

    assert digest(OMP_THREAD_LIMIT="1") == digest()
