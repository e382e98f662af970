"""GPT's trunk (embeddings, blocks, final norm) as one autograd node, for training on CPU in float32.

At small widths a training step on CPU is about 70% matmuls; most of the rest is passes over the
activations that ATen runs one op at a time: each Linear's bias copied into its output, the
residual add, LayerNorm reading the sum again, and in the backward a column sum per bias, a
residual-gradient add, and a fresh allocation for every intermediate, whose pages the kernel hands
back zeroed, one fault at a time. Here one ``torch.autograd.Function`` runs it all:

- the matrix products are gptkit's (``gemm_kernel``: the activations read in place, each result
  written once), or ``torch.mm`` / ``addmm`` (MKL) on CPUs without AVX-512, into preallocated buffers;
- attention is gptkit's fused causal kernel (``attention_kernel``);
- the rest is fused C kernels (``csrc/block.c``): the embedding lookup, residual + bias + LayerNorm
  (or RMSNorm), its backward with the residual gradient and the bias gradient, bias + GELU (keeping
  GELU's derivative for the backward) or SwiGLU, their backwards with the bias gradient, RoPE
  applied in place to q and k (and its transpose to their gradient), and the embeddings' backward;
- activations and backward scratch live in an arena that is reused from step to step (taken by a
  forward, handed back when its backward ends, or when its graph is freed), so a step allocates
  only the gradients it returns.

The numbers are those of the module-by-module forward within float32 rounding (tested, forward
and backward, against it and against float64). It runs only where it computes exactly what the
modules would (``plan``): GPT-2 or the Llama-style options (learned positions or RoPE, LayerNorm or
RMSNorm, tanh-GELU or SwiGLU MLP, with or without biases, grouped-query attention; not qk-norm),
no dropout, no KV cache, CPU float32 parameters all trainable, no hooks or replaced forwards in
the trunk's modules, training mode with gradients on and no autocast, eager mode (not torch.compile, functorch or
forward-mode AD), 2 <= T <= the attention kernel's limit, and the kernels built. Everywhere else
the modules run one by one as usual; ``unfused()`` forces that (tests, benchmarks). A double
backward (``create_graph=True``) recomputes the trunk through the modules and differentiates that.

Measured on the 2-core test machine (benchmarks/README.md), alternating steps of the two forms: at
the char shape (GPT-2) a training step is 1.10-1.18x as fast as module by module with the same
kernels; at the fast recipe's shape (RoPE, RMSNorm, SwiGLU, which module by module take SDPA) ~1.45x;
at the GPT-2 124M width ~1.03x, where the matmuls are nearly everything.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules import module as _module_globals

from gptkit.model import attention_kernel, gemm_kernel
from gptkit.model.cpu_kernels import POINTER, SIZE, THREADS, _address, _eager, load_library
from gptkit.model.layers import MLP, AttentionContext, Block, CausalSelfAttention, LayerNorm, RMSNorm, RotaryEmbedding

_FLOAT = ctypes.c_float
_SIGNATURES = (
    ("add_layer_norm", (POINTER,) * 9 + (SIZE, SIZE, _FLOAT, ctypes.c_int, THREADS)),
    ("layer_norm_backward", (POINTER,) * 10 + (SIZE, SIZE, ctypes.c_int, THREADS), ctypes.c_int),
    ("bias_gelu_forward", (POINTER, POINTER, POINTER, SIZE, SIZE, THREADS)),
    ("gelu_backward_colsum", (POINTER, POINTER, POINTER, POINTER, SIZE, SIZE, THREADS), ctypes.c_int),
    ("column_sum", (POINTER, POINTER, SIZE, SIZE, THREADS), ctypes.c_int),
    ("embed_forward", (POINTER, POINTER, POINTER, POINTER, SIZE, SIZE, SIZE, SIZE, THREADS), ctypes.c_int),
    ("embed_backward", (POINTER, POINTER, POINTER, POINTER, SIZE, SIZE, SIZE)),
    ("swiglu_forward", (POINTER, POINTER, POINTER, SIZE, SIZE, THREADS)),
    ("swiglu_backward", (POINTER, POINTER, POINTER, POINTER, SIZE, SIZE, THREADS), ctypes.c_int),
    ("rope_rotate", (POINTER, POINTER, POINTER, SIZE, SIZE, SIZE, SIZE, SIZE, _FLOAT, THREADS)),
)

# Free arenas kept between steps: one per shape, for the two most recently used shapes (training
# runs one shape, sometimes with a shorter last batch). Each holds a step's activations, so more
# would only hold memory; release_arenas() drops them all.
_ARENA_SHAPES = 2

_state = threading.local()


def _library() -> ctypes.CDLL | None:
    return load_library("block", _SIGNATURES)


def _check(status: int) -> None:
    if status != 0:
        raise MemoryError("gptkit's fused block kernels could not allocate their scratch memory")


@contextlib.contextmanager
def unfused() -> Iterator[None]:
    """Inside this `with` (in this thread), GPT runs its trunk module by module, without the node."""
    previous = getattr(_state, "off", False)
    _state.off = True
    try:
        yield
    finally:
        _state.off = previous


# ---------------------------------------------------------------------------------- when it runs


# The modules of a block, by path, and the type each must have exactly (a subclass or a
# wrapper may compute something else).
_NORMS = (LayerNorm, RMSNorm)
_BLOCK_LAYOUT = (
    ((), (Block,)), (("attn_norm",), _NORMS), (("attn",), (CausalSelfAttention,)), (("attn", "qkv"), (nn.Linear,)),
    (("attn", "out"), (nn.Linear,)), (("mlp_norm",), _NORMS), (("mlp",), (MLP,)), (("mlp", "up"), (nn.Linear,)),
    (("mlp", "down"), (nn.Linear,)), (("dropout",), (nn.Identity,)),
)


def _untouched(module: nn.Module) -> bool:
    """No hook and no forward replaced on the instance (activation checkpointing does that): the
    node would skip either."""
    return not (
        "forward" in module.__dict__
        or module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
    )


def _block_modules(block: nn.Module) -> list[nn.Module] | None:
    """The block's modules in _BLOCK_LAYOUT order if it is a block exactly as gptkit builds it
    (every module of the expected type, in training mode, with no hook and no forward replaced on
    the instance, which activation checkpointing does), else None. Reads ``_modules`` directly:
    this runs on every training forward, and nn.Module's attribute lookup is slow."""
    if type(block) is not Block:
        return None
    modules = []
    for path, kind in _BLOCK_LAYOUT:
        module = block
        for name in path:
            module = module._modules.get(name)
        if type(module) not in kind or not module.training or not _untouched(module):
            return None
        modules.append(module)
    attn = modules[2]
    if attn.q_norm is not None or attn.dropout != 0.0 or len(block._modules) != 5:
        return None
    return modules


def _trainable_cpu_float(p: torch.Tensor | None) -> bool:
    return p is None or (
        type(p) is nn.Parameter and p.requires_grad and p.is_cpu and p.dtype is torch.float32 and p.is_contiguous()
    )


def _block_params(modules: list[nn.Module]) -> list[torch.Tensor | None]:
    """The 12 parameters of a block (None for an absent bias), in the order the node takes them:
    LayerNorm 1 weight and bias, qkv weight and bias, out weight and bias, LayerNorm 2 weight and
    bias, up weight and bias, down weight and bias."""
    params = []
    for index in (1, 3, 4, 5, 7, 8):  # attn_norm, qkv, out, mlp_norm, up, down in _BLOCK_LAYOUT
        owned = modules[index]._parameters
        params.append(owned["weight"])
        params.append(owned.get("bias"))
    return params


def _global_hooks() -> bool:
    return bool(
        _module_globals._global_forward_hooks
        or _module_globals._global_forward_pre_hooks
        or _module_globals._global_backward_hooks
        or _module_globals._global_backward_pre_hooks
    )


def _plain_module(module: nn.Module | None, kind: type) -> bool:
    return type(module) is kind and _untouched(module)


def _plain_embedding(module: nn.Module | None) -> bool:
    """An nn.Embedding that is a plain table lookup (no padding row, renorm or frequency scaling)."""
    return (
        _plain_module(module, nn.Embedding)
        and module.padding_idx is None
        and module.max_norm is None
        and not module.scale_grad_by_freq
        and not module.sparse
    )


def _gather(model: nn.Module) -> list[torch.Tensor | None] | None:
    """The trunk's parameters when the node may run it, else None: token and position tables, the
    final norm's weight and bias, then 12 per block."""
    mods = model._modules
    embedding, positions, final_norm = mods.get("token_embedding"), mods.get("position_embedding"), mods.get("final_norm")
    rotary = mods.get("rotary")
    # Learned positions, or RoPE (whose tables are a plain buffer module, read directly).
    if positions is None:
        if type(rotary) is not RotaryEmbedding:
            return None
    elif not _plain_embedding(positions) or rotary is not None:
        return None
    if not (_plain_embedding(embedding) and type(final_norm) in _NORMS and _plain_module(final_norm, type(final_norm))):
        return None
    if not _plain_module(mods.get("embedding_dropout"), nn.Identity):
        return None
    params: list[torch.Tensor | None] = [
        embedding._parameters["weight"], None if positions is None else positions._parameters["weight"],
        final_norm._parameters["weight"], final_norm._parameters.get("bias"),
    ]
    first: list[nn.Module] | None = None
    for block in mods["blocks"]:
        modules = _block_modules(block)
        if modules is None or not modules[1].eps == modules[5].eps == final_norm.eps:  # one eps for the kernels
            return None
        # One norm kind and one MLP kind throughout (the node's kernels take one of each).
        if not type(modules[1]) is type(modules[5]) is type(final_norm):
            return None
        if first is None:
            first = modules
        elif (modules[2].n_head, modules[2].n_kv_head, modules[2].head_dim, modules[6].gated) != (
            first[2].n_head, first[2].n_kv_head, first[2].head_dim, first[6].gated
        ):
            return None  # the node takes one head layout for all blocks (run() reads block 0's)
        params.extend(_block_params(modules))
    if positions is None and first is not None and first[2].head_dim % 2:
        return None  # RoPE rotates pairs (j, j + D/2)
    if not all(_trainable_cpu_float(p) for p in params) or first is None:
        return None
    if not _shapes_fit(params, first[2], first[6].gated):
        return None
    return params


def _shapes_fit(params: list[torch.Tensor | None], attn: CausalSelfAttention, gated: bool) -> bool:
    """Whether every parameter has the shape the node's buffers and kernels assume: the widths of
    block 0 in every block (a model with blocks of different widths runs module by module), and
    tables of width C. Buffers are sized from block 0 and torch.mm(out=...) would resize one
    (leaving the kernels a stale address) rather than fail."""
    table, positions, final_w, final_b = params[:4]
    C = table.shape[1]
    qkv, up = params[4 + 2].shape[0], params[4 + 8].shape[0]  # up: the MLP width, twice it for SwiGLU
    hidden = params[4 + 10].shape[1]  # the down projection's input width
    width = attn.n_head * attn.head_dim
    if qkv != (attn.n_head + 2 * attn.n_kv_head) * attn.head_dim or attn.n_head % attn.n_kv_head:
        return False
    if up != (2 * hidden if gated else hidden):
        return False
    want = [(C,), (C,), (qkv, C), (qkv,), (C, width), (C,), (C,), (C,), (up, C), (up,), (C, hidden), (C,)]
    if table.dim() != 2 or final_w.shape != (C,):
        return False
    if positions is not None and (positions.dim() != 2 or positions.shape[1] != C):
        return False
    if final_b is not None and final_b.shape != (C,):
        return False
    blocks = params[4:]
    for start in range(0, len(blocks), _PER_BLOCK):
        for p, shape in zip(blocks[start:start + _PER_BLOCK], want):
            if p is not None and p.shape != shape:
                return False
    return True


def plan(model: nn.Module, tokens: torch.Tensor) -> list[torch.Tensor | None] | None:
    """The parameters to hand to ``run`` when it computes exactly what ``model`` (a GPT) computes
    from ``tokens`` (B, T) up to its final norm, else None (then run the modules as usual). The
    caller passes no KV cache."""
    if getattr(_state, "off", False) or not torch.is_grad_enabled() or not model.training:
        return None
    blocks = model._modules.get("blocks")
    if blocks is None or len(blocks) == 0:
        return None
    if type(tokens) is not torch.Tensor or tokens.dtype is not torch.int64 or not tokens.is_cpu:
        return None
    if not 2 <= tokens.shape[1] <= min(attention_kernel.MAX_T, model.config.block_size) or _global_hooks():
        return None
    if not _eager() or attention_kernel._forward_ad_active() or torch.is_autocast_enabled("cpu"):
        return None  # (under autocast the modules compute in bfloat16 / float16)
    if not attention_kernel.available() or _library() is None:
        return None
    params = _gather(model)
    if params is None:
        return None
    if params[1] is not None and params[1].shape[0] < tokens.shape[1]:  # too few positions: the modules' error
        return None
    rotary = model._modules.get("rotary")
    if rotary is not None:
        D = model.blocks[0].attn.head_dim
        for name in ("cos", "sin"):  # the tables the kernel reads: (>= T, D) plain CPU float32 buffers
            table = rotary._buffers.get(name)
            if not (
                type(table) is torch.Tensor and table.is_cpu and table.dtype is torch.float32 and table.is_contiguous()
                and not table.requires_grad and table.dim() == 2 and table.shape[0] >= tokens.shape[1]
                and table.shape[1] == D
            ):
                return None
    return params


def applies(model: nn.Module, tokens: torch.Tensor) -> bool:
    """Whether ``model(tokens)`` would run the trunk as this one node."""
    return plan(model, tokens) is not None


# ---------------------------------------------------------------------------------- the arena


@dataclass(frozen=True)
class _Shape:
    B: int
    T: int
    C: int  # d_model
    qkv: int  # width of the qkv projection, (H + 2 Hkv) D
    hidden: int  # MLP width (the down projection's input)
    H: int
    Hkv: int
    layers: int
    layer_norm: bool  # LayerNorm (centred); else RMSNorm
    gated: bool  # SwiGLU (up holds gate and up, 2 x hidden); else GELU
    rope: bool  # rotary positions applied to q and k; else learned positions added to the embeddings

    @property
    def up(self) -> int:  # the up projection's output width
        return 2 * self.hidden if self.gated else self.hidden

    @property
    def D(self) -> int:  # head width
        return self.qkv // (self.H + 2 * self.Hkv)

    @property
    def weight_shapes(self) -> tuple[tuple[int, int], ...]:  # (out, in) of qkv, out, up and down
        return (self.qkv, self.C), (self.C, self.H * self.D), (self.up, self.C), (self.C, self.hidden)


class _Buffers:
    """Named float32 matrices, and their addresses for the C kernels (read once, not per call)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]) -> None:
        # device="cpu": not the default device, which torch.set_default_device / `with torch.device(...)`
        # may have set to another (the kernels would write through a non-CPU pointer).
        self.t = {name: torch.empty(shape, dtype=torch.float32, device="cpu") for name, shape in shapes.items()}
        self.p = {name: tensor.data_ptr() for name, tensor in self.t.items()}


class _Arena:
    """Every activation the forward saves and every scratch matrix the backward needs, for one shape.

    Per layer (N = B T rows): x (the block's input; for layer 0 the embeddings), a1 /
    m1 / r1 (LayerNorm 1's output, mean and 1/std), qkv, y and lse (attention output and its
    log-sum-exp; for short sequences also probs, its softmax probabilities, see
    attention_kernel.SAVE_PROBS_MAX_T), xn (the residual after attention), a2 / m2 / r2 (LayerNorm 2), h (MLP
    pre-activation; after the GELU it holds the GELU's derivative there instead, all the backward
    needs) and g (GELU of h + bias). Then the last residual with the final norm's mean and 1/std.
    Scratch for the backward: dg, dh, da, dxn, dy,
    dqkv, and dx0 / dx1, the gradient flowing down, alternating between layers; with the gemm
    kernel, pack: room to lay out the largest weight for its forward product. The weight
    gradients' per-thread partial sums get their room from ``weight_grad_scratch`` (it depends on
    the thread count at the time of the backward)."""

    def __init__(self, s: _Shape) -> None:
        N, C, width = s.B * s.T, s.C, s.H * s.D
        probs = attention_kernel.probs_shape(s.B, s.T, s.H)
        self.layers = [
            _Buffers({
                "x": (N, C), "a1": (N, C), "m1": (N,), "r1": (N,), "qkv": (N, s.qkv), "y": (N, width),
                "lse": (s.B, s.H, s.T), "xn": (N, C), "a2": (N, C), "m2": (N,), "r2": (N,), "h": (N, s.up),
                "g": (N, s.hidden), **({"probs": probs} if probs else {}),
            })
            for _ in range(s.layers)
        ]
        self.final = _Buffers({"x": (N, C), "m": (N,), "r": (N,)})  # the last residual, into the final norm
        self.scratch = _Buffers({
            "dg": (N, s.hidden), "dh": (N, s.up), "da": (N, C), "dxn": (N, C), "dy": (N, width),
            "dqkv": (N, s.qkv), "dx0": (N, C), "dx1": (N, C),
            **({"pack": (max(gemm_kernel.pack_floats(out, inp) for out, inp in s.weight_shapes),)}
               if gemm_kernel.available() else {}),
        })
        self.partials: torch.Tensor | None = None

    def weight_grad_scratch(self, s: _Shape, threads: int) -> torch.Tensor | None:
        """Room for gemm_kernel.grad_weight's per-thread partial sums at this thread count, grown when
        it has grown (too little room would make the sums run in another order than a fresh arena's:
        other bits), or None without the gemm kernel."""
        if not gemm_kernel.available():
            return None
        need = max(1, max(gemm_kernel.weight_scratch_floats(out, inp, threads) for out, inp in s.weight_shapes))
        if self.partials is None or self.partials.numel() < need:
            self.partials = torch.empty(need, dtype=torch.float32, device="cpu")
        return self.partials


_pool: OrderedDict[_Shape, list[_Arena]] = OrderedDict()
_pool_lock = threading.RLock()  # re-entrant: a garbage-collected lease may hand back while the lock is held


def _take(shape: _Shape) -> _Arena:
    with _pool_lock:
        free = _pool.get(shape)
        if free:
            _pool.move_to_end(shape)
            return free.pop()
    return _Arena(shape)


def _give_back(shape: _Shape, arena: _Arena) -> None:
    with _pool_lock:
        _pool.setdefault(shape, []).append(arena)
        _pool.move_to_end(shape)
        del _pool[shape][:-1]
        while len(_pool) > _ARENA_SHAPES:
            _pool.popitem(last=False)


def release_arenas() -> None:
    """Free the activation buffers kept for the next training step (the Trainer calls this when
    ``fit`` ends). Arenas still lent to a live graph are freed with it."""
    with _pool_lock:
        _pool.clear()


class _Lease:
    """An arena lent to one forward; handed back by its backward, or when its graph is freed."""

    def __init__(self, shape: _Shape) -> None:
        self.shape = shape
        self.arena: _Arena | None = _take(shape)

    def give_back(self) -> None:
        if self.arena is not None:
            _give_back(self.shape, self.arena)
            self.arena = None

    def __del__(self) -> None:
        self.give_back()


# ---------------------------------------------------------------------------------- the node

_PER_BLOCK = 12  # parameters per block, in _block_params order


def _rope_tables(model: nn.Module, s: _Shape) -> tuple[int | None, int | None]:
    """Addresses of RoPE's cos and sin tables (their first T rows are the positions 0..T-1), or Nones."""
    if not s.rope:
        return None, None
    rotary = model._modules["rotary"]
    return rotary._buffers["cos"].data_ptr(), rotary._buffers["sin"].data_ptr()


class _FusedTrunk(torch.autograd.Function):
    """Embeddings, all blocks and the final norm forward, then all of it backward (see the module
    docstring). With N = B T rows, x = E[tokens] + P[:T], then per block:

        a1 = LN1(x);  qkv = a1 Wqkv^T + bqkv;  y = attention(qkv)
        xn = x + y Wo^T + bo;  a2 = LN2(xn)
        h = a2 Wup^T + bup;  g = gelu(h);  x_next = xn + g Wd^T + bd   (LN1 of the next block fused here)

    and the output is LN_final(x_next of the last block). The forward keeps gelu'(h) rather than h:
    the backward's GELU step is then one multiply.
    """

    @staticmethod
    def forward(ctx, tokens: torch.Tensor, model: nn.Module, shape: _Shape, eps: float,  # type: ignore[override]
                *params: torch.Tensor | None) -> torch.Tensor:
        lib, attn = _library(), attention_kernel._library()
        assert lib is not None and attn is not None
        threads = torch.get_num_threads()
        s = shape
        N, C = s.B * s.T, s.C
        ctx.save_for_backward(tokens, *params)
        lease = _Lease(s)
        arena = lease.arena
        assert arena is not None
        out = torch.empty(N, C, dtype=torch.float32, device="cpu")  # the final norm's output: the caller's to keep
        ptrs = [_address(p) for p in params]
        table, positions, final_w, final_b = params[:4]
        center = int(s.layer_norm)
        cos, sin = ctx_tables = _rope_tables(model, s)
        first = arena.layers[0].p
        pack = arena.scratch.t.get("pack")  # None without the gemm kernel: gemm_kernel uses torch.mm
        if lib.embed_forward(tokens.data_ptr(), ptrs[0], ptrs[1], first["x"], s.B, s.T, C, table.shape[0], threads):
            lease.give_back()
            raise IndexError("index out of range in self")  # what nn.Embedding says
        block_ptrs = ptrs[4:]
        # LayerNorm 1 of the first block; the later blocks' runs fused with the residual add below.
        lib.add_layer_norm(first["x"], None, None, first["x"], block_ptrs[0], block_ptrs[1], first["a1"], first["m1"],
                           first["r1"], N, C, eps, center, threads)
        for layer in range(s.layers):
            w1, b1, wqkv, bqkv, wo, bo, w2, b2, wup, bup, wd, bd = params[4 + _PER_BLOCK * layer:][:_PER_BLOCK]
            pw = block_ptrs[_PER_BLOCK * layer:][:_PER_BLOCK]
            t, p = arena.layers[layer].t, arena.layers[layer].p
            gemm_kernel.linear(t["a1"], wqkv, bqkv, t["qkv"], pack)
            if s.rope:  # rotate q and k in place; attention (and its backward) sees the rotated ones
                lib.rope_rotate(p["qkv"], cos, sin, s.B, s.T, s.H, s.Hkv, s.D, 1.0, threads)
            attention_kernel._check(attn.attention_forward(p["qkv"], p["y"], p["lse"], p.get("probs"), s.B, s.T, s.H,
                                                           s.Hkv, s.D, threads))
            gemm_kernel.linear(t["y"], wo, None, t["xn"], pack)
            lib.add_layer_norm(p["x"], p["xn"], pw[5], p["xn"], pw[6], pw[7], p["a2"], p["m2"], p["r2"], N, C, eps,
                               center, threads)
            if not s.gated and pack is not None and gemm_kernel.fuses_gelu(wd):  # the GELU tile by tile in the product
                gemm_kernel.linear_gelu(t["a2"], wup, bup, t["h"], t["g"], pack)
            else:
                gemm_kernel.linear(t["a2"], wup, None, t["h"], pack)
                if s.gated:
                    lib.swiglu_forward(p["h"], pw[9], p["g"], N, s.hidden, threads)
                else:
                    lib.bias_gelu_forward(p["h"], pw[9], p["g"], N, s.hidden, threads)
            if layer == s.layers - 1:  # the last residual, then the final norm into out
                nxt_t, nxt = arena.final.t["x"], arena.final.p
                norm_w, norm_b, a, m, r = ptrs[2], ptrs[3], out.data_ptr(), nxt["m"], nxt["r"]
            else:
                following = arena.layers[layer + 1]
                nxt_t, nxt = following.t["x"], following.p
                norm_w, norm_b = block_ptrs[_PER_BLOCK * (layer + 1)], block_ptrs[_PER_BLOCK * (layer + 1) + 1]
                a, m, r = nxt["a1"], nxt["m1"], nxt["r1"]
            gemm_kernel.linear(t["g"], wd, None, nxt_t, pack)
            lib.add_layer_norm(p["xn"], nxt["x"], pw[11], nxt["x"], norm_w, norm_b, a, m, r, N, C, eps, center, threads)
        ctx.lease, ctx.shape, ctx.model, ctx.tables = lease, s, model, ctx_tables
        return out.view(s.B, s.T, C)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        # create_graph=True (the gradients must be differentiable), or a gradient the kernels cannot
        # read (vmap's batched tensors under is_grads_batched=True): differentiate ATen's ops instead.
        if torch.is_grad_enabled() or not torch._C._has_storage(grad_out):
            return _recomputed_backward(ctx, grad_out)
        lease: _Lease = ctx.lease
        arena = lease.arena
        if arena is None:
            raise RuntimeError("the fused trunk's saved activations were already freed by an earlier backward")
        lib, attn = _library(), attention_kernel._library()
        assert lib is not None and attn is not None
        threads = torch.get_num_threads()
        s: _Shape = ctx.shape
        N, C = s.B * s.T, s.C
        tokens, *params = ctx.saved_tensors
        table, positions, final_w, final_b = params[:4]
        center = int(s.layer_norm)
        cos, sin = ctx.tables
        block_params = params[4:]
        ptrs = [_address(p) for p in block_params]

        def has_down_bias(layer: int) -> bool:
            return block_params[_PER_BLOCK * layer + 11] is not None

        grads: list[torch.Tensor | None] = [None] * len(block_params)
        st, sp = arena.scratch.t, arena.scratch.p
        partials = arena.weight_grad_scratch(s, threads)

        def new(*size: int) -> torch.Tensor:
            return torch.empty(size, dtype=torch.float32, device="cpu")

        d_out = grad_out.reshape(N, C)
        if not d_out.is_contiguous():
            d_out = d_out.contiguous()
        # The final norm; its column sums are the last block's down-projection bias gradient.
        d_final_w, d_final_b = new(C), new(C) if final_b is not None else None
        d_bd = new(C) if has_down_bias(s.layers - 1) else None
        d_next = st[f"dx{s.layers % 2}"]  # the layers below alternate between dx0 and dx1
        _check(lib.layer_norm_backward(d_out.data_ptr(), arena.final.p["x"], arena.final.p["m"], arena.final.p["r"],
                                       final_w.data_ptr(), None, d_next.data_ptr(), d_final_w.data_ptr(),
                                       _address(d_final_b), _address(d_bd), N, C, center, threads))
        for layer in reversed(range(s.layers)):
            w1, b1, wqkv, bqkv, wo, bo, w2, b2, wup, bup, wd, bd = block_params[_PER_BLOCK * layer:][:_PER_BLOCK]
            pw = ptrs[_PER_BLOCK * layer:][:_PER_BLOCK]
            t, p = arena.layers[layer].t, arena.layers[layer].p
            # MLP: x_next = xn + gelu(a2 Wup^T + bup) Wd^T + bd
            d_bup = new(s.up) if bup is not None else None
            if not s.gated and gemm_kernel.fuses_gelu(wd):  # as in the forward
                gemm_kernel.grad_input_gelu(d_next, wd, t["h"], st["dh"], d_bup)
            else:
                gemm_kernel.grad_input(d_next, wd, st["dg"])
                if s.gated:
                    _check(lib.swiglu_backward(sp["dg"], p["h"], sp["dh"], _address(d_bup), N, s.hidden, threads))
                else:
                    _check(lib.gelu_backward_colsum(sp["dg"], p["h"], sp["dh"], _address(d_bup), N, s.hidden, threads))
            d_wd = gemm_kernel.grad_weight(d_next, t["g"], partials)
            gemm_kernel.grad_input(st["dh"], wup, st["da"])
            d_wup = gemm_kernel.grad_weight(st["dh"], t["a2"], partials)
            # LayerNorm 2 and the residual around it; its column sums are the out projection's bias gradient
            d_w2, d_b2, d_bo = new(C), new(C) if b2 is not None else None, new(C) if bo is not None else None
            _check(lib.layer_norm_backward(sp["da"], p["xn"], p["m2"], p["r2"], pw[6], d_next.data_ptr(), sp["dxn"],
                                           d_w2.data_ptr(), _address(d_b2), _address(d_bo), N, C, center, threads))
            # Attention: xn = x + attention(a1 Wqkv^T + bqkv) Wo^T + bo
            gemm_kernel.grad_input(st["dxn"], wo, st["dy"])
            d_wo = gemm_kernel.grad_weight(st["dxn"], t["y"], partials)
            attention_kernel._check(attn.attention_backward(p["qkv"], p["y"], p["lse"], p.get("probs"), sp["dy"],
                                                            sp["dqkv"], s.B, s.T, s.H, s.Hkv, s.D, threads))
            if s.rope:  # back to the gradient of the unrotated q and k
                lib.rope_rotate(sp["dqkv"], cos, sin, s.B, s.T, s.H, s.Hkv, s.D, -1.0, threads)
            d_bqkv = new(s.qkv) if bqkv is not None else None
            if d_bqkv is not None:
                _check(lib.column_sum(sp["dqkv"], d_bqkv.data_ptr(), N, s.qkv, threads))
            gemm_kernel.grad_input(st["dqkv"], wqkv, st["da"])
            d_wqkv = gemm_kernel.grad_weight(st["dqkv"], t["a1"], partials)
            # LayerNorm 1 and the residual; its column sums are the previous block's down bias gradient
            d_x = st[f"dx{layer % 2}"]
            d_w1, d_b1 = new(C), new(C) if b1 is not None else None
            d_bd_below = new(C) if layer > 0 and has_down_bias(layer - 1) else None
            _check(lib.layer_norm_backward(sp["da"], p["x"], p["m1"], p["r1"], pw[0], sp["dxn"], d_x.data_ptr(),
                                           d_w1.data_ptr(), _address(d_b1), _address(d_bd_below), N, C, center, threads))
            grads[_PER_BLOCK * layer: _PER_BLOCK * (layer + 1)] = [
                d_w1, d_b1, d_wqkv, d_bqkv, d_wo, d_bo, d_w2, d_b2, d_wup, d_bup, d_wd, d_bd,
            ]
            d_next, d_bd = d_x, d_bd_below
        # The embeddings: scatter-add into the token table, sum over the batch into the position table.
        d_table = torch.zeros_like(table)
        d_positions = None if positions is None else torch.zeros_like(positions)
        lib.embed_backward(tokens.data_ptr(), d_next.data_ptr(), d_table.data_ptr(), _address(d_positions), s.B, s.T, C)
        if not torch._C._autograd._get_current_graph_task_keep_graph():
            lease.give_back()  # retain_graph=True keeps it until the graph itself is freed
        return (None, None, None, None, d_table, d_positions, d_final_w, d_final_b, *grads)


def _recomputed_backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """The backward as a graph of ATen ops (double backward, e.g. a gradient penalty, or a batched
    gradient under is_grads_batched=True): the trunk runs again module by module, and autograd
    differentiates that (keeping the graph of the gradients only for a double backward)."""
    tokens, *params = ctx.saved_tensors
    model = ctx.model
    T = tokens.shape[1]
    rope = model.rotary.tables(None, T) if model.rotary is not None else None
    attention = AttentionContext(rope=rope, mask=None, is_causal=True, cache=None)
    create_graph = torch.is_grad_enabled()
    with unfused(), torch.enable_grad():
        x = model.token_embedding(tokens)
        if model.position_embedding is not None:
            x = x + model.position_embedding.weight[:T]
        for layer, block in enumerate(model.blocks):
            x = block(x, layer, attention)
        x = model.final_norm(x)
        wanted = [p for p in params if p is not None]
        found = iter(torch.autograd.grad(x, wanted, grad_out, create_graph=create_graph, allow_unused=True))
    return (None, None, None, None, *(None if p is None else next(found) for p in params))


def run(model: nn.Module, tokens: torch.Tensor, params: list[torch.Tensor | None]) -> torch.Tensor:
    """``model.final_norm`` of the blocks over the embeddings of ``tokens`` (B, T) -> (B, T, C), as one
    autograd node; ``params`` is what ``plan`` returned."""
    blocks = model.blocks
    first: Block = blocks[0]
    attn = first.attn
    B, T = tokens.shape
    shape = _Shape(B=B, T=T, C=params[0].shape[1], qkv=attn.qkv.out_features, hidden=first.mlp.down.in_features,
                   H=attn.n_head, Hkv=attn.n_kv_head, layers=len(blocks), layer_norm=type(model.final_norm) is LayerNorm,
                   gated=first.mlp.gated, rope=model.rotary is not None)
    return _FusedTrunk.apply(tokens.contiguous(), model, shape, model.final_norm.eps, *params)


# ---------------------------------------------------------------------------------- the LM head


def _rows(t: torch.Tensor, width: int) -> torch.Tensor:
    """t (..., width) as a contiguous (rows, width) matrix (a copy only when it is not one already,
    e.g. x[:, -1:] of a batch)."""
    rows = t.reshape(-1, width)
    return rows if rows.is_contiguous() else rows.contiguous()


class _LMHead(torch.autograd.Function):
    """logits (B, T, V) = x (B, T, C) @ weight (V, C)^T through the gemm kernel, forward and backward:
    what the (bias-free, usually tied) LM head Linear computes after the fused trunk."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        *lead, C = x.shape
        rows = _rows(x, C)
        V = weight.shape[0]
        logits = torch.empty(rows.shape[0], V, dtype=torch.float32, device="cpu")
        pack = torch.empty(gemm_kernel.pack_floats(V, C), dtype=torch.float32, device="cpu")
        gemm_kernel.linear(rows, weight, None, logits, pack)
        ctx.save_for_backward(x, weight)  # x itself, not rows: a double backward differentiates through it
        ctx.lead = lead
        return logits.view(*lead, V)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:  # type: ignore[override]
        x, weight = ctx.saved_tensors
        V, C = weight.shape
        if torch.is_grad_enabled() or not torch._C._has_storage(grad):  # double backward, batched gradients
            g = grad.reshape(-1, V)
            return (g @ weight).view(*ctx.lead, C), g.t() @ x.reshape(-1, C)
        rows, g = _rows(x, C), _rows(grad, V)
        d_x = d_weight = None
        if ctx.needs_input_grad[0]:
            d_x = gemm_kernel.grad_input(g, weight, torch.empty(g.shape[0], C, dtype=torch.float32, device="cpu"))
            d_x = d_x.view(*ctx.lead, C)
        if ctx.needs_input_grad[1]:
            scratch = torch.empty(max(1, gemm_kernel.weight_scratch_floats(V, C)), dtype=torch.float32, device="cpu")
            d_weight = gemm_kernel.grad_weight(g, rows, scratch)
        return d_x, d_weight


# The kernel's forward lays the head's weight out in panels first, a copy of it made at every step:
# up to this size (16 MB: a 32k x 128 vocabulary table) that copy is small next to the product.
# GPT-2's 50257 x 768 table would be a 154 MB copy per step; such heads stay with nn.Linear (MKL).
MAX_HEAD_PACK_FLOATS = 4 << 20


def lm_head(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model.lm_head(x)`` for the fused trunk's output x (B, T, C): through the gemm kernel when the
    head is a plain bias-free nn.Linear with a trainable CPU float32 weight (GPT's, tied to the token
    table or not) of at most MAX_HEAD_PACK_FLOATS, and the kernel is available; else the module."""
    head = model._modules["lm_head"]
    if type(head) is nn.Linear and _untouched(head) and head._parameters.get("bias") is None and gemm_kernel.available():
        weight = head._parameters["weight"]
        if (_trainable_cpu_float(weight) and weight.shape[1] == x.shape[-1]
                and gemm_kernel.pack_floats(*weight.shape) <= MAX_HEAD_PACK_FLOATS):
            return _LMHead.apply(x, weight)
    return head(x)
