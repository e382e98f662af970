"""The stack of GPT-2 blocks as one autograd node, for training on CPU in float32.

At small widths a training step on CPU is about 70% matmuls; most of the rest is passes over the
activations that ATen runs one op at a time: each Linear's bias copied into its output, the
residual add, LayerNorm reading the sum again, and in the backward a column sum per bias, a
residual-gradient add, and a fresh allocation for every intermediate, whose pages the kernel hands
back zeroed, one fault at a time. Here one ``torch.autograd.Function`` runs every block:

- the matmuls are ATen's (``torch.mm`` / ``addmm``, MKL), written into preallocated buffers;
- attention is gptkit's fused causal kernel (``attention_kernel``);
- the rest is four fused C kernels (``csrc/block.c``): residual + bias + LayerNorm, its backward
  with the residual gradient and the bias gradient, bias + GELU, and GELU's backward with the bias
  gradient;
- activations and backward scratch live in an arena that is reused from step to step (taken by a
  forward, handed back when its backward ends), so a step allocates only the gradients it returns.

The numbers are those of the module-by-module forward within float32 rounding (tested, forward
and backward, against it and against float64). It runs only where it computes exactly what the
modules would (``applies``): GPT-2 blocks (LayerNorm, tanh-GELU MLP, no RoPE, no qk-norm), no
dropout, no KV cache or mask, CPU float32 plain tensors, every block parameter trainable, no hooks
on the blocks, eager mode (not torch.compile, functorch or forward-mode AD), T up to the attention
kernel's limit, and the kernels built. Everywhere else the blocks run one by one as usual;
``unfused()`` forces that (tests, benchmarks).

Measured on the 2-core test machine at the char shape (benchmarks/README.md): a training step
about 10% faster than the module-by-module forward with the same kernels.
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

from gptkit.model import attention_kernel
from gptkit.model.cpu_kernels import POINTER, SIZE, THREADS, _eager, _plain_cpu_float, load_library
from gptkit.model.layers import MLP, AttentionContext, Block, CausalSelfAttention, LayerNorm

_FLOAT = ctypes.c_float
_SIGNATURES = (
    ("add_layer_norm", (POINTER,) * 9 + (SIZE, SIZE, _FLOAT, THREADS)),
    ("layer_norm_backward", (POINTER,) * 10 + (SIZE, SIZE, THREADS), ctypes.c_int),
    ("bias_gelu_forward", (POINTER, POINTER, POINTER, SIZE, SIZE, THREADS)),
    ("gelu_backward_colsum", (POINTER, POINTER, POINTER, POINTER, SIZE, SIZE, THREADS), ctypes.c_int),
    ("column_sum", (POINTER, POINTER, SIZE, SIZE, THREADS), ctypes.c_int),
)

# Arenas kept for this many distinct shapes (least recently used dropped first): training runs
# one shape, or a few (a last short batch, validation under grad).
_ARENA_SHAPES = 4

_state = threading.local()


def _library() -> ctypes.CDLL | None:
    return load_library("block", _SIGNATURES)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _check(status: int) -> None:
    if status != 0:
        raise MemoryError("gptkit's fused block kernels could not allocate their scratch memory")


@contextlib.contextmanager
def unfused() -> Iterator[None]:
    """Within this block (in this thread), GPT runs its blocks one module at a time."""
    previous = getattr(_state, "off", False)
    _state.off = True
    try:
        yield
    finally:
        _state.off = previous


# ---------------------------------------------------------------------------------- when it runs


def _plain_block(block: nn.Module) -> bool:
    """A GPT-2 block exactly as gptkit builds it: no subclass, wrapper, hook or parametrization
    anywhere in it, no dropout, LayerNorms and a GELU MLP."""
    if type(block) is not Block:
        return False
    attn, mlp = block.attn, block.mlp
    expected = (
        (block.attn_norm, LayerNorm), (block.mlp_norm, LayerNorm), (attn, CausalSelfAttention), (mlp, MLP),
        (attn.qkv, nn.Linear), (attn.out, nn.Linear), (mlp.up, nn.Linear), (mlp.down, nn.Linear),
        (block.dropout, nn.Identity),
    )
    if not all(type(module) is kind for module, kind in expected):
        return False
    if mlp.gated or attn.q_norm is not None or attn.dropout != 0.0:
        return False
    # A forward replaced on the instance (activation checkpointing does this) or a hook would be
    # bypassed.
    return not any(
        "forward" in vars(m) or m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
        or m._backward_pre_hooks
        for m in block.modules()
    )


def _global_hooks() -> bool:
    from torch.nn.modules import module as module_module

    return bool(
        module_module._global_forward_hooks
        or module_module._global_forward_pre_hooks
        or module_module._global_backward_hooks
        or module_module._global_backward_pre_hooks
    )


def applies(blocks: nn.ModuleList, x: torch.Tensor, ctx: AttentionContext) -> bool:
    """Whether ``run`` computes exactly what running ``blocks`` one by one on ``x`` (B, T, C) would."""
    if getattr(_state, "off", False) or not torch.is_grad_enabled() or len(blocks) == 0:
        return False
    if not (ctx.is_causal and ctx.cache is None and ctx.mask is None and ctx.rope is None):
        return False
    if x.dim() != 3 or not 2 <= x.shape[1] <= attention_kernel.MAX_T or not _plain_cpu_float(x.contiguous()):
        return False
    if not all(block.training and _plain_block(block) for block in blocks) or _global_hooks():
        return False
    params = [p for block in blocks for p in block.parameters()]
    if not all(type(p) is nn.Parameter and p.requires_grad and _plain_cpu_float(p.data) for p in params):
        return False
    return _eager() and not attention_kernel._forward_ad_active() and attention_kernel.available() and (
        _library() is not None
    )


# ---------------------------------------------------------------------------------- the arena


@dataclass(frozen=True)
class _Shape:
    B: int
    T: int
    C: int  # d_model
    qkv: int  # width of the qkv projection, (H + 2 Hkv) D
    hidden: int  # MLP width
    H: int
    Hkv: int
    layers: int


class _Arena:
    """Every activation the forward saves and every scratch matrix the backward needs, for one shape.

    Per layer l (N = B T rows): x (the block's input; layer 0 uses the caller's tensor), a1 / m1 / r1
    (LayerNorm 1's output, mean and 1/std), qkv, y and lse (attention output and its log-sum-exp),
    xn (the residual after attention), a2 / m2 / r2 (LayerNorm 2), h (MLP pre-activation, bias
    included) and g (GELU of h)."""

    def __init__(self, s: _Shape) -> None:
        N, C = s.B * s.T, s.C

        def empty(*shape: int) -> torch.Tensor:
            return torch.empty(*shape, dtype=torch.float32)

        self.layers = [
            {
                "x": empty(N, C) if layer > 0 else None, "a1": empty(N, C), "m1": empty(N), "r1": empty(N),
                "qkv": empty(N, s.qkv), "y": empty(N, s.H * (s.qkv // (s.H + 2 * s.Hkv))), "lse": empty(s.B, s.H, s.T),
                "xn": empty(N, C), "a2": empty(N, C), "m2": empty(N), "r2": empty(N),
                "h": empty(N, s.hidden), "g": empty(N, s.hidden),
            }
            for layer in range(s.layers)
        ]
        width = s.H * (s.qkv // (s.H + 2 * s.Hkv))
        self.dg, self.dh = empty(N, s.hidden), empty(N, s.hidden)
        self.da, self.dxn, self.dy, self.dqkv = empty(N, C), empty(N, C), empty(N, width), empty(N, s.qkv)
        self.dx = (empty(N, C), empty(N, C))  # the gradient flowing down, alternating between layers


_pool: OrderedDict[_Shape, list[_Arena]] = OrderedDict()
_pool_lock = threading.Lock()


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
        del _pool[shape][:-2]  # two per shape: a retained graph plus the next step
        while len(_pool) > _ARENA_SHAPES:
            _pool.popitem(last=False)


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


def _block_params(block: Block) -> list[torch.Tensor | None]:
    a, m = block.attn, block.mlp
    return [
        block.attn_norm.weight, block.attn_norm.bias, a.qkv.weight, a.qkv.bias, a.out.weight, a.out.bias,
        block.mlp_norm.weight, block.mlp_norm.bias, m.up.weight, m.up.bias, m.down.weight, m.down.bias,
    ]


class _FusedBlocks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, blocks: nn.ModuleList, shape: _Shape, eps: float,  # type: ignore[override]
                *params: torch.Tensor | None) -> torch.Tensor:
        lib = _library()
        assert lib is not None
        attn = attention_kernel._library()
        assert attn is not None
        threads = torch.get_num_threads()
        s = shape
        N, C, D = s.B * s.T, s.C, s.qkv // (s.H + 2 * s.Hkv)
        lease = _Lease(s)
        arena = lease.arena
        assert arena is not None
        ctx.save_for_backward(x, *params)  # the input itself: a double backward recomputes from it
        x = x.view(N, C)
        out = torch.empty(N, C, dtype=x.dtype)  # the last block's output: the caller's to keep
        for layer in range(s.layers):
            w1, b1, wqkv, bqkv, wo, bo, w2, b2, wup, bup, wd, bd = params[_PER_BLOCK * layer: _PER_BLOCK * (layer + 1)]
            act = arena.layers[layer]
            x_in = x if layer == 0 else act["x"]
            if layer == 0:  # the later blocks' first LayerNorm runs fused with the residual below
                lib.add_layer_norm(_ptr(x), None, None, _ptr(x), _ptr(w1), _ptr(b1), _ptr(act["a1"]),
                                   _ptr(act["m1"]), _ptr(act["r1"]), N, C, eps, threads)
            if bqkv is not None:
                torch.addmm(bqkv, act["a1"], wqkv.t(), out=act["qkv"])
            else:
                torch.mm(act["a1"], wqkv.t(), out=act["qkv"])
            attention_kernel._check(attn.attention_forward(
                _ptr(act["qkv"]), _ptr(act["y"]), _ptr(act["lse"]), s.B, s.T, s.H, s.Hkv, D, threads))
            # xn = x + y Wo^T + bo, then LayerNorm 2 of it
            torch.mm(act["y"], wo.t(), out=act["xn"])
            lib.add_layer_norm(_ptr(x_in), _ptr(act["xn"]), _ptr(bo), _ptr(act["xn"]), _ptr(w2), _ptr(b2),
                               _ptr(act["a2"]), _ptr(act["m2"]), _ptr(act["r2"]), N, C, eps, threads)
            torch.mm(act["a2"], wup.t(), out=act["h"])
            lib.bias_gelu_forward(_ptr(act["h"]), _ptr(bup), _ptr(act["g"]), N, s.hidden, threads)
            # x_next = xn + g Wd^T + bd, then the next block's LayerNorm 1 of it
            last = layer == s.layers - 1
            following = None if last else arena.layers[layer + 1]
            x_next = out if last else following["x"]
            torch.mm(act["g"], wd.t(), out=x_next)
            if last:
                lib.add_layer_norm(_ptr(act["xn"]), _ptr(x_next), _ptr(bd), _ptr(x_next), None, None, None, None,
                                   None, N, C, eps, threads)
            else:
                nw1, nb1 = params[_PER_BLOCK * (layer + 1)], params[_PER_BLOCK * (layer + 1) + 1]
                lib.add_layer_norm(_ptr(act["xn"]), _ptr(x_next), _ptr(bd), _ptr(x_next), _ptr(nw1), _ptr(nb1),
                                   _ptr(following["a1"]), _ptr(following["m1"]), _ptr(following["r1"]), N, C, eps,
                                   threads)
        ctx.lease, ctx.shape, ctx.blocks = lease, s, blocks
        return out.view(s.B, s.T, C)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        if torch.is_grad_enabled():  # create_graph=True: the gradients must be differentiable
            return _recomputed_backward(ctx, grad_out)
        lease: _Lease = ctx.lease
        arena = lease.arena
        if arena is None:
            raise RuntimeError("the fused blocks' saved activations were already freed by an earlier backward")
        lib = _library()
        attn = attention_kernel._library()
        assert lib is not None and attn is not None
        threads = torch.get_num_threads()
        s: _Shape = ctx.shape
        N, C, D = s.B * s.T, s.C, s.qkv // (s.H + 2 * s.Hkv)
        x_saved, *params = ctx.saved_tensors
        x0 = x_saved.view(N, C)
        has_bias = params[5] is not None
        grads: list[torch.Tensor | None] = [None] * len(params)

        d_next = grad_out.reshape(N, C)
        if not _plain_cpu_float(d_next):
            d_next = d_next.contiguous()
        d_bd = torch.empty(C) if has_bias else None  # the last block's down-projection bias gradient
        if d_bd is not None:
            _check(lib.column_sum(_ptr(d_next), _ptr(d_bd), N, C, threads))
        for layer in reversed(range(s.layers)):
            w1, b1, wqkv, bqkv, wo, bo, w2, b2, wup, bup, wd, bd = params[_PER_BLOCK * layer: _PER_BLOCK * (layer + 1)]
            act = arena.layers[layer]
            x_in = x0 if layer == 0 else act["x"]
            # MLP: x_next = xn + gelu(a2 Wup^T + bup) Wd^T + bd
            torch.mm(d_next, wd, out=arena.dg)
            d_wd = torch.mm(d_next.t(), act["g"])
            d_bup = torch.empty(s.hidden) if bup is not None else None
            _check(lib.gelu_backward_colsum(_ptr(arena.dg), _ptr(act["h"]), _ptr(arena.dh), _ptr(d_bup), N, s.hidden,
                                            threads))
            torch.mm(arena.dh, wup, out=arena.da)
            d_wup = torch.mm(arena.dh.t(), act["a2"])
            # LayerNorm 2 and the residual around it; its column sums are the out projection's bias gradient
            d_w2, d_b2 = torch.empty(C), torch.empty(C) if b2 is not None else None
            d_bo = torch.empty(C) if bo is not None else None
            _check(lib.layer_norm_backward(_ptr(arena.da), _ptr(act["xn"]), _ptr(act["m2"]), _ptr(act["r2"]), _ptr(w2),
                                           _ptr(d_next), _ptr(arena.dxn), _ptr(d_w2), _ptr(d_b2), _ptr(d_bo), N, C,
                                           threads))
            # Attention: xn = x + attention(a1 Wqkv^T + bqkv) Wo^T + bo
            torch.mm(arena.dxn, wo, out=arena.dy)
            d_wo = torch.mm(arena.dxn.t(), act["y"])
            attention_kernel._check(attn.attention_backward(
                _ptr(act["qkv"]), _ptr(act["y"]), _ptr(act["lse"]), _ptr(arena.dy), _ptr(arena.dqkv), s.B, s.T, s.H,
                s.Hkv, D, threads))
            d_bqkv = torch.empty(s.qkv) if bqkv is not None else None
            if d_bqkv is not None:
                _check(lib.column_sum(_ptr(arena.dqkv), _ptr(d_bqkv), N, s.qkv, threads))
            torch.mm(arena.dqkv, wqkv, out=arena.da)
            d_wqkv = torch.mm(arena.dqkv.t(), act["a1"])
            # LayerNorm 1 and the residual; its column sums are the previous block's down bias gradient
            d_x = torch.empty(N, C) if layer == 0 else arena.dx[layer % 2]
            d_w1, d_b1 = torch.empty(C), torch.empty(C) if b1 is not None else None
            d_bd_below = torch.empty(C) if has_bias and layer > 0 else None
            _check(lib.layer_norm_backward(_ptr(arena.da), _ptr(x_in), _ptr(act["m1"]), _ptr(act["r1"]), _ptr(w1),
                                           _ptr(arena.dxn), _ptr(d_x), _ptr(d_w1), _ptr(d_b1), _ptr(d_bd_below), N, C,
                                           threads))
            grads[_PER_BLOCK * layer: _PER_BLOCK * (layer + 1)] = [
                d_w1, d_b1, d_wqkv, d_bqkv, d_wo, d_bo, d_w2, d_b2, d_wup, d_bup, d_wd, d_bd,
            ]
            d_next, d_bd = d_x, d_bd_below
        if not torch._C._autograd._get_current_graph_task_keep_graph():
            lease.give_back()  # retain_graph=True keeps it until the graph itself is freed
        return (d_next.view(s.B, s.T, C), None, None, None, *grads)


def _recomputed_backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """The backward as a graph of ATen ops (double backward, e.g. a gradient penalty): the blocks
    run again module by module from the saved input, and autograd differentiates that."""
    x0, *params = ctx.saved_tensors
    s: _Shape = ctx.shape
    attention = AttentionContext(rope=None, mask=None, is_causal=True, cache=None)
    with unfused():
        x = x0
        for layer, block in enumerate(ctx.blocks):
            x = block(x, layer, attention)
        wanted = [x0, *(p for p in params if p is not None)]
        found = iter(torch.autograd.grad(x, wanted, grad_out, create_graph=True, allow_unused=True))
    d_x0 = next(found)
    grads = [None if p is None else next(found) for p in params]
    return (d_x0, None, None, None, *grads)


def run(blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    """The blocks applied to ``x`` (B, T, C) as one autograd node; the caller checks ``applies``."""
    first: Block = blocks[0]
    attn = first.attn
    B, T, C = x.shape
    shape = _Shape(B=B, T=T, C=C, qkv=attn.qkv.out_features, hidden=first.mlp.up.out_features, H=attn.n_head,
                   Hkv=attn.n_kv_head, layers=len(blocks))
    params = [p for block in blocks for p in _block_params(block)]
    return _FusedBlocks.apply(x.contiguous(), blocks, shape, first.attn_norm.eps, *params)
