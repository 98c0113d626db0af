"""Mixture-of-Experts building blocks: routing, the experts of one layer, and a Llama-shaped decoder whose
MLPs may be sparse (Mixtral, Qwen2-MoE, Qwen3-MoE build on it; DeepSeek-V2 uses the experts and routing).

The experts of a layer live in two stacked tensors, so a step's (token, expert) pairs are sorted by expert
and each expert that received tokens runs two matmuls over all of its rows at once.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable

import torch
from torch import nn
from transformers import PretrainedConfig

from tokenmill.models.layers import TORCH_OPS, GatedMLP, Linear
from tokenmill.models.llama import (
    DecoderLayer,
    LlamaForCausalLM,
    copy_weight,
)
from tokenmill.models.lora_layers import LoRALayer

EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


class MoEExperts(nn.Module):
    """`num_experts` SwiGLU experts with weights stacked in one tensor per layer."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        # Each expert's gate rows first, then its up rows: one GEMM and `silu_mul` per expert, as GatedMLP.
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.ops = TORCH_OPS

    def forward(self, x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """x [T, H]; weights, expert_ids [T, k] -> [T, H]: each token's weighted sum over its k experts."""
        num_tokens, top_k = expert_ids.shape
        pairs = expert_ids.reshape(-1)
        order = torch.argsort(pairs, stable=True)  # (token, slot) pairs grouped by expert
        counts = torch.bincount(pairs, minlength=self.num_experts).tolist()
        grouped = x[order // top_k]
        outputs = []
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            rows = grouped[start : start + count]
            # Through `ops`: a decode step's few rows per expert take the CPU GEMM kernel.
            gate_up = self.ops.linear(rows, self.gate_up_proj[expert], None)
            outputs.append(self.ops.linear(self.ops.silu_mul(gate_up), self.down_proj[expert], None))
            start += count
        if not outputs:  # a step without tokens
            return torch.zeros_like(x)
        # Weights in their own dtype (float32 for Mixtral) as transformers does: the product, and the sum
        # over a token's k experts, happen in the wider of the two dtypes before the cast back.
        weighted = torch.cat(outputs) * weights.reshape(-1)[order].unsqueeze(-1)
        by_pair = torch.empty_like(weighted)
        by_pair[order] = weighted
        return by_pair.view(num_tokens, top_k, -1).sum(dim=1).to(x.dtype)

    @torch.no_grad()
    def load_expert(self, expert: int, projection: str, tensor: torch.Tensor) -> None:
        """One expert's Hugging Face-layout weight: gate_proj/up_proj [I, H] or down_proj [H, I]."""
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert {expert} out of range (this layer has {self.num_experts})")
        size = self.intermediate_size
        if projection == "gate_proj":
            target = self.gate_up_proj[expert, :size]
        elif projection == "up_proj":
            target = self.gate_up_proj[expert, size:]
        elif projection == "down_proj":
            target = self.down_proj[expert]
        else:
            raise ValueError(f"unknown expert projection {projection!r} (one of {EXPERT_PROJECTIONS})")
        copy_weight(target, tensor, f"expert {expert} {projection}")


def softmax_topk(
    router_logits: torch.Tensor, top_k: int, normalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, k] float32, expert_ids [T, k]): the k most probable experts of each token, their
    probabilities renormalised to sum to one when `normalize`."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, expert_ids = torch.topk(probs, top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, expert_ids


class Router(nn.Module):
    """The gate: router logits = x @ weight.T. Not a `Linear` on purpose: int8 quantization swaps every
    Linear, and a rounded router changes which experts a token goes to, not just by how much."""

    def __init__(self, hidden_size: int, num_experts: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.ops = TORCH_OPS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.linear(x, self.weight, None)


class SparseMoEBlock(nn.Module):
    """Router + experts, optionally plus a shared expert every token goes through, scaled by
    sigmoid(shared_expert_gate(x)) (Qwen2-MoE). Attribute names are the checkpoints' (`mlp.gate`,
    `mlp.experts`, `mlp.shared_expert`, `mlp.shared_expert_gate`)."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int,
        normalize: bool,
        weights_in_model_dtype: bool,
        shared_expert_size: int | None = None,
    ) -> None:
        super().__init__()
        self.top_k = top_k
        self.normalize = normalize
        self.weights_in_model_dtype = weights_in_model_dtype
        """Qwen-MoE casts the routing weights to the model dtype before weighting; Mixtral keeps float32."""
        self.gate = Router(hidden_size, num_experts)
        self.experts = MoEExperts(num_experts, hidden_size, intermediate_size)
        self.shared_expert = None
        if shared_expert_size is not None:
            self.shared_expert = GatedMLP(hidden_size, shared_expert_size)
            self.shared_expert_gate = Linear(hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor, lora: LoRALayer | None = None) -> torch.Tensor:
        """`lora` only for DecoderLayer's call signature: MoE models refuse adapters before getting here."""
        weights, expert_ids = softmax_topk(self.gate(x), self.top_k, self.normalize)
        if self.weights_in_model_dtype:
            weights = weights.to(x.dtype)
        out = self.experts(x, weights, expert_ids)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out


# After the family's renames: one expert's projection, e.g. layers.1.mlp.experts.0.gate_proj.weight.
_EXPERT_WEIGHT = re.compile(r"(layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")


class MoEForCausalLM(LlamaForCausalLM):
    """A Llama-shaped decoder built layer by layer by the family (`decoder_layer`), loading checkpoints whose
    names differ from Qwen-MoE's only by what `checkpoint_name` renames. Forward, logits and the KV cache
    layout are Llama's."""

    supports_lora = False
    """models/lora_layers.py knows the dense Llama layers only."""

    def decoder_layer(self, config: PretrainedConfig, index: int, window: int | None) -> DecoderLayer:
        raise NotImplementedError

    def checkpoint_name(self, name: str) -> str:
        """A checkpoint tensor's name (without `model.`) in Qwen-MoE's vocabulary."""
        return name

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Hugging Face-named tensors into our fused parameters: q/k/v and gate/up (of dense MLPs and shared
        experts) stacked as in llama.py, each expert's projections into its layer's stacked tensors."""
        params = dict(self.named_parameters())
        missing = set(params)
        expert_parts: dict[str, set[tuple[int, str]]] = defaultdict(set)
        for hf_name, tensor in weights:
            name = self.checkpoint_name(hf_name.removeprefix("model."))
            if "rotary_emb" in name or (name == "lm_head.weight" and self.tie_word_embeddings):
                continue
            expert = _EXPERT_WEIGHT.fullmatch(name)
            if expert is not None:
                prefix, index, projection = expert[1], int(expert[2]), expert[3]
                if f"{prefix}.down_proj" not in params:
                    raise ValueError(f"checkpoint tensor {hf_name!r} has no place in {type(self).__name__}")
                experts = self.get_submodule(prefix)
                experts.load_expert(index, projection, tensor)
                expert_parts[prefix].add((index, projection))
                if len(expert_parts[prefix]) == len(EXPERT_PROJECTIONS) * experts.num_experts:
                    missing -= {f"{prefix}.gate_up_proj", f"{prefix}.down_proj"}
                continue
            missing.discard(self.load_tensor(params, name, hf_name, tensor))
        if missing:
            raise ValueError(f"checkpoint lacks weights for: {', '.join(sorted(missing)[:5])}")
