"""The Mixture-of-Experts pieces on their own: grouped expert computation against a per-expert loop, routing,
checkpoint names (per-expert files and transformers' stacked tensors), and refusals. End-to-end exactness
against transformers is tests/models/test_vs_transformers.py (mixtral, qwen2-moe, qwen3-moe)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM, MixtralConfig

from tokenmill.models.errors import UnsupportedModelError
from tokenmill.models.mixtral import MixtralForCausalLM
from tokenmill.models.moe import MoEExperts, softmax_topk
from tokenmill.models.registry import create_model


def reference_experts(experts: MoEExperts, x, weights, expert_ids) -> torch.Tensor:
    """Token by token, slot by slot: the definition the grouped computation must equal."""
    size = experts.intermediate_size
    out = torch.zeros(x.shape, dtype=torch.float64)
    for token in range(x.shape[0]):
        for slot in range(expert_ids.shape[1]):
            e = int(expert_ids[token, slot])
            gate_up = experts.gate_up_proj[e].double() @ x[token].double()
            hidden = nn.functional.silu(gate_up[:size]) * gate_up[size:]
            out[token] += weights[token, slot].double() * (experts.down_proj[e].double() @ hidden)
    return out


def random_experts(num_experts: int, hidden: int, inter: int, seed: int) -> MoEExperts:
    torch.manual_seed(seed)
    experts = MoEExperts(num_experts, hidden, inter)
    with torch.no_grad():
        experts.gate_up_proj.normal_(std=0.2)
        experts.down_proj.normal_(std=0.2)
    return experts


@pytest.mark.parametrize("num_tokens", [1, 5, 37])
def test_grouped_experts_equal_a_per_expert_loop(num_tokens):
    experts = random_experts(num_experts=6, hidden=16, inter=24, seed=num_tokens)
    x = torch.randn(num_tokens, 16)
    # Experts 0, 2 and 5 only: the others get no token and must be skipped, not break the grouping.
    expert_ids = torch.tensor([0, 2, 5])[torch.stack([torch.randperm(3)[:2] for _ in range(num_tokens)])]
    weights = torch.rand(num_tokens, 2)
    got = experts(x, weights, expert_ids)
    assert got.shape == x.shape and got.dtype == x.dtype
    expected = reference_experts(experts, x, weights, expert_ids)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


def test_bfloat16_experts_weight_in_float32_and_return_the_model_dtype():
    experts = random_experts(num_experts=4, hidden=16, inter=8, seed=1).to(torch.bfloat16)
    x = torch.randn(9, 16).to(torch.bfloat16)
    expert_ids = torch.randint(0, 4, (9, 2))
    weights = torch.rand(9, 2)  # float32, as Mixtral's router gives them
    got = experts(x, weights, expert_ids)
    assert got.dtype == torch.bfloat16
    expected = reference_experts(experts, x, weights, expert_ids)
    torch.testing.assert_close(got.double(), expected, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("normalize", [True, False])
def test_softmax_topk(normalize):
    logits = torch.randn(7, 5).to(torch.bfloat16)
    weights, expert_ids = softmax_topk(logits, 2, normalize)
    assert weights.dtype == torch.float32 and expert_ids.shape == (7, 2)
    probs = torch.softmax(logits.float(), dim=-1)
    expected = probs.topk(2, dim=-1).values
    if normalize:
        expected = expected / expected.sum(-1, keepdim=True)
    torch.testing.assert_close(weights, expected)
    assert torch.equal(expert_ids, probs.topk(2, dim=-1).indices)


def test_load_expert_fills_one_expert_in_place():
    experts = MoEExperts(3, hidden_size=4, intermediate_size=2)
    gate, up, down = torch.randn(2, 4), torch.randn(2, 4), torch.randn(4, 2)
    for name, tensor in (("gate_proj", gate), ("up_proj", up), ("down_proj", down)):
        experts.load_expert(1, name, tensor)
    assert torch.equal(experts.gate_up_proj[1], torch.cat([gate, up]))
    assert torch.equal(experts.down_proj[1], down)
    with pytest.raises(ValueError, match="shape"):
        experts.load_expert(0, "down_proj", gate)


TINY_MIXTRAL = MixtralConfig(
    vocab_size=256,
    hidden_size=32,
    intermediate_size=16,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_local_experts=3,
    num_experts_per_tok=2,
)


@pytest.fixture(scope="module")
def tiny_mixtral_files(tmp_path_factory):
    """transformers' Mixtral in memory (stacked experts) and its saved tensors (one per expert: w1/w2/w3)."""
    torch.manual_seed(0)
    hf_model = AutoModelForCausalLM.from_config(TINY_MIXTRAL, dtype=torch.float32)
    directory = tmp_path_factory.mktemp("mixtral")
    hf_model.save_pretrained(directory)
    return hf_model, load_file(directory / "model.safetensors")


def test_checkpoints_with_per_expert_or_stacked_tensors_load_the_same(tiny_mixtral_files):
    hf_model, saved = tiny_mixtral_files
    assert "model.layers.0.block_sparse_moe.experts.2.w3.weight" in saved
    from_files = MixtralForCausalLM(TINY_MIXTRAL, max_positions=64)
    from_files.load_weights(saved.items())
    from_memory = MixtralForCausalLM(TINY_MIXTRAL, max_positions=64)
    from_memory.load_weights(hf_model.state_dict().items())  # mlp.experts.gate_up_proj [E, 2I, H]
    for name, param in from_files.named_parameters():
        assert torch.equal(param, dict(from_memory.named_parameters())[name]), name
    hf_experts = hf_model.model.layers[1].mlp.experts
    assert torch.equal(from_files.layers[1].mlp.experts.gate_up_proj, hf_experts.gate_up_proj)


def test_a_checkpoint_missing_one_expert_is_refused(tiny_mixtral_files):
    _, saved = tiny_mixtral_files
    partial = {k: v for k, v in saved.items() if k != "model.layers.1.block_sparse_moe.experts.1.w2.weight"}
    with pytest.raises(ValueError, match=r"lacks weights for: layers\.1\.mlp\.experts"):
        MixtralForCausalLM(TINY_MIXTRAL, max_positions=64).load_weights(partial.items())


def test_an_unsupported_activation_is_refused_naming_the_architecture():
    config = MixtralConfig(
        **{**TINY_MIXTRAL.to_dict(), "hidden_act": "gelu", "architectures": ["MixtralForCausalLM"]}
    )
    with pytest.raises(UnsupportedModelError, match=r"MixtralForCausalLM: hidden_act 'gelu'.*'silu'"):
        create_model(config, torch.float32, torch.device("meta"), max_positions=64)
