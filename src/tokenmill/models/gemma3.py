"""Gemma 3's text decoder (Gemma3ForCausalLM): a Llama-shaped decoder that takes its attention (fused
q/k/v), KV cache layout and weight loading from llama.py. What differs:

- embeddings are scaled by sqrt(hidden_size), the factor rounded to the model dtype first;
- every RMSNorm scales by (1 + weight) in float32 and rounds once, and a layer has four: before and after
  attention, before and after the MLP; q and k are normed per head too, before the rotary;
- the MLP is gated by GELU (tanh approximation); attention scores are scaled by query_pre_attn_scalar**-0.5;
- local layers (a sliding window, their own rope base) interleave with global ones, as config.layer_types
  says; the final logits may be softcapped with tanh.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.nn import functional as F
from transformers import PretrainedConfig

from tokenmill.models.attention import AttentionBackend, AttentionMetadata
from tokenmill.models.errors import UnsupportedModelError
from tokenmill.models.layers import TORCH_OPS, GatedMLP, RotaryEmbedding
from tokenmill.models.llama import Attention, LlamaForCausalLM
from tokenmill.models.lora_layers import LoRAStep

ARCHITECTURE = "Gemma3ForCausalLM"
LAYER_TYPES = ("sliding_attention", "full_attention")
# config.hidden_activation -> torch's `approximate` argument of F.gelu
_ACTIVATIONS = {"gelu_pytorch_tanh": "tanh", "gelu": "none"}


def _scaled_rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's norm over the last dim: normalised and scaled in float32, rounded to x's dtype once."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (x32 * scale).to(x.dtype)


class GemmaRMSNorm(nn.Module):
    """RMSNorm whose checkpoint weight is an offset from 1. `scale` holds (1 + weight) in float32, derived
    once the weights are loaded (`update_scale`). In float32 that is Llama's norm with `scale` as its
    weight, so it goes through `self.ops` and the fused kernel; in bfloat16 Llama's norm rounds before
    scaling where Gemma's rounds after, so it runs in torch."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(size))
        # A buffer, not a parameter: it stays float32 when the model is cast to bfloat16.
        self.register_buffer("scale", torch.ones(size, dtype=torch.float32), persistent=False)
        self.eps = eps
        self.ops = TORCH_OPS

    def update_scale(self) -> None:
        self.scale = 1.0 + self.weight.detach().float()

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual), as RMSNorm's."""
        if x.dtype == torch.float32:
            return self.ops.add_rms_norm(x, residual, self.scale, self.eps)
        if residual is not None:
            x = x + residual
        return _scaled_rms_norm(x, self.scale, self.eps), x


class Gemma3Attention(Attention):
    """Llama's attention with q and k normed per head before the rotary, and Gemma's score scale."""

    def __init__(self, config: PretrainedConfig, window: int | None) -> None:
        super().__init__(config, qkv_bias=config.attention_bias, window=window)
        self.scale = config.query_pre_attn_scalar**-0.5
        self.q_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps)

    def queries_and_keys(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        heads = self.num_heads + self.num_kv_heads
        qk = qkv[:, : self.q_size + self.kv_size].view(-1, heads, self.head_dim)
        # q and k normed in one pass: they come out adjacent in one fresh tensor, the layout in which the
        # rotary kernel turns both in place.
        scales = torch.cat(
            (
                self.q_norm.scale.expand(self.num_heads, -1),
                self.k_norm.scale.expand(self.num_kv_heads, -1),
            )
        )
        qk = _scaled_rms_norm(qk, scales, self.q_norm.eps)
        return qk[:, : self.num_heads], qk[:, self.num_heads :]


class GeluGatedMLP(GatedMLP):
    """GatedMLP with GELU in place of SiLU (gate and up still one GEMM)."""

    def __init__(self, hidden_size: int, intermediate_size: int, approximate: str) -> None:
        super().__init__(hidden_size, intermediate_size)
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]  # no LoRA here
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.gelu(gate, approximate=self.approximate) * up)


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig, layer_type: str, window: int | None) -> None:
        super().__init__()
        self.layer_type = layer_type
        size, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(size, eps)
        self.self_attn = Gemma3Attention(config, window)
        self.post_attention_layernorm = GemmaRMSNorm(size, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(size, eps)
        self.mlp = GeluGatedMLP(size, config.intermediate_size, _ACTIVATIONS[config.hidden_activation])
        self.post_feedforward_layernorm = GemmaRMSNorm(size, eps)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        rope: object,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        backend: AttentionBackend,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (this layer's normed MLP output, the residual stream before it), as Llama's layer does:
        each residual addition happens inside the next pre-norm."""
        h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, rope, kv_cache, meta, backend)
        h, _ = self.post_attention_layernorm(h)
        h, residual = self.pre_feedforward_layernorm(h, residual)
        h, _ = self.post_feedforward_layernorm(self.mlp(h))
        return h, residual


class Gemma3ForCausalLM(LlamaForCausalLM):
    """Shares Llama's `cache_layout`, `head_dim`, tied head and `load_weights` (HF names into fused q/k/v
    and gate/up); builds its own layers."""

    supports_lora = False
    """models/lora_layers.py knows the Llama layers only."""

    def __init__(self, config: PretrainedConfig, max_positions: int) -> None:
        super().__init__(config, max_positions)
        self.embed_scale = config.hidden_size**0.5
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.final_logit_softcapping = config.final_logit_softcapping

    def check_config(self, config: PretrainedConfig) -> None:
        _check_supported(config)

    def decoder_layer(self, config: PretrainedConfig, index: int, window: int | None) -> Gemma3DecoderLayer:
        return Gemma3DecoderLayer(config, config.layer_types[index], window)

    def make_rotary(self, config: PretrainedConfig, max_positions: int) -> nn.ModuleDict:
        """One table per layer type: local layers rotate with their own base (rope_local_base_freq)."""
        return nn.ModuleDict(
            {
                layer_type: RotaryEmbedding(
                    self.head_dim, max_positions, _rope_parameters(config, layer_type)
                )
                for layer_type in sorted(set(config.layer_types[: config.num_hidden_layers]))
            }
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
        lora: LoRAStep | None = None,
    ) -> torch.Tensor:
        if lora is not None:
            raise UnsupportedModelError(
                f"{ARCHITECTURE}: LoRA adapters are not supported for this architecture "
                "(Llama, Mistral and Qwen2 models take them)"
            )
        x = self.embed_tokens(input_ids)
        # transformers rounds the factor to the model dtype before multiplying (sqrt(640) -> 25.25 in bf16).
        x = x * torch.tensor(self.embed_scale, device=x.device).to(x.dtype)
        ropes = {kind: self.ops.rope(rotary, positions, x.dtype) for kind, rotary in self.rotary.items()}
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x, residual = layer(x, residual, ropes[layer.layer_type], kv_cache, meta, self.attention_backend)
        return self.norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().compute_logits(hidden)
        cap = self.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(weights)
        for module in self.modules():
            if isinstance(module, GemmaRMSNorm):
                module.update_scale()


def _rope_parameters(config: PretrainedConfig, layer_type: str) -> dict:
    """transformers 5 keeps one rope dict per layer type (older configs: rope_theta for global layers,
    rope_local_base_freq for local ones; Gemma3TextConfig converts those on loading)."""
    params = dict(config.rope_parameters.get(layer_type) or {})
    params.setdefault("rope_theta", 10000.0 if layer_type == "sliding_attention" else 1000000.0)
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    return params


def _check_supported(config: PretrainedConfig) -> None:
    """Refuse, naming the option, what this implementation would otherwise compute wrongly."""

    def refuse(option: str, supported: str) -> None:
        raise UnsupportedModelError(f"{ARCHITECTURE}: {option} is not supported; supported: {supported}")

    if config.attn_logit_softcapping is not None:
        # The attention backends (SDPA, the paged decode kernel) have no hook for a tanh on the scores.
        refuse(f"attn_logit_softcapping={config.attn_logit_softcapping}", "None (Gemma 3's own setting)")
    if getattr(config, "use_bidirectional_attention", False):
        refuse("use_bidirectional_attention=True", "causal attention only")
    if config.hidden_activation not in _ACTIVATIONS:
        refuse(f"hidden_activation={config.hidden_activation!r}", ", ".join(_ACTIVATIONS))
    unknown = sorted(set(config.layer_types[: config.num_hidden_layers]) - set(LAYER_TYPES))
    if unknown:
        refuse(f"layer_types {unknown}", ", ".join(LAYER_TYPES))
    for layer_type in set(config.layer_types[: config.num_hidden_layers]):
        rope_type = _rope_parameters(config, layer_type)["rope_type"]
        if rope_type not in ("default", "linear"):
            refuse(f"rope type {rope_type!r} for {layer_type} layers", "default, linear")
