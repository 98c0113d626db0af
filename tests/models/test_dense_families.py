"""Qwen3 and GLM-4 beyond the shared exactness harness (tests/models/test_vs_transformers.py): GLM's rotary
mapped onto the shared rotate-half one, and options of both architectures that are refused, not run wrongly."""

from __future__ import annotations

import pytest
import torch
from transformers import Glm4Config, Qwen3Config
from transformers.models.glm4.modeling_glm4 import apply_rotary_pos_emb as glm4_rotary

from tokenmill.models.cpu_ops import CpuKernelOps, load_ops_kernel
from tokenmill.models.errors import UnsupportedModelError
from tokenmill.models.glm4 import _padded_rotary, rotate_half_order
from tokenmill.models.layers import TorchOps
from tokenmill.models.registry import create_model

SMALL = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    pad_token_id=0,
)


def _build(config) -> torch.nn.Module:
    return create_model(config, torch.float32, torch.device("meta"), max_positions=64)


def _kernel_ops() -> CpuKernelOps | None:
    kernel = load_ops_kernel()
    return CpuKernelOps(kernel) if kernel is not None else None


@pytest.mark.parametrize("head_dim, rotary_dim", [(16, 8), (16, 16), (32, 12)])
@pytest.mark.parametrize("backend", ["torch", "kernel"])
def test_glm4_rotary_equals_transformers_after_the_row_permutation(head_dim, rotary_dim, backend):
    """transformers' GLM rotary on q/k, and ours on the same q/k with each head's dims reordered at load,
    give the same numbers, in that order."""
    ops = TorchOps() if backend == "torch" else _kernel_ops()
    if ops is None:
        pytest.skip("no C compiler: the engine runs torch ops")
    torch.manual_seed(0)
    positions = torch.tensor([0, 1, 5, 17, 63, 2])
    q = torch.randn(len(positions), 4, head_dim)
    k = torch.randn(len(positions), 2, head_dim)
    rotary = _padded_rotary(head_dim, rotary_dim, 64, {"rope_theta": 10000.0, "rope_type": "default"})

    # transformers: tables of the rotary dims only, [batch, seq, dim]; q/k as [batch, heads, seq, dim].
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
    freqs = positions[:, None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)[None]
    q_ref, k_ref = glm4_rotary(q.transpose(0, 1)[None], k.transpose(0, 1)[None], emb.cos(), emb.sin())

    order = rotate_half_order(head_dim, rotary_dim)
    qk = torch.cat((q, k), dim=1)[:, :, order]  # one buffer, q and k adjacent, as the model has them
    ours_q, ours_k = ops.apply_rotary(qk[:, :4], qk[:, 4:], ops.rope(rotary, positions, torch.float32))
    torch.testing.assert_close(ours_q, q_ref[0].transpose(0, 1)[:, :, order], rtol=0, atol=1e-6)
    torch.testing.assert_close(ours_k, k_ref[0].transpose(0, 1)[:, :, order], rtol=0, atol=1e-6)


def test_qwen3_refuses_an_activation_it_does_not_implement():
    config = Qwen3Config(**SMALL, head_dim=32, hidden_act="gelu", architectures=["Qwen3ForCausalLM"])
    with pytest.raises(UnsupportedModelError, match=r"Qwen3ForCausalLM: hidden_act 'gelu'.*silu"):
        _build(config)


def test_qwen3_refuses_a_rope_scaling_it_does_not_implement():
    config = Qwen3Config(
        **SMALL,
        head_dim=32,
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0},
        architectures=["Qwen3ForCausalLM"],
    )
    with pytest.raises(UnsupportedModelError, match=r"Qwen3ForCausalLM: .*'yarn'.*llama3"):
        _build(config)


def test_glm4_refuses_a_rotary_share_it_cannot_split_into_pairs():
    config = Glm4Config(**SMALL, head_dim=16, partial_rotary_factor=0.3125, architectures=["Glm4ForCausalLM"])
    with pytest.raises(UnsupportedModelError, match=r"Glm4ForCausalLM: partial_rotary_factor 0.3125 gives 5"):
        _build(config)


def test_glm4_builds_without_an_o_proj_bias_and_offers_no_lora():
    model = _build(Glm4Config(**SMALL, head_dim=16, attention_bias=True, architectures=["Glm4ForCausalLM"]))
    attn = model.layers[0].self_attn
    assert attn.qkv_proj.bias is not None and attn.o_proj.bias is None
    assert not model.supports_lora
