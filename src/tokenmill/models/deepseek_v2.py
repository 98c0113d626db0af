"""DeepSeek-V2: Multi-head Latent Attention (models/mla.py) in every layer; SwiGLU MLPs in the first
`first_k_dense_replace` layers, then (every `moe_layer_freq`-th layer) a mixture of routed experts with
group-limited routing plus always-on shared experts.

The residual flow, forward pass and logits are Llama's; the KV cache layout comes from the attention (one
latent per token and layer).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn
from torch.nn import functional as F
from transformers import PretrainedConfig

from tokenmill.models.errors import ModelLoadError, UnsupportedModelError
from tokenmill.models.layers import GatedMLP
from tokenmill.models.llama import DecoderLayer, LlamaForCausalLM, copy_weight
from tokenmill.models.lora_layers import LoRALayer
from tokenmill.models.mla import LatentRotary, MultiHeadLatentAttention
from tokenmill.models.moe import MoEExperts

ARCHITECTURE = "DeepseekV2ForCausalLM"
TOPK_METHODS = ("greedy", "group_limited_greedy")


class GroupLimitedRouter(nn.Module):
    """DeepSeek-V2's gate: softmax over all routed experts; "group_limited_greedy" first keeps the
    `topk_group` groups (of `n_group` equal groups) whose best expert scores highest, then takes the top k
    experts of those. The chosen probabilities are scaled by `routed_scaling_factor`, or renormalised to
    sum to one under `norm_topk_prob` (DeepSeek's reference code does one or the other)."""

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.num_experts = config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.method = config.topk_method
        self.num_groups = config.n_group or 1
        self.topk_group = config.topk_group or self.num_groups
        self.scaling = float(config.routed_scaling_factor)
        self.normalize = bool(config.norm_topk_prob) and self.top_k > 1
        _check_routing(config, self)
        # A float32 buffer, not a parameter: the model dtype would round it, and transformers keeps the
        # gate in float32 because rounding changes which experts a token goes to.
        self.register_buffer("weight", torch.zeros(self.num_experts, config.hidden_size, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [T, k] float32, expert_ids [T, k])."""
        scores = F.linear(x.float(), self.weight).softmax(dim=-1)
        if self.method == "group_limited_greedy":
            per_group = self.num_experts // self.num_groups
            best_in_group = scores.view(-1, self.num_groups, per_group).amax(dim=-1)
            kept_groups = best_in_group.topk(self.topk_group, dim=-1, sorted=False).indices
            keep = torch.zeros_like(best_in_group, dtype=torch.bool).scatter_(1, kept_groups, True)
            scores = scores.masked_fill(~keep.repeat_interleave(per_group, dim=1), 0.0)
        weights, expert_ids = scores.topk(self.top_k, dim=-1, sorted=False)
        if self.normalize:
            return weights / (weights.sum(dim=-1, keepdim=True) + 1e-20), expert_ids
        return weights * self.scaling, expert_ids


def _check_routing(config: PretrainedConfig, router: GroupLimitedRouter) -> None:
    scoring = getattr(config, "scoring_func", "softmax")
    if scoring != "softmax":
        raise UnsupportedModelError(
            f"{ARCHITECTURE}: scoring_func {scoring!r} is not supported (supported: 'softmax')"
        )
    if router.method not in TOPK_METHODS:
        raise UnsupportedModelError(
            f"{ARCHITECTURE}: topk_method {router.method!r} is not supported "
            f"(supported: {', '.join(TOPK_METHODS)})"
        )
    if router.normalize and router.scaling != 1.0:
        # DeepSeek's code renormalises instead of scaling, transformers 5 scales and never renormalises,
        # vLLM does both: no answer is the checkpoint's for sure.
        raise UnsupportedModelError(
            f"{ARCHITECTURE}: norm_topk_prob together with routed_scaling_factor {router.scaling} is "
            "not supported (implementations disagree); supported: either one alone"
        )
    if router.method == "group_limited_greedy" and (
        router.num_experts % router.num_groups or router.topk_group > router.num_groups
    ):
        raise ModelLoadError(
            f"{ARCHITECTURE}: {router.num_experts} experts cannot form n_group={router.num_groups} groups "
            f"with topk_group={router.topk_group}"
        )


class DeepseekV2MoE(nn.Module):
    """Routed experts plus shared experts (one SwiGLU MLP of n_shared_experts * moe_intermediate_size that
    every token goes through, unweighted). Attribute names are the checkpoint's."""

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.gate = GroupLimitedRouter(config)
        self.experts = MoEExperts(config.n_routed_experts, config.hidden_size, config.moe_intermediate_size)
        shared = config.n_shared_experts or 0
        self.shared_experts = (
            GatedMLP(config.hidden_size, shared * config.moe_intermediate_size, bias=config.mlp_bias)
            if shared
            else None
        )

    def forward(self, x: torch.Tensor, lora: LoRALayer | None = None) -> torch.Tensor:
        """`lora` only for DecoderLayer's call signature: the model refuses adapters before getting here."""
        out = self.experts(x, *self.gate(x))
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out


def is_moe_layer(config: PretrainedConfig, index: int) -> bool:
    """As DeepSeek's reference code decides (transformers 5 ignores moe_layer_freq; every DeepSeek-V2
    checkpoint has 1, where the two agree)."""
    return (
        config.n_routed_experts is not None
        and index >= config.first_k_dense_replace
        and index % (getattr(config, "moe_layer_freq", None) or 1) == 0
    )


# Checkpoint names (without "model."), matched in this order.
_ATTENTION = re.compile(r"(layers\.\d+\.self_attn)\.(.+)")
_EXPERT = re.compile(r"(layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")
_GATE_UP = re.compile(r"(.+)\.(gate_proj|up_proj)\.(weight|bias)")


class DeepseekV2ForCausalLM(LlamaForCausalLM):
    supports_lora = False
    """models/lora_layers.py knows the dense Llama layers only."""

    def decoder_layer(self, config: PretrainedConfig, index: int, window: int | None) -> DecoderLayer:
        return DecoderLayer(config, MultiHeadLatentAttention(config), self._mlp(config, index))

    def make_rotary(self, config: PretrainedConfig, max_positions: int) -> LatentRotary:
        return LatentRotary(config.qk_rope_head_dim, max_positions, config, ARCHITECTURE)

    @staticmethod
    def _mlp(config: PretrainedConfig, index: int) -> nn.Module:
        if is_moe_layer(config, index):
            return DeepseekV2MoE(config)
        return GatedMLP(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Hugging Face-named tensors into our parameters (gate/up fused, experts stacked, kv_b_proj split
        into the absorbed operands, rope rows reordered); every tensor the model needs must come."""
        targets = self.state_dict(keep_vars=True)  # parameters and the routers' float32 buffers
        expected = self._checkpoint_names()
        seen = set()
        for hf_name, tensor in weights:
            name = hf_name.removeprefix("model.")
            if "rotary_emb" in name or (name == "lm_head.weight" and self.tie_word_embeddings):
                continue
            if name not in expected:
                raise ValueError(f"checkpoint tensor {hf_name!r} has no place in {ARCHITECTURE}")
            if match := _ATTENTION.fullmatch(name):
                self.get_submodule(match[1]).load_weight(match[2], tensor)
            elif match := _EXPERT.fullmatch(name):
                self.get_submodule(match[1]).load_expert(int(match[2]), match[3], tensor)
            elif match := _GATE_UP.fullmatch(name):
                size = self.get_submodule(match[1]).intermediate_size
                shard = 0 if match[2] == "gate_proj" else 1
                copy_weight(
                    targets[f"{match[1]}.gate_up_proj.{match[3]}"].narrow(0, shard * size, size),
                    tensor,
                    hf_name,
                )
            else:
                copy_weight(targets[name], tensor, hf_name)
            seen.add(name)
        if missing := expected - seen:
            raise ValueError(f"checkpoint lacks weights for: {', '.join(sorted(missing)[:5])}")

    def _checkpoint_names(self) -> set[str]:
        """The checkpoint tensors (names without "model.") this model is built from."""
        names = set()
        for key, value in self.state_dict(keep_vars=True).items():
            module, _, kind = key.rpartition(".")
            if kind in ("w_uk", "w_uv"):
                names.add(f"{module}.kv_b_proj.weight")
            elif module.endswith(".experts"):
                projections = ("gate_proj", "up_proj") if kind == "gate_up_proj" else ("down_proj",)
                names.update(f"{module}.{e}.{p}.weight" for e in range(value.shape[0]) for p in projections)
            elif module.endswith(".gate_up_proj"):
                owner = module.removesuffix(".gate_up_proj")
                names.update((f"{owner}.gate_proj.{kind}", f"{owner}.up_proj.{kind}"))
            else:
                names.add(key)
        return names
