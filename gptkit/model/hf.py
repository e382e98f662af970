"""Conversion between gptkit's GPT and Hugging Face ``transformers`` models.

Two families map one-to-one onto a gptkit config:

* GPT-2 (``GPT2LMHeadModel``): learned positions, LayerNorm, tanh-GELU MLP, biases, full multi-head
  attention. HF's ``Conv1D`` stores weights as (in, out), so every matrix is transposed.
* Llama (``LlamaForCausalLM``): RoPE, RMSNorm, SwiGLU, no biases, optional grouped-query attention.
  HF and gptkit both use the "rotate half" RoPE layout, so q/k rows need no permutation.

``transformers`` is an optional dependency (``pip install 'gptkit[hf]'``): it is imported only inside
the functions that need it.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import os
import pickle
import shutil
from pathlib import Path
from collections.abc import Mapping
from typing import Any

import torch
from safetensors import SafetensorError

from gptkit.config import ModelConfig
from gptkit.errors import CheckpointError, ConfigError, GptkitError, first_line
from gptkit.fileio import atomic_directory, is_or_contains_cwd, nearest_existing
from gptkit.model.gpt import GPT

logger = logging.getLogger(__name__)

HF_CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"

_GPT2_NEEDS = "position=learned, norm=layernorm, mlp=gelu, bias=true, n_kv_head=n_head, qk_norm=false"
_LLAMA_NEEDS = "position=rope, norm=rmsnorm, mlp=swiglu, bias=false, qk_norm=false"
# HF activations that compute GELU's tanh approximation, which is what gptkit's GELU MLP uses.
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise GptkitError("converting to or from Hugging Face needs transformers: pip install 'gptkit[hf]'") from None
    return transformers


@contextlib.contextmanager
def _quiet_transformers() -> Any:
    """Silence transformers' warnings (its multi-line load report, config checks) and progress bars
    for a moment: gptkit reports what matters itself, in one line, and the CLI's stderr carries
    nothing else."""
    hf_logging = _transformers().utils.logging
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


# --------------------------------------------------------------------------------------------
# Which family a gptkit config belongs to
# --------------------------------------------------------------------------------------------


def _export_family(config: ModelConfig) -> str:
    """"gpt2" or "llama"; otherwise a one-line ConfigError naming the field that prevents export."""
    if config.qk_norm:
        raise ConfigError(
            "model.qk_norm=true cannot be exported to Hugging Face: "
            f"GPT-2 export needs {_GPT2_NEEDS}; Llama export needs {_LLAMA_NEEDS}"
        )
    if config.position == "learned":
        family, needs = "GPT-2", _GPT2_NEEDS
        wanted: list[tuple[str, Any, Any]] = [
            ("norm", config.norm, "layernorm"),
            ("mlp", config.mlp, "gelu"),
            ("bias", config.bias, True),
            ("n_kv_head", config.kv_heads, config.n_head),
        ]
    else:
        family, needs = "Llama", _LLAMA_NEEDS
        wanted = [
            ("norm", config.norm, "rmsnorm"),
            ("mlp", config.mlp, "swiglu"),
            ("bias", config.bias, False),
        ]
    for name, value, allowed in wanted:
        if value != allowed:
            shown = "true" if value is True else "false" if value is False else value
            raise ConfigError(
                f"model.{name}={shown} cannot be exported to Hugging Face {family} "
                f"(model.position={config.position}); {family} export needs {needs}"
            )
    return "gpt2" if family == "GPT-2" else "llama"


# --------------------------------------------------------------------------------------------
# gptkit -> Hugging Face
# --------------------------------------------------------------------------------------------


def _gpt2_config(config: ModelConfig) -> Any:
    transformers = _transformers()
    return transformers.GPT2Config(
        vocab_size=config.vocab_size,
        n_positions=config.block_size,
        n_embd=config.d_model,
        n_layer=config.n_layer,
        n_head=config.n_head,
        n_inner=config.d_ff,
        activation_function="gelu_new",
        resid_pdrop=config.dropout,
        embd_pdrop=config.dropout,
        attn_pdrop=config.dropout,
        layer_norm_epsilon=config.norm_eps,
        initializer_range=config.init_std,
        tie_word_embeddings=config.tie_embeddings,
        bos_token_id=None,
        eos_token_id=None,
    )


def _llama_config(config: ModelConfig) -> Any:
    transformers = _transformers()
    return transformers.LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        intermediate_size=config.mlp_hidden,
        num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head,
        num_key_value_heads=config.kv_heads,
        head_dim=config.head_dim,
        hidden_act="silu",
        max_position_embeddings=config.block_size,
        initializer_range=config.init_std,
        rms_norm_eps=config.norm_eps,
        tie_word_embeddings=config.tie_embeddings,
        # transformers >= 5 reads rope_parameters; 4.x reads rope_theta (5.x folds it into rope_parameters).
        rope_theta=config.rope_base,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_base},
        attention_bias=False,
        mlp_bias=False,
        attention_dropout=config.dropout,
        bos_token_id=None,
        eos_token_id=None,
    )


def _gpt2_state_from_gptkit(model: GPT) -> dict[str, torch.Tensor]:
    s = model.state_dict()
    out = {
        "transformer.wte.weight": s["token_embedding.weight"],
        "transformer.wpe.weight": s["position_embedding.weight"],
        "transformer.ln_f.weight": s["final_norm.weight"],
        "transformer.ln_f.bias": s["final_norm.bias"],
        "lm_head.weight": s["lm_head.weight"],
    }
    for i in range(model.config.n_layer):
        g, h = f"blocks.{i}.", f"transformer.h.{i}."
        out[h + "ln_1.weight"] = s[g + "attn_norm.weight"]
        out[h + "ln_1.bias"] = s[g + "attn_norm.bias"]
        out[h + "ln_2.weight"] = s[g + "mlp_norm.weight"]
        out[h + "ln_2.bias"] = s[g + "mlp_norm.bias"]
        # Conv1D weights are (in, out): the transpose of nn.Linear's (out, in).
        out[h + "attn.c_attn.weight"] = s[g + "attn.qkv.weight"].t()
        out[h + "attn.c_attn.bias"] = s[g + "attn.qkv.bias"]
        out[h + "attn.c_proj.weight"] = s[g + "attn.out.weight"].t()
        out[h + "attn.c_proj.bias"] = s[g + "attn.out.bias"]
        out[h + "mlp.c_fc.weight"] = s[g + "mlp.up.weight"].t()
        out[h + "mlp.c_fc.bias"] = s[g + "mlp.up.bias"]
        out[h + "mlp.c_proj.weight"] = s[g + "mlp.down.weight"].t()
        out[h + "mlp.c_proj.bias"] = s[g + "mlp.down.bias"]
    return out


def _llama_state_from_gptkit(model: GPT) -> dict[str, torch.Tensor]:
    c = model.config
    s = model.state_dict()
    q_rows, kv_rows = c.n_head * c.head_dim, c.kv_heads * c.head_dim
    out = {
        "model.embed_tokens.weight": s["token_embedding.weight"],
        "model.norm.weight": s["final_norm.weight"],
        "lm_head.weight": s["lm_head.weight"],
    }
    for i in range(c.n_layer):
        g, h = f"blocks.{i}.", f"model.layers.{i}."
        out[h + "input_layernorm.weight"] = s[g + "attn_norm.weight"]
        out[h + "post_attention_layernorm.weight"] = s[g + "mlp_norm.weight"]
        q, k, v = s[g + "attn.qkv.weight"].split([q_rows, kv_rows, kv_rows], dim=0)
        out[h + "self_attn.q_proj.weight"] = q
        out[h + "self_attn.k_proj.weight"] = k
        out[h + "self_attn.v_proj.weight"] = v
        out[h + "self_attn.o_proj.weight"] = s[g + "attn.out.weight"]
        gate, up = s[g + "mlp.up.weight"].chunk(2, dim=0)
        out[h + "mlp.gate_proj.weight"] = gate
        out[h + "mlp.up_proj.weight"] = up
        out[h + "mlp.down_proj.weight"] = s[g + "mlp.down.weight"]
    return out


def _load_exactly(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """load_state_dict that tolerates only missing buffers (e.g. old GPT-2's causal-mask buffers)."""
    missing, unexpected = module.load_state_dict(state, strict=False)
    params = {name for name, _ in module.named_parameters(remove_duplicate=False)}
    missing_params = [name for name in missing if name in params]
    if missing_params or unexpected:
        raise RuntimeError(f"{what}: weight mapping is incomplete; missing {missing_params}, unexpected {unexpected}")


def to_hf(model: GPT) -> Any:
    """A ``transformers`` model computing the same function as ``model`` (eval mode, same device and dtype).

    GPT-2-style configs give a ``GPT2LMHeadModel``, Llama-style ones a ``LlamaForCausalLM``; any
    other combination raises a ConfigError naming the field that prevents export.
    """
    config = model.config
    family = _export_family(config)
    transformers = _transformers()
    if family == "gpt2":
        hf = transformers.GPT2LMHeadModel(_gpt2_config(config))
        state = _gpt2_state_from_gptkit(model)
    else:
        hf = transformers.LlamaForCausalLM(_llama_config(config))
        state = _llama_state_from_gptkit(model)
    weight = model.token_embedding.weight
    hf = hf.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        _load_exactly(hf, {k: v.detach() for k, v in state.items()}, f"to_hf ({family})")
    return hf.eval()


# --------------------------------------------------------------------------------------------
# Hugging Face -> gptkit
# --------------------------------------------------------------------------------------------


def _get(hf_config: Any, name: str, default: Any = None) -> Any:
    return getattr(hf_config, name, default)


def _unsupported(model_type: str, what: str) -> ConfigError:
    return ConfigError(f"cannot convert Hugging Face {model_type} model: {what}")


def _check_model_type(model_type: Any) -> str:
    if model_type not in ("gpt2", "llama"):
        raise ConfigError(
            f"unsupported Hugging Face model_type {model_type!r}; gptkit converts 'gpt2' (GPT2LMHeadModel) "
            "and 'llama' (LlamaForCausalLM)"
        )
    return model_type


def _model_config(model_type: str, hf_config: Any) -> ModelConfig:
    """The gptkit config of a GPT-2 or Llama ``hf_config``; a one-line ConfigError names what it cannot hold."""
    quantization = _get(hf_config, "quantization_config")
    if quantization:
        # Quantized weights (int8/int4 with scales) are not the float matrices the mapping expects.
        if isinstance(quantization, dict):
            method = quantization.get("quant_method")
        else:
            method = _get(quantization, "quant_method")
        raise _unsupported(
            model_type, f"quantized weights (quantization_config, quant_method={method!r}) are not supported"
        )
    return _gpt2_model_config(hf_config) if model_type == "gpt2" else _llama_model_config(hf_config)


def _hf_model_config(family: str, **fields: Any) -> ModelConfig:
    """ModelConfig(**fields), whose refusal says that the values come from a Hugging Face config."""
    try:
        return ModelConfig(**fields)
    except ConfigError as exc:
        raise _unsupported(family, str(exc)) from None


def _gpt2_model_config(hf_config: Any) -> ModelConfig:
    act = _get(hf_config, "activation_function", "gelu_new")
    if act not in _TANH_GELUS:
        raise _unsupported("gpt2", f"activation_function={act!r}; supported: {', '.join(_TANH_GELUS)}")
    if _get(hf_config, "add_cross_attention", False):
        raise _unsupported("gpt2", "add_cross_attention=true is not supported")
    if not _get(hf_config, "scale_attn_weights", True):
        raise _unsupported("gpt2", "scale_attn_weights=false is not supported")
    if _get(hf_config, "scale_attn_by_inverse_layer_idx", False):
        raise _unsupported("gpt2", "scale_attn_by_inverse_layer_idx=true is not supported")
    n_inner = _get(hf_config, "n_inner")
    return _hf_model_config(
        "gpt2",
        vocab_size=hf_config.vocab_size,
        block_size=hf_config.n_positions,
        n_layer=hf_config.n_layer,
        n_head=hf_config.n_head,
        n_kv_head=None,
        d_model=hf_config.n_embd,
        d_ff=n_inner if n_inner else None,
        dropout=float(_get(hf_config, "resid_pdrop", 0.0) or 0.0),
        bias=True,
        tie_embeddings=bool(_get(hf_config, "tie_word_embeddings", True)),
        position="learned",
        norm="layernorm",
        norm_eps=float(hf_config.layer_norm_epsilon),
        mlp="gelu",
        qk_norm=False,
        init_std=float(_get(hf_config, "initializer_range", 0.02)),
    )


def _llama_rope_theta(hf_config: Any) -> float:
    params = _get(hf_config, "rope_parameters")
    scaling = _get(hf_config, "rope_scaling") if params is None else None
    if isinstance(params, dict) and params:
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type != "default":
            raise _unsupported("llama", f"rope_parameters rope_type={rope_type!r}; only 'default' RoPE is supported")
        if params.get("partial_rotary_factor", 1.0) != 1.0:
            raise _unsupported("llama", "partial_rotary_factor != 1 is not supported")
        return float(params.get("rope_theta", _get(hf_config, "rope_theta", 10000.0)))
    if scaling:
        raise _unsupported("llama", f"rope_scaling={scaling!r}; only unscaled RoPE is supported")
    return float(_get(hf_config, "rope_theta", 10000.0) or 10000.0)


def _llama_model_config(hf_config: Any) -> ModelConfig:
    if _get(hf_config, "attention_bias", False):
        raise _unsupported("llama", "attention_bias=true is not supported (gptkit's Llama style has no biases)")
    if _get(hf_config, "mlp_bias", False):
        raise _unsupported("llama", "mlp_bias=true is not supported (gptkit's Llama style has no biases)")
    act = _get(hf_config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise _unsupported("llama", f"hidden_act={act!r}; only 'silu' is supported")
    head_dim = _get(hf_config, "head_dim") or hf_config.hidden_size // hf_config.num_attention_heads
    if head_dim * hf_config.num_attention_heads != hf_config.hidden_size:
        raise _unsupported(
            "llama",
            f"head_dim={head_dim} with {hf_config.num_attention_heads} heads does not equal "
            f"hidden_size={hf_config.hidden_size}",
        )
    rope_base = _llama_rope_theta(hf_config)
    n_kv = _get(hf_config, "num_key_value_heads") or hf_config.num_attention_heads
    # Keep d_ff unset when it equals gptkit's SwiGLU default, so that the config reads like a hand-written one.
    default_hidden = ModelConfig(
        d_model=hf_config.hidden_size, n_head=hf_config.num_attention_heads, mlp="swiglu"
    ).mlp_hidden
    return _hf_model_config(
        "llama",
        vocab_size=hf_config.vocab_size,
        block_size=hf_config.max_position_embeddings,
        n_layer=hf_config.num_hidden_layers,
        n_head=hf_config.num_attention_heads,
        n_kv_head=None if n_kv == hf_config.num_attention_heads else n_kv,
        d_model=hf_config.hidden_size,
        d_ff=None if hf_config.intermediate_size == default_hidden else hf_config.intermediate_size,
        dropout=float(_get(hf_config, "attention_dropout", 0.0) or 0.0),
        bias=False,
        tie_embeddings=bool(_get(hf_config, "tie_word_embeddings", False)),
        position="rope",
        rope_base=rope_base,
        norm="rmsnorm",
        norm_eps=float(hf_config.rms_norm_eps),
        mlp="swiglu",
        qk_norm=False,
        init_std=float(_get(hf_config, "initializer_range", 0.02)),
    )


def _gptkit_state_from_gpt2(config: ModelConfig, s: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {
        "token_embedding.weight": s["transformer.wte.weight"],
        "position_embedding.weight": s["transformer.wpe.weight"],
        "final_norm.weight": s["transformer.ln_f.weight"],
        "final_norm.bias": s["transformer.ln_f.bias"],
        "lm_head.weight": s["transformer.wte.weight"] if config.tie_embeddings else s["lm_head.weight"],
    }
    for i in range(config.n_layer):
        g, h = f"blocks.{i}.", f"transformer.h.{i}."
        out[g + "attn_norm.weight"] = s[h + "ln_1.weight"]
        out[g + "attn_norm.bias"] = s[h + "ln_1.bias"]
        out[g + "mlp_norm.weight"] = s[h + "ln_2.weight"]
        out[g + "mlp_norm.bias"] = s[h + "ln_2.bias"]
        out[g + "attn.qkv.weight"] = s[h + "attn.c_attn.weight"].t()
        out[g + "attn.qkv.bias"] = s[h + "attn.c_attn.bias"]
        out[g + "attn.out.weight"] = s[h + "attn.c_proj.weight"].t()
        out[g + "attn.out.bias"] = s[h + "attn.c_proj.bias"]
        out[g + "mlp.up.weight"] = s[h + "mlp.c_fc.weight"].t()
        out[g + "mlp.up.bias"] = s[h + "mlp.c_fc.bias"]
        out[g + "mlp.down.weight"] = s[h + "mlp.c_proj.weight"].t()
        out[g + "mlp.down.bias"] = s[h + "mlp.c_proj.bias"]
    return out


def _gptkit_state_from_llama(config: ModelConfig, s: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {
        "token_embedding.weight": s["model.embed_tokens.weight"],
        "final_norm.weight": s["model.norm.weight"],
        "lm_head.weight": s["model.embed_tokens.weight"] if config.tie_embeddings else s["lm_head.weight"],
    }
    for i in range(config.n_layer):
        g, h = f"blocks.{i}.", f"model.layers.{i}."
        out[g + "attn_norm.weight"] = s[h + "input_layernorm.weight"]
        out[g + "mlp_norm.weight"] = s[h + "post_attention_layernorm.weight"]
        out[g + "attn.qkv.weight"] = torch.cat(
            [s[h + "self_attn.q_proj.weight"], s[h + "self_attn.k_proj.weight"], s[h + "self_attn.v_proj.weight"]],
            dim=0,
        )
        out[g + "attn.out.weight"] = s[h + "self_attn.o_proj.weight"]
        out[g + "mlp.up.weight"] = torch.cat([s[h + "mlp.gate_proj.weight"], s[h + "mlp.up_proj.weight"]], dim=0)
        out[g + "mlp.down.weight"] = s[h + "mlp.down_proj.weight"]
    return out


def from_hf(hf_model: Any) -> GPT:
    """A gptkit GPT (fp32, CPU, eval mode) with the weights of a ``GPT2LMHeadModel`` or ``LlamaForCausalLM``."""
    hf_config = getattr(hf_model, "config", None)
    model_type = _check_model_type(getattr(hf_config, "model_type", None))
    if not hasattr(hf_model, "lm_head"):
        raise ConfigError(
            f"cannot convert {type(hf_model).__name__}: gptkit converts causal language models "
            "(GPT2LMHeadModel, LlamaForCausalLM), which have an lm_head"
        )
    config = _model_config(model_type, hf_config)
    state = {k: v.detach().to(device="cpu", dtype=torch.float32) for k, v in hf_model.state_dict().items()}
    try:
        if model_type == "gpt2":
            mapped = _gptkit_state_from_gpt2(config, state)
        else:
            mapped = _gptkit_state_from_llama(config, state)
    except KeyError as exc:
        raise ConfigError(f"cannot convert Hugging Face {model_type} model: weight {exc.args[0]} is missing") from None
    model = GPT(config)
    with torch.no_grad():
        model.load_state_dict(mapped, strict=True)
    return model.eval()


# --------------------------------------------------------------------------------------------
# Directories
# --------------------------------------------------------------------------------------------


# What gptkit and Hugging Face write into a model directory: an existing directory holding only these
# (and no folders) may be replaced whole; anything else might be the user's work.
MODEL_FILE_PATTERNS = (
    "config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
)


def foreign_entries(directory: Path) -> list[str]:
    """The names in ``directory`` that are not model files (folders included), sorted."""
    return sorted(
        e.name for e in directory.iterdir()
        if e.is_dir() or not any(fnmatch.fnmatch(e.name, p) for p in MODEL_FILE_PATTERNS)
    )


def check_replaceable_model_directory(out: Path, *, replace: bool = True) -> None:
    """ConfigError unless ``out`` is new, empty, or an earlier model directory (what save_hf may
    replace whole): a folder of other files, or the current directory, would be deleted with it.
    With ``replace=False`` (``gptkit convert`` without --force) an earlier model directory is
    refused too."""
    if is_or_contains_cwd(out):
        raise ConfigError(f"destination {out} is or contains the current directory; choose another directory")
    nearest = nearest_existing(out)
    if nearest is not None and not nearest.is_dir():
        if nearest == out:
            raise ConfigError(f"destination {out} exists and is not a directory")
        raise ConfigError(f"destination {out} lies inside {nearest}, which is a file; choose a directory")
    if nearest != out:
        return  # a new directory
    if not any(out.iterdir()):
        return  # an empty folder, e.g. made by the user for the output
    if not replace:
        raise ConfigError(f"destination {out} exists; pass --force to replace it")
    foreign = foreign_entries(out)
    if foreign:
        raise ConfigError(
            f"destination {out} holds more than a model ({', '.join(foreign[:3])}"
            f"{', ...' if len(foreign) > 3 else ''}); replacing it would delete them, so choose another directory"
        )


def save_hf(
    model: GPT,
    out_dir: str | os.PathLike[str],
    tokenizer_json_path: str | os.PathLike[str] | None = None,
    *,
    eot_id: int | None = None,
    tokenizer_files: Mapping[str, str] | None = None,
) -> Path:
    """Write ``model`` as a Hugging Face model directory (config.json + model.safetensors), atomically.

    With ``tokenizer_json_path`` the tokenizer file is copied in as tokenizer.json; or
    ``tokenizer_files`` (file name -> text) are written, e.g. a character tokenizer in Hugging Face
    format with its tokenizer_config.json (``gptkit convert`` does that). ``eot_id`` (the
    tokenizer's ``<|endoftext|>``) becomes the BOS and EOS token id, as in GPT-2's own config, so
    that ``generate`` in transformers stops at the end of a document. Returns the directory.
    """
    out = Path(out_dir)
    if tokenizer_json_path is not None and not Path(tokenizer_json_path).is_file():
        raise CheckpointError(f"tokenizer file not found: {tokenizer_json_path}")
    check_replaceable_model_directory(out)
    hf = to_hf(model)  # raises ConfigError before anything is written
    if eot_id is not None:
        if not 0 <= eot_id < model.config.vocab_size:
            raise ConfigError(f"eot_id {eot_id} is not a token of the model (vocabulary {model.config.vocab_size})")
        for config in (hf.config, hf.generation_config):
            config.bos_token_id = config.eos_token_id = eot_id
    with atomic_directory(out) as tmp, _quiet_transformers():
        hf.save_pretrained(str(tmp), safe_serialization=True)
        if tokenizer_json_path is not None:
            shutil.copyfile(tokenizer_json_path, tmp / TOKENIZER_FILE)
        for name, text in (tokenizer_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
    return out


def _read_hf_config(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise CheckpointError(f"Hugging Face model directory not found: {path}")
    if not path.is_dir():
        raise CheckpointError(f"not a Hugging Face model directory (expected a folder with {HF_CONFIG_FILE}): {path}")
    config_path = path / HF_CONFIG_FILE
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"Hugging Face model directory {path} has no {HF_CONFIG_FILE}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"corrupt Hugging Face config {config_path}: {exc}".replace("\n", " ")) from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise CheckpointError(f"{config_path} is not a Hugging Face model config (no \"model_type\")")
    return config


def is_hf_directory(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a folder whose config.json has a "model_type" key."""
    try:
        _read_hf_config(Path(path))
    except CheckpointError:
        return False
    return True


def load_hf(path: str | os.PathLike[str]) -> GPT:
    """Load a local Hugging Face GPT-2 or Llama directory as a gptkit GPT (fp32, CPU, eval mode)."""
    directory = Path(path)
    model_type = _check_model_type(_read_hf_config(directory)["model_type"])
    transformers = _transformers()
    cls = transformers.GPT2LMHeadModel if model_type == "gpt2" else transformers.LlamaForCausalLM
    # The config is read and checked before the weights: an option gptkit cannot represent (or a
    # quantized model) is refused at once, not after every weight of a model that may be many GB
    # has been read in fp32.
    try:
        with _quiet_transformers():
            hf_config = cls.config_class.from_pretrained(str(directory), local_files_only=True)
    except Exception as exc:  # transformers validates field types with errors of its own (not ValueError)
        # Its message is "Validation error for field 'x':" and the reason on the next line: keep both.
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise CheckpointError(f"invalid Hugging Face config in {directory}: {detail}") from None
    _model_config(model_type, hf_config)
    major = int(transformers.__version__.split(".")[0])
    dtype_kw = {"dtype": torch.float32} if major >= 5 else {"torch_dtype": torch.float32}
    try:
        # ignore_mismatched_sizes: a tensor of the wrong shape is then reported in ``info`` (and
        # named below) instead of raising an error that points at a report printed elsewhere.
        with _quiet_transformers():
            hf, info = cls.from_pretrained(
                str(directory), config=hf_config, local_files_only=True, output_loading_info=True,
                ignore_mismatched_sizes=True, **dtype_kw,
            )
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError, pickle.UnpicklingError, EOFError,
            TypeError, AttributeError) as exc:
        # pickle.UnpicklingError, EOFError: torch.load on a damaged or empty pytorch_model.bin (a pickle),
        # or one holding objects that weights_only loading refuses; TypeError, AttributeError: a pickle
        # that loads but holds something other than a dict of tensors (a list, a string).
        raise CheckpointError(f"cannot load Hugging Face model from {directory}: {first_line(exc)}") from None
    mismatched = sorted(info.get("mismatched_keys") or [])
    missing = sorted(info.get("missing_keys") or [])
    if mismatched:  # first: a config that does not describe the weights usually leaves some missing too
        name, saved, wanted = mismatched[0]
        raise CheckpointError(
            f"Hugging Face model in {directory} does not match its config: tensor {name} has shape "
            f"{tuple(saved)}, the config needs {tuple(wanted)}"
        )
    if missing:
        raise CheckpointError(f"incomplete Hugging Face model in {directory}: missing weights {missing[:3]}")
    unexpected = sorted(info.get("unexpected_keys") or [])
    if unexpected:  # ignored, as transformers does (its own report is silenced above)
        more = f" and {len(unexpected) - 3} more" if len(unexpected) > 3 else ""
        logger.warning(
            "%s: ignoring weights the config has no place for: %s%s", directory, ", ".join(unexpected[:3]), more
        )
    return from_hf(hf)
