"""DeepSeek-V2 beyond the token-for-token comparison (test_vs_transformers.py): the KV cache holds the
compressed latent, the router chooses experts as transformers' does, and unsupported options are refused."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, DeepseekV2Config
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter

from tests.tiny_models import ARCHITECTURES
from tokenmill.engine.model_runner import ModelRunner, kv_bytes_per_block
from tokenmill.models.deepseek_v2 import GroupLimitedRouter, is_moe_layer
from tokenmill.models.errors import UnsupportedModelError
from tokenmill.models.loader import iter_weights, resolve_model
from tokenmill.models.registry import create_model


def tiny_config(**overrides: object) -> DeepseekV2Config:
    base = ARCHITECTURES["deepseek-v2"].to_dict()
    return DeepseekV2Config(**{**base, "architectures": ["DeepseekV2ForCausalLM"], **overrides})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_cache_holds_one_latent_per_token_and_layer(dtype):
    config = tiny_config()
    model = create_model(config, dtype, torch.device("cpu"), max_positions=64)
    latent = config.kv_lora_rank + config.qk_rope_head_dim
    per_token = config.num_hidden_layers * latent * dtype.itemsize
    block_size = 4
    assert kv_bytes_per_block(model, block_size, dtype) == block_size * per_token
    # Full K and V of every head would take this much more.
    full = config.num_hidden_layers * 2 * config.num_attention_heads * config.qk_head_dim * dtype.itemsize
    assert full / per_token > 4

    runner = ModelRunner(model, num_blocks=3, block_size=block_size, dtype=dtype, device=torch.device("cpu"))
    assert len(runner.kv_caches) == config.num_hidden_layers
    for k_cache, v_cache in runner.kv_caches:
        assert k_cache is v_cache  # one tensor per layer, read as key and value
        assert k_cache.shape == (1, 3 * block_size, latent) and k_cache.dtype == dtype
    allocated = sum(k.numel() * k.element_size() for k, _ in runner.kv_caches)
    assert allocated == 3 * block_size * per_token


@pytest.mark.parametrize(
    "overrides",
    [
        {"topk_method": "group_limited_greedy", "n_group": 2, "topk_group": 1},
        {"topk_method": "greedy", "routed_scaling_factor": 1.0},
        {"topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2, "num_experts_per_tok": 3},
    ],
)
def test_router_chooses_the_experts_transformers_chooses(overrides):
    config = tiny_config(n_routed_experts=8, **overrides)
    ours = GroupLimitedRouter(config)
    reference = DeepseekV2TopkRouter(config)
    torch.manual_seed(0)
    with torch.no_grad():
        reference.weight.normal_(0, 0.5)
        ours.weight.copy_(reference.weight)
    x = torch.randn(50, config.hidden_size)
    weights, expert_ids = ours(x)
    _, ref_weights, ref_ids = reference(x)
    # Both pick the top k unsorted: compare each token's (expert, weight) pairs in expert order.
    order, ref_order = expert_ids.argsort(dim=-1), ref_ids.argsort(dim=-1)
    assert torch.equal(expert_ids.gather(1, order), ref_ids.gather(1, ref_order))
    torch.testing.assert_close(weights.gather(1, order), ref_weights.gather(1, ref_order))


def test_group_limited_routing_stays_in_the_best_groups_and_can_renormalise():
    config = tiny_config(
        n_routed_experts=8, n_group=4, topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.0
    )
    router = GroupLimitedRouter(config)
    with torch.no_grad():
        router.weight.normal_()
    weights, expert_ids = router(torch.randn(20, config.hidden_size))
    assert (expert_ids // 2 == expert_ids[:, :1] // 2).all()  # both experts from one group of two
    torch.testing.assert_close(weights.sum(dim=-1), torch.ones(20))


def test_moe_layers_follow_first_k_dense_replace_and_moe_layer_freq():
    config = tiny_config(num_hidden_layers=6, first_k_dense_replace=1, moe_layer_freq=2)
    assert [is_moe_layer(config, i) for i in range(6)] == [False, False, True, False, True, False]


@pytest.mark.parametrize(
    ("overrides", "option"),
    [
        ({"topk_method": "noaux_tc"}, "topk_method 'noaux_tc'"),
        ({"scoring_func": "sigmoid"}, "scoring_func 'sigmoid'"),
        ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_scaling type 'dynamic'"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ({"norm_topk_prob": True, "routed_scaling_factor": 16.0}, "norm_topk_prob"),
    ],
)
def test_unsupported_options_are_refused_at_construction(overrides, option):
    with pytest.raises(UnsupportedModelError, match="DeepseekV2ForCausalLM") as refused:
        create_model(tiny_config(**overrides), torch.float32, torch.device("meta"), max_positions=64)
    assert option in str(refused.value) and "supported" in str(refused.value)


def test_a_checkpoint_missing_a_tensor_is_refused_by_name(tmp_path):
    config = tiny_config(vocab_size=256, q_lora_rank=16)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    weights = list(iter_weights(resolve_model(str(tmp_path)), torch.float32))
    create_model(config, torch.float32, torch.device("cpu"), 64).load_weights(weights)

    dropped = "model.layers.1.mlp.experts.3.up_proj.weight"
    model = create_model(config, torch.float32, torch.device("cpu"), 64)
    with pytest.raises(ValueError, match=r"lacks weights for: layers\.1\.mlp\.experts\.3\.up_proj\.weight"):
        model.load_weights((name, tensor) for name, tensor in weights if name != dropped)
