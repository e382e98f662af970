"""Hugging Face conversion: GPT-2 and Llama, both directions, logits parity at fp32."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from gptkit.config import ModelConfig  # noqa: E402
from gptkit.errors import CheckpointError, ConfigError  # noqa: E402
from gptkit.model.gpt import GPT  # noqa: E402
from gptkit.model.hf import from_hf, is_hf_directory, load_hf, save_hf, to_hf  # noqa: E402

TOL = 1e-4

GPT2_SHAPES = [
    dict(n_layer=2, n_head=4, d_model=64, vocab_size=97, block_size=32),
    dict(n_layer=3, n_head=2, d_model=48, vocab_size=61, block_size=40, d_ff=80, tie_embeddings=False, norm_eps=1e-6),
]
LLAMA_STYLE = dict(position="rope", norm="rmsnorm", mlp="swiglu", bias=False)
LLAMA_SHAPES = [
    dict(n_layer=2, n_head=4, n_kv_head=2, d_model=64, vocab_size=89, block_size=32, tie_embeddings=True),
    dict(
        n_layer=3, n_head=4, d_model=48, vocab_size=71, block_size=24, d_ff=96,
        tie_embeddings=False, rope_base=500.0, norm_eps=1e-6,
    ),
]
CASES = [("gpt2", i, s) for i, s in enumerate(GPT2_SHAPES)] + [
    ("llama", i, {**LLAMA_STYLE, **s}) for i, s in enumerate(LLAMA_SHAPES)
]
IDS = [f"{family}-{i}" for family, i, _ in CASES]


def _perturb(module: torch.nn.Module, scale: float = 0.05) -> None:
    """Move every parameter off its initial value: norms away from 1/0, biases away from 0."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * scale)


def _gptkit_model(shape: dict) -> GPT:
    model = GPT(ModelConfig(**shape))
    _perturb(model)
    return model.eval()


def _hf_config(family: str, shape: dict):
    """A transformers config written independently of gptkit.model.hf's mapping."""
    c = ModelConfig(**shape)
    if family == "gpt2":
        return transformers.GPT2Config(
            vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.d_model, n_layer=c.n_layer,
            n_head=c.n_head, n_inner=c.d_ff, layer_norm_epsilon=c.norm_eps,
            tie_word_embeddings=c.tie_embeddings, attn_implementation="eager",
        )
    return transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.mlp_hidden,
        num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.kv_heads,
        max_position_embeddings=c.block_size, rms_norm_eps=c.norm_eps, tie_word_embeddings=c.tie_embeddings,
        rope_theta=c.rope_base, rope_parameters={"rope_type": "default", "rope_theta": c.rope_base},
        attn_implementation="eager",
    )


def _hf_model(family: str, shape: dict):
    cls = transformers.GPT2LMHeadModel if family == "gpt2" else transformers.LlamaForCausalLM
    model = cls(_hf_config(family, shape))
    _perturb(model)
    return model.eval()


def _tokens(shape: dict) -> torch.Tensor:
    return torch.randint(0, shape["vocab_size"], (2, shape["block_size"]))


def _max_diff(gptkit_model: GPT, hf_model, tokens: torch.Tensor) -> float:
    with torch.no_grad():
        ours = gptkit_model(tokens)
        theirs = hf_model(input_ids=tokens).logits
    assert ours.shape == theirs.shape
    return (ours - theirs).abs().max().item()


def _hf_param_count(hf_model) -> int:
    return sum(p.numel() for p in hf_model.parameters())  # parameters() counts a tied head once


@pytest.mark.parametrize(("family", "index", "shape"), CASES, ids=IDS)
def test_export_matches_hf(family: str, index: int, shape: dict) -> None:
    torch.manual_seed(100 + index)
    model = _gptkit_model(shape)
    hf = to_hf(model)
    expected = transformers.GPT2LMHeadModel if family == "gpt2" else transformers.LlamaForCausalLM
    assert isinstance(hf, expected)
    assert not hf.training
    assert _max_diff(model, hf, _tokens(shape)) < TOL
    assert _hf_param_count(hf) == model.num_parameters()
    # And back again: the round trip is exact.
    back = from_hf(hf)
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


@pytest.mark.parametrize(("family", "index", "shape"), CASES, ids=IDS)
def test_import_matches_hf(family: str, index: int, shape: dict) -> None:
    torch.manual_seed(200 + index)
    hf = _hf_model(family, shape)
    model = from_hf(hf)
    assert isinstance(model, GPT) and not model.training
    assert model.config == ModelConfig(**{**shape, "init_std": model.config.init_std, "dropout": model.config.dropout})
    assert _max_diff(model, hf, _tokens(shape)) < TOL
    assert model.num_parameters() == _hf_param_count(hf)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_save_hf_loads_with_from_pretrained(family: str, tmp_path) -> None:
    torch.manual_seed(300)
    shape = GPT2_SHAPES[0] if family == "gpt2" else {**LLAMA_STYLE, **LLAMA_SHAPES[0]}
    model = _gptkit_model(shape)
    tokenizer = tmp_path / "tok.json"
    tokenizer.write_text('{"version": "1.0"}', encoding="utf-8")
    out = tmp_path / "hf"
    save_hf(model, out, tokenizer_json_path=tokenizer)
    assert is_hf_directory(out)
    assert (out / "tokenizer.json").read_text(encoding="utf-8") == '{"version": "1.0"}'
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers
    cls = transformers.GPT2LMHeadModel if family == "gpt2" else transformers.LlamaForCausalLM
    hf, info = cls.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert _max_diff(model, hf.float().eval(), _tokens(shape)) < TOL
    # Saving again replaces the directory as a whole.
    save_hf(model, out)
    assert not (out / "tokenizer.json").exists()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_load_hf_reads_save_pretrained(family: str, tmp_path) -> None:
    torch.manual_seed(400)
    shape = GPT2_SHAPES[1] if family == "gpt2" else {**LLAMA_STYLE, **LLAMA_SHAPES[1]}
    hf = _hf_model(family, shape)
    hf.save_pretrained(tmp_path / "hf")
    model = load_hf(tmp_path / "hf")
    assert isinstance(model, GPT) and not model.training
    assert _max_diff(model, hf, _tokens(shape)) < TOL
    assert model.num_parameters() == _hf_param_count(hf)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(qk_norm=True), "model.qk_norm"),
        (dict(bias=False), "model.bias"),
        (dict(n_kv_head=2), "model.n_kv_head"),
        (dict(mlp="swiglu"), "model.mlp"),
        (dict(position="rope"), "model.norm"),  # rope + layernorm: neither GPT-2 nor Llama
        (dict(**LLAMA_STYLE, qk_norm=True), "model.qk_norm"),
        (dict(**{**LLAMA_STYLE, "bias": True}), "model.bias"),
    ],
)
def test_export_rejects_other_architectures(overrides: dict, field: str) -> None:
    model = GPT(ModelConfig(**{**GPT2_SHAPES[0], **overrides}))
    with pytest.raises(ConfigError) as info:
        to_hf(model)
    message = str(info.value)
    assert field in message and "\n" not in message


def test_save_hf_rejects_before_writing(tmp_path) -> None:
    model = GPT(ModelConfig(**GPT2_SHAPES[0], qk_norm=True))
    with pytest.raises(ConfigError):
        save_hf(model, tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []


def test_save_hf_never_replaces_a_folder_that_holds_more_than_a_model(tmp_path, monkeypatch) -> None:
    # save_hf replaces its destination whole: a folder of the user's files must be refused, not deleted.
    model = GPT(ModelConfig(**GPT2_SHAPES[0]))
    precious = tmp_path / "work"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    with pytest.raises(ConfigError, match=r"holds more than a model \(thesis.tex\)"):
        save_hf(model, precious)
    assert [p.name for p in precious.iterdir()] == ["thesis.tex"]
    monkeypatch.chdir(precious)
    with pytest.raises(ConfigError, match="is or contains the current directory"):
        save_hf(model, ".")
    assert [p.name for p in precious.iterdir()] == ["thesis.tex"]
    (precious / "thesis.tex").unlink()
    (precious / "notes.txt").write_text("a file")
    with pytest.raises(ConfigError, match=r"lies inside .*notes.txt, which is a file"):
        save_hf(model, precious / "notes.txt" / "hf")
    (precious / "notes.txt").unlink()
    save_hf(model, precious / "hf")  # new, then an earlier export: both fine
    save_hf(model, precious / "hf")
    assert is_hf_directory(precious / "hf")


def test_from_hf_rejects_unsupported_options() -> None:
    torch.manual_seed(500)
    shape = {**LLAMA_STYLE, **LLAMA_SHAPES[0]}
    config = _hf_config("llama", shape)
    config.attention_bias = True
    with pytest.raises(ConfigError, match="attention_bias"):
        from_hf(transformers.LlamaForCausalLM(config))

    hf = _hf_model("llama", shape)
    if getattr(hf.config, "rope_parameters", None) is not None:
        hf.config.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    else:  # transformers 4.x
        hf.config.rope_scaling = {"rope_type": "linear", "factor": 2.0}
    with pytest.raises(ConfigError, match="rope") as info:
        from_hf(hf)
    assert "\n" not in str(info.value)

    hf = _hf_model("gpt2", GPT2_SHAPES[0])
    hf.config.model_type = "gpt_neox"
    with pytest.raises(ConfigError, match="model_type"):
        from_hf(hf)


def test_load_hf_missing_or_corrupt_directory(tmp_path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(CheckpointError) as info:
        load_hf(missing)
    assert str(missing) in str(info.value) and "\n" not in str(info.value)
    assert not is_hf_directory(missing)

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(CheckpointError) as info:
        load_hf(corrupt)
    assert str(corrupt) in str(info.value) and "\n" not in str(info.value)
    assert not is_hf_directory(corrupt)

    # A config without weights.
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(
        json.dumps(_hf_config("gpt2", GPT2_SHAPES[0]).to_dict()), encoding="utf-8"
    )
    assert is_hf_directory(no_weights)
    with pytest.raises(CheckpointError) as info:
        load_hf(no_weights)
    assert str(no_weights) in str(info.value) and "\n" not in str(info.value)

    # Weights that are not a safetensors file.
    garbage = tmp_path / "garbage"
    save_hf(GPT(ModelConfig(**GPT2_SHAPES[0])), garbage)
    (garbage / "model.safetensors").write_bytes(b"not a safetensors file" * 4)
    with pytest.raises(CheckpointError) as info:
        load_hf(garbage)
    assert str(garbage) in str(info.value) and "\n" not in str(info.value)

    # gptkit's own checkpoint config has no "model_type".
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / "config.json").write_text('{"format": "gptkit-checkpoint", "version": 1}', encoding="utf-8")
    assert not is_hf_directory(ours)


def _saved_hf_dir(tmp_path, family: str = "gpt2", name: str = "hf"):
    torch.manual_seed(600)
    shape = GPT2_SHAPES[0] if family == "gpt2" else {**LLAMA_STYLE, **LLAMA_SHAPES[0]}
    directory = tmp_path / name
    _hf_model(family, shape).save_pretrained(directory)
    return directory


def _edit_config(directory, **fields) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config.update(fields)
    path.write_text(json.dumps(config), encoding="utf-8")


def test_load_hf_refuses_unsupported_options_before_reading_weights(tmp_path) -> None:
    """An option gptkit cannot represent is a ConfigError naming it, decided from config.json alone:
    a large model is not read (in fp32) first, and its weights need not even be loadable."""
    directory = _saved_hf_dir(tmp_path)
    (directory / "model.safetensors").write_bytes(b"not a safetensors file" * 4)
    for fields, name in [
        ({"activation_function": "relu"}, "activation_function"),
        ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ]:
        supported = {"activation_function": "gelu_new", "scale_attn_by_inverse_layer_idx": False}
        _edit_config(directory, **{**supported, **fields})
        with pytest.raises(ConfigError, match=name) as info:
            load_hf(directory)
        assert "\n" not in str(info.value)


def test_load_hf_refuses_quantized_models(tmp_path) -> None:
    directory = _saved_hf_dir(tmp_path, "llama")
    _edit_config(directory, quantization_config={"quant_method": "gptq", "bits": 4, "group_size": 128})
    with pytest.raises(ConfigError, match="quantiz.*gptq") as info:
        load_hf(directory)
    assert "\n" not in str(info.value)
    hf = _hf_model("gpt2", GPT2_SHAPES[0])  # and a model in memory (from_hf)
    hf.config.quantization_config = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    with pytest.raises(ConfigError, match="quantiz.*bitsandbytes"):
        from_hf(hf)


def test_load_hf_config_values_of_the_wrong_type(tmp_path) -> None:
    directory = _saved_hf_dir(tmp_path)
    _edit_config(directory, vocab_size=None)
    # transformers >= 5 validates field types itself (CheckpointError); 4.x leaves it to gptkit (ConfigError).
    with pytest.raises((CheckpointError, ConfigError), match="vocab_size") as info:
        load_hf(directory)
    assert "\n" not in str(info.value)
    # A value of the right type that gptkit refuses says that it comes from a Hugging Face config.
    _edit_config(directory, vocab_size=GPT2_SHAPES[0]["vocab_size"], n_layer=0)
    with pytest.raises(ConfigError, match=r"^cannot convert Hugging Face gpt2 model: model.n_layer"):
        load_hf(directory)


def test_load_hf_damaged_pytorch_model_bin(tmp_path) -> None:
    """Older saves hold pytorch_model.bin (a pickle): a damaged or empty one is a CheckpointError."""
    directory = _saved_hf_dir(tmp_path)
    (directory / "model.safetensors").unlink()
    for content in (b"", b"not a pickle" * 8):
        (directory / "pytorch_model.bin").write_bytes(content)
        with pytest.raises(CheckpointError) as info:
            load_hf(directory)
        assert str(directory) in str(info.value) and "\n" not in str(info.value)
    # A readable pickle that is not a dict of tensors (transformers raises TypeError or AttributeError).
    for content in ([1, 2, 3], "weights", 7):
        torch.save(content, directory / "pytorch_model.bin")
        with pytest.raises(CheckpointError, match="cannot load Hugging Face model") as info:
            load_hf(directory)
        assert str(directory) in str(info.value) and "\n" not in str(info.value)


def test_load_hf_names_a_tensor_of_the_wrong_shape(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    directory = _saved_hf_dir(tmp_path)
    weights = load_file(directory / "model.safetensors")
    weights["transformer.h.1.ln_2.weight"] = torch.ones(GPT2_SHAPES[0]["d_model"] + 1)
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"transformer\.h\.1\.ln_2\.weight has shape \(65,\)") as info:
        load_hf(directory)
    assert "\n" not in str(info.value)


def test_load_and_save_print_nothing_of_transformers(tmp_path, capfd, caplog) -> None:
    """gptkit reports every problem itself in one line: transformers' multi-line load report,
    config warnings and progress bars would come before that line in the CLI's output."""
    from safetensors.torch import load_file, save_file

    directory = _saved_hf_dir(tmp_path)
    save_hf(load_hf(directory), tmp_path / "again")
    weights = load_file(directory / "model.safetensors")
    del weights["transformer.h.0.ln_1.bias"]
    weights["transformer.h.9.ln_1.bias"] = torch.zeros(GPT2_SHAPES[0]["d_model"])  # no such layer
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    capfd.readouterr()
    with pytest.raises(CheckpointError, match=r"missing weights \['transformer.h.0.ln_1.bias'\]"):
        load_hf(directory)
    assert capfd.readouterr().err == ""
    # Weights the config has no place for are ignored, as transformers does, with one line saying so.
    weights["transformer.h.0.ln_1.bias"] = torch.zeros(GPT2_SHAPES[0]["d_model"])
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    caplog.clear()
    load_hf(directory)
    assert capfd.readouterr().err == ""
    warnings = [r.getMessage() for r in caplog.records if r.name == "gptkit.model.hf"]
    assert len(warnings) == 1 and "transformer.h.9.ln_1.bias" in warnings[0] and "\n" not in warnings[0]
