"""Scale planner: parameters, FLOPs, memory per GPU and time to train, by arithmetic alone.

``plan(config, ...)`` answers "does this model train on these GPUs with this strategy, and how long
does it take?" before anything is launched. Nothing here builds a model or touches a GPU; every
number is a formula of the shape, stated next to it:

* parameters: counted exactly as :meth:`gptkit.model.GPT.num_parameters` counts them;
* training FLOPs per token: ``6N + 12 * n_layer * d_model * seq_len`` (forward + backward of every
  weight, plus attention scores and values; Kaplan et al. 2020, Chowdhery et al. 2022, App. B);
  total training FLOPs are that times the token count, and ``6ND`` alone is printed too since
  it is the convention of Kaplan et al. and Brown et al. (GPT-3 175B on 300B tokens: 3.14e23);
* model state (weights, gradients, AdamW state) in bytes per parameter, split over the ranks as
  the strategy shards it;
* activations per GPU from Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
  Transformer Models"): ``s*b*h*(34 + 5*a*s/h)`` bytes per layer without recomputation, about
  ``2*s*b*h`` per layer (its input) with full activation checkpointing, plus one layer being
  recomputed;
* step time ``global_batch * seq_len * FLOPs/token / (gpus * peak * mfu)``.

These are estimates for planning: allocator fragmentation, communication buffers, CUDA context
and kernels' workspaces are not modelled, which is what the safety margin is for.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass
from typing import Any

from gptkit.config import ModelConfig
from gptkit.errors import ConfigError
from gptkit.model.presets import LLAMA_ARCHITECTURE

# --------------------------------------------------------------------------------------------
# Data: large shapes and GPUs
# --------------------------------------------------------------------------------------------

# GPT-3 (Brown et al., 2020, Table 2.1): GPT-2's architecture (learned positions, LayerNorm, GELU,
# biases, tied embeddings) with a 2048-token context. The paper's 1.3B (24 heads of 128 on 2048)
# and 13B (d_model 5140) rows are not self-consistent; 16 heads on 2048 and d_model 5120 (40 x 128)
# are the shapes that divide.
_GPT3 = {"vocab_size": 50257, "block_size": 2048, "bias": True, "tie_embeddings": True}

PLAN_PRESETS: dict[str, dict[str, Any]] = {
    "gpt3-1.3b": {**_GPT3, "n_layer": 24, "n_head": 16, "d_model": 2048},
    "gpt3-2.7b": {**_GPT3, "n_layer": 32, "n_head": 32, "d_model": 2560},
    "gpt3-6.7b": {**_GPT3, "n_layer": 32, "n_head": 32, "d_model": 4096},
    "gpt3-13b": {**_GPT3, "n_layer": 40, "n_head": 40, "d_model": 5120},
    "gpt3-175b": {**_GPT3, "n_layer": 96, "n_head": 96, "d_model": 12288},
    # Llama 2 (Touvron et al., 2023): 4096-token context, 32000-token vocabulary; 70B uses GQA.
    "llama-2-7b": {**LLAMA_ARCHITECTURE, "n_layer": 32, "n_head": 32, "d_model": 4096, "d_ff": 11008,
                   "vocab_size": 32000, "block_size": 4096},
    "llama-2-70b": {**LLAMA_ARCHITECTURE, "n_layer": 80, "n_head": 64, "n_kv_head": 8, "d_model": 8192,
                    "d_ff": 28672, "vocab_size": 32000, "block_size": 4096},
    # Beyond: Llama 3.1 405B (Dubey et al., 2024) and the 1T shape of Narayanan et al. 2021 (Megatron).
    "llama-3-405b": {**LLAMA_ARCHITECTURE, "n_layer": 126, "n_head": 128, "n_kv_head": 8, "d_model": 16384,
                     "d_ff": 53248, "vocab_size": 128256, "block_size": 8192, "rope_base": 500000.0},
    "gpt-1t": {**_GPT3, "n_layer": 128, "n_head": 160, "d_model": 25600, "vocab_size": 51200},
}


@dataclass(frozen=True)
class GPUSpec:
    name: str
    peak_bf16: float  # dense bf16 tensor-core FLOP/s (no sparsity)
    peak_tf32: float  # dense TF32 tensor-core FLOP/s, used for --precision fp32
    memory_bytes: float  # published capacity, decimal GB (the device reports a little more)


# NVIDIA data sheets, SXM parts.
GPUS: dict[str, GPUSpec] = {
    "A100": GPUSpec("A100 80GB SXM", 312e12, 156e12, 80e9),
    "H100": GPUSpec("H100 SXM", 989e12, 494.5e12, 80e9),
    "H200": GPUSpec("H200 SXM", 989e12, 494.5e12, 141e9),
}

STRATEGIES = ("ddp", "fsdp", "tp", "fsdp+tp")
PRECISIONS = ("bf16", "fp32")
MEMORY_MARGIN = 0.9  # plan to use at most this share of a GPU's memory
TOKENS_PER_PARAM = 20  # compute-optimal (Hoffmann et al., 2022)
DEFAULT_TOKENS_PER_STEP = 2**19  # default global batch: about half a million tokens
# Sanity bounds on inputs: far beyond any real run (Llama 3 405B: 1.5e13 tokens on 16K GPUs), and
# small enough that every number stays a finite float.
MAX_TOKENS = 1e18
MAX_GPUS = 1_000_000
MAX_INT = 2**53  # seq_len, global_batch, micro_batch, tp

# Bytes per parameter of model state: (weights, gradients, optimizer state).
# bf16: bf16 weights and gradients, fp32 master weights + Adam m + Adam v in the optimizer (Rajbhandari
# et al. 2020, ZeRO: 2 + 2 + 12 = 16). fp32: fp32 weights and gradients, Adam m + v (4 + 4 + 8 = 16).
STATE_BYTES = {"bf16": (2, 2, 12), "fp32": (4, 4, 8)}


# --------------------------------------------------------------------------------------------
# Model arithmetic
# --------------------------------------------------------------------------------------------


def resolve_model(config: ModelConfig | str) -> tuple[ModelConfig, str | None]:
    """A ModelConfig and its preset name (None for a config passed in)."""
    if isinstance(config, ModelConfig):
        return config, None
    if not isinstance(config, str):
        raise ConfigError(f"model: must be a ModelConfig or a preset name; got {config!r}")
    from gptkit.model.presets import PRESETS

    if config in PLAN_PRESETS:
        return ModelConfig(**PLAN_PRESETS[config]), config
    if config in PRESETS:
        return ModelConfig(**PRESETS[config]), config
    known = ", ".join([*PRESETS, *PLAN_PRESETS])
    raise ConfigError(f"preset: unknown preset {config!r}; known presets: {known}")


def _norm_params(c: ModelConfig, dim: int) -> int:
    return dim if c.norm == "rmsnorm" or not c.bias else 2 * dim


def layer_parameters(c: ModelConfig) -> int:
    """Parameters of one transformer block."""
    d, hd = c.d_model, c.head_dim
    qkv_out = (c.n_head + 2 * c.kv_heads) * hd
    attn = d * qkv_out + c.n_head * hd * d + ((qkv_out + d) if c.bias else 0)
    if c.qk_norm:
        attn += 2 * hd
    hidden = c.mlp_hidden
    up_out = 2 * hidden if c.mlp == "swiglu" else hidden
    mlp = d * up_out + hidden * d + ((up_out + d) if c.bias else 0)
    return attn + mlp + 2 * _norm_params(c, d)


def count_parameters(c: ModelConfig) -> tuple[int, int]:
    """(total, non-embedding) parameters. The total matches ``GPT(c).num_parameters()``; the
    non-embedding count drops the token and position tables and an untied output head (Kaplan
    et al. 2020)."""
    d = c.d_model
    token = c.vocab_size * d
    position = c.block_size * d if c.position == "learned" else 0
    head = 0 if c.tie_embeddings else c.vocab_size * d
    body = c.n_layer * layer_parameters(c) + _norm_params(c, d)
    return token + position + head + body, body


# --------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Memory:
    """Bytes per GPU for one layout."""

    weights: float
    gradients: float
    optimizer: float
    gather_buffer: float  # FSDP: unsharded weights of the layers being all-gathered
    activations: float  # with the chosen checkpointing
    activations_full: float  # without checkpointing
    activations_checkpointed: float  # with full activation checkpointing

    @property
    def states(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.gather_buffer

    @property
    def total(self) -> float:
        return self.states + self.activations


@dataclass(frozen=True)
class Layout:
    """How a run is spread over GPUs."""

    strategy: str
    gpus: int
    tp: int
    micro_batch: int
    checkpointing: bool

    def flags(self, original: Layout) -> str:
        parts = []
        if self.strategy != original.strategy or self.tp != original.tp:
            parts.append(f"--strategy {self.strategy}" + (f" --tp {self.tp}" if self.tp > 1 else ""))
        if self.gpus != original.gpus:
            parts.append(f"--gpus {self.gpus}")
        if self.checkpointing and not original.checkpointing:
            parts.append("--checkpointing")
        if self.micro_batch != original.micro_batch:
            parts.append(f"--micro-batch {self.micro_batch}")
        return " ".join(parts)


@dataclass(frozen=True)
class Plan:
    """Everything ``gptkit plan`` prints; bytes and FLOPs as floats, per GPU unless named total."""

    config: ModelConfig
    preset: str | None
    seq_len: int
    global_batch: int
    micro_batch: int
    grad_accum: int
    gpu: str
    gpu_memory: float
    peak_flops: float
    gpus: int
    strategy: str
    tp: int
    dp: int
    checkpointing: bool
    precision: str
    mfu: float
    tokens: float
    tokens_default: bool  # True when tokens came from the 20 tokens/parameter rule
    parameters: int
    non_embedding_parameters: int
    flops_per_token: float  # 6N + 12 * n_layer * d_model * seq_len
    dense_flops_per_token: float  # 6N
    attention_flops_per_token: float  # 12 * n_layer * d_model * seq_len
    train_flops: float  # flops_per_token * tokens
    train_flops_6nd: float  # 6 * N * tokens
    state_bytes_per_param: int
    state_bytes_total: float  # weights + gradients + optimizer for the whole model, unsharded
    memory: Memory
    usable_memory: float  # gpu_memory * MEMORY_MARGIN
    fits: bool
    fits_with_checkpointing: bool
    step_seconds: float
    train_seconds: float
    suggestion: str | None  # the first alternative that fits, when this plan does not

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len

    @property
    def steps(self) -> int:
        """Optimizer steps to see ``tokens``, the last one partial (at least 1)."""
        return max(1, math.ceil(self.tokens / self.tokens_per_step))

    @property
    def train_days(self) -> float:
        return self.train_seconds / 86400


def check_fits_in_memory(
    model_config: ModelConfig, *, trains_here: bool,
    advice: str = "choose a smaller model.* shape (`gptkit plan` estimates sizes)",
) -> None:
    """ConfigError when ``model_config`` cannot fit in this machine's memory: building it would
    otherwise grind for minutes (hours, for a typo such as ``model.n_layer=100000000``) before
    failing with an allocator's traceback or being killed. Every process builds the whole model
    in float32 in memory first (4 bytes a parameter); one that trains it there (``trains_here``:
    one CPU process) also holds its gradients and at least one optimizer moment (12 bytes).
    ``advice`` ends the message."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):  # not a system that tells
        return
    parameters = count_parameters(model_config)[0]
    needed = (12 if trains_here else 4) * parameters
    if needed > memory:
        what = "weights, gradients and optimizer state" if trains_here else "weights"
        raise ConfigError(
            f"the model has {parameters:,} parameters: its {what} in float32 need at least "
            f"{needed / 2**30:,.1f} GiB, more than this machine's {memory / 2**30:,.1f} GiB of memory; {advice}"
        )


def _check_positive(value: float, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"{name}: must be > 0; got {value!r}")


def _check_int(value: Any, name: str, maximum: int = MAX_INT) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name}: must be an integer; got {value!r}")
    _check_positive(value, name)
    if value > maximum:
        raise ConfigError(f"{name}: must be <= {maximum:,}; got {value:,}")


def _check_tokens(value: Any) -> None:
    _check_positive(value, "tokens")
    if not value <= MAX_TOKENS:  # also catches inf (nan is not > 0)
        raise ConfigError(f"tokens: must be a finite number <= {MAX_TOKENS:.0e}; got {value!r}")


def _gpu(name: str) -> tuple[str, GPUSpec]:
    key = str(name).upper()
    if key not in GPUS:
        raise ConfigError(f"gpu: unknown GPU {name!r}; known: {', '.join(GPUS)}")
    return key, GPUS[key]


def _activations(c: ModelConfig, s: int, b: int, tp: int, precision: str) -> tuple[float, float]:
    """(without, with full checkpointing) activation bytes per GPU, Korthikanti et al. 2022.

    Per layer without recomputation: s*b*h*(34 + 5*a*s/h) bytes of 16-bit activations (the 5*a*s/h
    term is the attention matrix; fused attention such as FlashAttention does not keep it, so this
    is an upper bound). With tensor parallelism we assume sequence parallelism too, which divides
    everything by the TP degree. With full checkpointing each layer keeps its input, 2*s*b*h bytes,
    and one layer at a time is recomputed in full. Both add the fp32 logits of the loss, 4*s*b*V/tp.
    fp32 training doubles the 16-bit terms.
    """
    h, a, L = c.d_model, c.n_head, c.n_layer
    scale = 2 if precision == "fp32" else 1
    per_layer = s * b * h * (34 + 5 * a * s / h) * scale / tp
    kept_input = 2 * s * b * h * scale / tp
    logits = 4 * s * b * c.vocab_size / tp
    return L * per_layer + logits, L * kept_input + per_layer + logits


def _memory(c: ModelConfig, n: int, layout: Layout, seq_len: int, precision: str) -> Memory:
    w, g, o = STATE_BYTES[precision]
    dp = layout.gpus // layout.tp
    shard = layout.tp * (dp if "fsdp" in layout.strategy else 1)
    gather = 0.0
    if "fsdp" in layout.strategy and dp > 1:
        # FSDP all-gathers one layer's weights while prefetching the next: two layers unsharded (over dp).
        gather = 2 * layer_parameters(c) * w / layout.tp
    full, ckpt = _activations(c, seq_len, layout.micro_batch, layout.tp, precision)
    return Memory(
        weights=n * w / shard,
        gradients=n * g / shard,
        optimizer=n * o / shard,
        gather_buffer=gather,
        activations=ckpt if layout.checkpointing else full,
        activations_full=full,
        activations_checkpointed=ckpt,
    )


def _layout_error(c: ModelConfig, strategy: str, gpus: int, tp: int) -> str | None:
    """Why ``gptkit train`` would refuse ``strategy`` with TP degree ``tp`` on ``gpus`` ranks (a one-line
    message naming the flag), or None when it runs. Mirrors TrainConfig's checks of tp_size and
    gptkit.distributed.mesh.ParallelDims (from_config and validate_model) without importing torch."""
    if strategy in ("ddp", "fsdp"):
        if tp != 1:
            return f"tp: a degree of {tp} needs --strategy tp or fsdp+tp; got {strategy}"
    elif strategy == "tp":
        if tp != gpus:
            return (f"tp: strategy tp runs one TP group over all {gpus} GPUs, so --tp must be {gpus}; got {tp} "
                    "(use --strategy fsdp+tp to add data parallelism)")
    elif strategy == "fsdp+tp":
        if tp < 2:
            return f"tp: fsdp+tp needs a TP degree >= 2 (use --strategy fsdp for none); got {tp}"
        if gpus % tp or gpus < 2 * tp:
            return (f"gpus: fsdp+tp with a TP degree of {tp} needs a multiple of {tp} GPUs and at least {2 * tp} "
                    f"(2 data-parallel groups); got {gpus}")
    if tp > 1:
        whole = math.gcd(c.n_head, c.kv_heads, c.mlp_hidden)
        for field, value in (("n_head", c.n_head), ("n_kv_head", c.kv_heads), ("d_ff", c.mlp_hidden)):
            if value % tp:
                return (f"tp: model.{field} ({value}) is not divisible by the TP degree {tp}; each GPU must hold "
                        f"whole heads and hidden units, so the TP degree must divide {whole}")
    return None


def _valid_layout(c: ModelConfig, layout: Layout, global_batch: int) -> bool:
    if _layout_error(c, layout.strategy, layout.gpus, layout.tp) is not None:
        return False
    dp = layout.gpus // layout.tp
    return global_batch % dp == 0 and (global_batch // dp) % layout.micro_batch == 0


def _smaller_divisors(per_gpu: int, below: int) -> list[int]:
    """Micro-batches that divide ``per_gpu`` and are smaller than ``below``, largest first."""
    return [m for m in range(min(below, per_gpu + 1) - 1, 0, -1) if per_gpu % m == 0]


def _structures(c: ModelConfig, layout: Layout, gpus: int) -> list[tuple[str, int]]:
    """(strategy, tp) layouts ``gptkit train`` accepts on ``gpus`` GPUs, in the order to try them."""
    if gpus == layout.gpus:  # the same GPUs: the cheapest change first
        options = [(layout.strategy, layout.tp), ("fsdp", 1)]
        options += [("fsdp+tp", t) for t in (2, 4, 8)]  # tensor parallelism within a node (NVLink)
    else:  # more GPUs: the deepest sharding first
        options = [("fsdp+tp", t) for t in sorted({8, 4, 2, layout.tp}, reverse=True) if t > 1]
        options.append(("fsdp", 1))
    if gpus <= 8:
        options.append(("tp", gpus))  # one TP group over all GPUs (of one node)
    out: list[tuple[str, int]] = []
    for option in options:
        if option not in out and _layout_error(c, option[0], gpus, option[1]) is None:
            out.append(option)
    return out


def _suggest(c: ModelConfig, n: int, layout: Layout, global_batch: int, seq_len: int, precision: str,
             usable: float, gpu_name: str) -> str:
    """Try alternatives from the cheapest change to the most expensive; name the first that fits.

    Only layouts ``gptkit train`` accepts are tried (see :func:`_layout_error`), and only those whose
    data-parallel degree divides ``global_batch``: first on the same GPUs, then on 2x, 4x, ... 4096x."""
    for k in range(13):
        gpus = layout.gpus * 2**k
        for strategy, tp in _structures(c, layout, gpus):
            dp = gpus // tp
            if global_batch % dp:
                continue
            per_gpu = global_batch // dp
            micros = [layout.micro_batch if gpus == layout.gpus and layout.micro_batch <= per_gpu else per_gpu]
            micros += _smaller_divisors(per_gpu, micros[0])
            tries = [(layout.checkpointing, m) for m in micros] + [(True, m) for m in micros]
            for checkpointing, micro in tries:
                candidate = Layout(strategy, gpus, tp, micro, checkpointing)
                if candidate == layout or not _valid_layout(c, candidate, global_batch):
                    continue
                memory = _memory(c, n, candidate, seq_len, precision)
                if memory.total <= usable:
                    accum = per_gpu // micro
                    note = f" (gradient accumulation {accum})" if accum > 1 else ""
                    found = (f"{candidate.flags(layout)}: {_bytes(memory.total)} of {_bytes(usable)} per GPU"
                             f"{note}")
                    if k == 0:
                        return found
                    return (f"does not fit on {layout.gpus} x {gpu_name} with any strategy; needs about {gpus} "
                            f"GPUs: {found}")
    return (f"does not fit on {layout.gpus} x {gpu_name} with any strategy, nor on up to "
            f"{layout.gpus * 2**12} GPUs at global batch {global_batch}; use a smaller model, shorter sequences "
            "or another --global-batch")


def plan(
    config: ModelConfig | str,
    *,
    seq_len: int | None = None,
    global_batch: int | None = None,
    micro_batch: int | None = None,
    gpu: str = "H100",
    gpus: int = 1,
    strategy: str = "ddp",
    tp: int | None = None,
    tokens: float | None = None,
    mfu: float = 0.4,
    precision: str = "bf16",
    checkpointing: bool = False,
) -> Plan:
    """Plan a training run of ``config`` (a ModelConfig or a preset name).

    ``seq_len`` defaults to the model's block size; ``global_batch`` (sequences per optimizer step)
    to about 2**19 tokens (no more than ``tokens``), rounded up to a multiple of the data-parallel
    degree; ``micro_batch`` (sequences per GPU per forward) to global_batch / data-parallel degree,
    i.e. no gradient accumulation; ``tp`` to 1 for ddp/fsdp, to ``gpus`` for tp (one TP group over
    all GPUs, as ``gptkit train`` runs it) and to the largest of 8, 4, 2 that leaves at least two
    data-parallel groups for fsdp+tp; ``tokens`` to 20 per parameter. Layouts ``gptkit train``
    refuses are refused here too. Raises ConfigError naming the bad field.
    """
    c, preset = resolve_model(config)
    gpu_key, spec = _gpu(gpu)
    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy: must be one of {', '.join(STRATEGIES)}; got {strategy!r}")
    if precision not in PRECISIONS:
        raise ConfigError(f"precision: must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    _check_int(gpus, "gpus", MAX_GPUS)
    if not (isinstance(mfu, (int, float)) and 0 < mfu <= 1):
        raise ConfigError(f"mfu: must be in (0, 1]; got {mfu!r}")
    seq_len = c.block_size if seq_len is None else seq_len
    _check_int(seq_len, "seq_len")
    if c.position == "learned" and seq_len > c.block_size:
        raise ConfigError(
            f"seq_len: must be <= model.block_size ({c.block_size}) with learned positions; got {seq_len}"
        )
    if tp is None:
        tp = 1
        if strategy == "tp":
            tp = gpus
            error = _layout_error(c, strategy, gpus, tp)
            if error is not None:  # the user gave no --tp: name the GPU count
                raise ConfigError(f"gpus: strategy tp splits the model over all {gpus} GPUs; {error[4:]}")
        elif strategy == "fsdp+tp":
            tp = next((t for t in (8, 4, 2) if _layout_error(c, strategy, gpus, t) is None), 2)
    _check_int(tp, "tp")
    error = _layout_error(c, strategy, gpus, tp)
    if error is not None:
        raise ConfigError(error)
    dp = gpus // tp
    n, n_body = count_parameters(c)
    tokens_default = tokens is None
    if tokens_default and TOKENS_PER_PARAM * n > MAX_TOKENS:  # the model is absurd, not a --tokens the user gave
        raise ConfigError(
            f"model: {n:.3g} parameters, so the default of {TOKENS_PER_PARAM} training tokens per parameter "
            f"({TOKENS_PER_PARAM * n:.3g}) is above the {MAX_TOKENS:.0e} limit; give tokens (--tokens), or a smaller model"
        )
    tokens = float(TOKENS_PER_PARAM * n) if tokens is None else tokens
    _check_tokens(tokens)
    if global_batch is None:
        # About 2**19 tokens a step, but no more than the whole budget; a multiple of dp, at least dp.
        per_rank = min(math.ceil(DEFAULT_TOKENS_PER_STEP / seq_len / dp), math.floor(tokens / seq_len / dp))
        global_batch = dp * max(1, per_rank)
        if global_batch * seq_len > tokens and dp == 1:
            raise ConfigError(
                f"tokens: {tokens:.3g} is less than one sequence of seq_len {seq_len} tokens; raise --tokens"
            )
        if global_batch * seq_len > tokens:
            raise ConfigError(
                f"gpus: {gpus} GPUs make {dp} data-parallel ranks, which take at least {dp} sequences x {seq_len} "
                f"tokens = {dp * seq_len:,} tokens per step, more than the {tokens:.3g} training tokens; "
                "use fewer GPUs (or more --tokens)"
            )
    _check_int(global_batch, "global_batch")
    if global_batch % dp:
        raise ConfigError(
            f"global_batch: must be divisible by the data-parallel degree (gpus / tp = {dp}); got {global_batch}"
        )
    if global_batch * seq_len > tokens:
        raise ConfigError(
            f"tokens: {tokens:.3g} is less than one optimizer step (global_batch {global_batch} x seq_len "
            f"{seq_len} = {global_batch * seq_len:,} tokens); raise --tokens or lower --global-batch"
        )
    per_gpu = global_batch // dp
    micro_batch = per_gpu if micro_batch is None else micro_batch
    _check_int(micro_batch, "micro_batch")
    if per_gpu % micro_batch:
        raise ConfigError(
            f"micro_batch: must divide global_batch / data-parallel degree ({per_gpu}); got {micro_batch}"
        )

    dense = 6.0 * n
    attention = 12.0 * c.n_layer * c.d_model * seq_len
    per_token = dense + attention
    peak = spec.peak_bf16 if precision == "bf16" else spec.peak_tf32

    layout = Layout(strategy, gpus, tp, micro_batch, bool(checkpointing))
    memory = _memory(c, n, layout, seq_len, precision)
    usable = spec.memory_bytes * MEMORY_MARGIN
    fits = memory.total <= usable
    fits_ckpt = memory.states + memory.activations_checkpointed <= usable
    suggestion = None if fits else _suggest(c, n, layout, global_batch, seq_len, precision, usable, spec.name)
    throughput = gpus * peak * mfu
    return Plan(
        config=c,
        preset=preset,
        seq_len=seq_len,
        global_batch=global_batch,
        micro_batch=micro_batch,
        grad_accum=per_gpu // micro_batch,
        gpu=gpu_key,
        gpu_memory=spec.memory_bytes,
        peak_flops=peak,
        gpus=gpus,
        strategy=strategy,
        tp=tp,
        dp=dp,
        checkpointing=bool(checkpointing),
        precision=precision,
        mfu=float(mfu),
        tokens=float(tokens),
        tokens_default=tokens_default,
        parameters=n,
        non_embedding_parameters=n_body,
        flops_per_token=per_token,
        dense_flops_per_token=dense,
        attention_flops_per_token=attention,
        train_flops=per_token * tokens,
        train_flops_6nd=dense * tokens,
        state_bytes_per_param=sum(STATE_BYTES[precision]),
        state_bytes_total=float(n * sum(STATE_BYTES[precision])),
        memory=memory,
        usable_memory=usable,
        fits=fits,
        fits_with_checkpointing=fits_ckpt,
        step_seconds=global_batch * seq_len * per_token / throughput,
        train_seconds=tokens * per_token / throughput,
        suggestion=suggestion,
    )


# --------------------------------------------------------------------------------------------
# Formatting and parsing
# --------------------------------------------------------------------------------------------


def _bytes(x: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if x >= size:
            return f"{x / size:.2f} {unit}"
    return f"{x:.0f} B"


def _count(x: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if x >= size:
            return f"{x / size:.2f}{unit}"
    return f"{x:.0f}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.2f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    days = seconds / 86400
    return f"{days:,.1f} days" + (f" ({days / 365.25:,.1f} years)" if days > 365 else "")


def format_plan(p: Plan) -> str:
    """A readable table of the plan."""
    c, m = p.config, p.memory
    w, g, o = STATE_BYTES[p.precision]
    name = p.preset or "custom shape"
    kv = f", {c.kv_heads} kv heads" if c.kv_heads != c.n_head else ""
    shard = {"ddp": "replicated on every GPU", "fsdp": f"sharded over {p.dp} data-parallel ranks",
             "tp": f"split over TP {p.tp}, replicated over {p.dp} data-parallel ranks",
             "fsdp+tp": f"split over TP {p.tp} x sharded over {p.dp} data-parallel ranks"}[p.strategy]
    tokens_note = " (default: compute-optimal 20 tokens/parameter, Hoffmann et al. 2022)" if p.tokens_default else ""
    rows: list[tuple[str, str]] = [
        ("model", f"{name}: {c.n_layer} layers, d_model {c.d_model}, {c.n_head} heads{kv}, "
                  f"{c.mlp} d_ff {c.mlp_hidden}, vocab {c.vocab_size}, "
                  f"{'tied' if c.tie_embeddings else 'untied'} embeddings"),
        ("run", f"{p.gpus} x {GPUS[p.gpu].name} ({_bytes(p.gpu_memory)}, {p.peak_flops:.4g} FLOP/s peak "
                f"{p.precision}), {p.strategy}" + (f" tp={p.tp}" if p.tp > 1 else "") + f", dp={p.dp}"),
        ("batch", f"global {p.global_batch} x {p.seq_len} tokens = {p.tokens_per_step:,} tokens/step; "
                  f"micro-batch {p.micro_batch}/GPU, gradient accumulation {p.grad_accum}"),
        ("", ""),
        ("parameters", f"{p.parameters:,} ({_count(p.parameters)}); non-embedding "
                       f"{p.non_embedding_parameters:,} ({_count(p.non_embedding_parameters)})"),
        ("FLOPs/token", f"{p.flops_per_token:.3g} = 6N {p.dense_flops_per_token:.3g} + "
                        f"12*n_layer*d_model*seq_len {p.attention_flops_per_token:.3g}"),
        ("training tokens", f"{p.tokens:.3g}{tokens_note}"),
        ("training FLOPs", f"{p.train_flops:.3g} (6ND alone: {p.train_flops_6nd:.3g})"),
        ("", ""),
        ("model state", f"{p.state_bytes_per_param} B/param = {_bytes(p.state_bytes_total)} in all "
                        f"({'bf16 weights 2 + bf16 grads 2 + fp32 master 4 + Adam m 4 + v 4' if p.precision == 'bf16' else 'fp32 weights 4 + grads 4 + Adam m 4 + v 4'}); "
                        f"{shard}"),
        ("  weights /GPU", f"{_bytes(m.weights)} ({w} B/param)"),
        ("  gradients /GPU", f"{_bytes(m.gradients)} ({g} B/param)"),
        ("  optimizer /GPU", f"{_bytes(m.optimizer)} ({o} B/param)"),
    ]
    if m.gather_buffer:
        rows.append(("  fsdp gather /GPU", f"{_bytes(m.gather_buffer)} (2 layers unsharded in flight)"))
    rows += [
        ("activations /GPU", f"{_bytes(m.activations_full)} without checkpointing, "
                             f"{_bytes(m.activations_checkpointed)} with (estimates, Korthikanti et al. 2022)"),
        ("total /GPU", f"{_bytes(m.states + m.activations_full)} without checkpointing, "
                       f"{_bytes(m.states + m.activations_checkpointed)} with"),
        ("fits", f"{'YES' if p.fits else 'NO'}: {_bytes(m.total)} "
                 f"{'with' if p.checkpointing else 'without'} checkpointing vs {_bytes(p.usable_memory)} usable "
                 f"({MEMORY_MARGIN:.0%} of {_bytes(p.gpu_memory)})"),
    ]
    if p.suggestion:
        rows.append(("suggestion", p.suggestion))
    rows += [
        ("", ""),
        ("step time", f"{_duration(p.step_seconds)} at {p.mfu:.0%} MFU "
                      "(global_batch*seq_len*FLOPs/token / (gpus*peak*mfu))"),
        ("time to train", f"{_duration(p.train_seconds)} for {p.tokens:.3g} tokens ({p.steps:,.0f} steps)"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}".rstrip() for k, v in rows]
    lines.append("")
    lines.append("Estimates: activations assume 16-bit tensors, sequence parallelism with TP, and keep the "
                 "attention matrix (5*a*s/h), which fused attention avoids; allocator, communication "
                 "buffers and CUDA context are left to the safety margin.")
    return "\n".join(lines)


_SUFFIXES = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}


def parse_quantity(text: str, name: str) -> float:
    """``300e9``, ``300B``, ``1.4T`` or ``2_000_000`` -> a finite float; ConfigError naming ``name``
    otherwise. An exponent and a suffix together (``3e11B``) are refused as ambiguous."""
    match = re.fullmatch(r"\s*([0-9_.eE+-]+)\s*([KMBGT]?)\s*", str(text), flags=re.IGNORECASE)
    try:
        if match is None:
            raise ValueError
        value = float(match.group(1)) * _SUFFIXES.get(match.group(2).upper(), 1.0)
    except ValueError:
        raise ConfigError(f"{name}: not a number; got {text!r} (write 300e9 or 300B)") from None
    if match.group(2) and "e" in match.group(1).lower():
        raise ConfigError(f"{name}: use an exponent or a suffix, not both; got {text!r} (write 300e9 or 300B)")
    if not math.isfinite(value):
        raise ConfigError(f"{name}: must be a finite number; got {text!r}")
    return value


def plan_as_dict(p: Plan) -> dict[str, Any]:
    """A JSON-friendly dict of a plan, with the memory totals spelled out."""
    out = dataclasses.asdict(p)
    out["memory"]["states"] = p.memory.states
    out["memory"]["total"] = p.memory.total
    out["train_days"] = p.train_days
    return out
