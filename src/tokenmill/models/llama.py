"""The Llama decoder family: Llama 2/3, Mistral and Qwen2 differ only in biases, rope and tying.

Weights arrive under Hugging Face names; q/k/v and gate/up are stacked into one matrix each so a layer
does four GEMMs instead of seven.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from transformers import PretrainedConfig

from tokenmill.models.attention import AttentionBackend, AttentionMetadata, TorchPagedAttention
from tokenmill.models.layers import TORCH_OPS, GatedMLP, Linear, RMSNorm, RotaryEmbedding, rope_parameters
from tokenmill.models.lora_layers import LoRALayer, LoRAStep

# HF name fragment -> (our fused parameter, shard index)
_STACKED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


class Attention(nn.Module):
    def __init__(self, config: PretrainedConfig, qkv_bias: bool) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.scale = self.head_dim**-0.5
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=qkv_bias)
        self.o_proj = Linear(self.q_size, config.hidden_size, bias=getattr(config, "attention_bias", False))
        self.ops = TORCH_OPS

    def forward(
        self,
        x: torch.Tensor,
        rope: object,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        backend: AttentionBackend,
        lora: LoRALayer | None = None,
    ) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        if lora is not None:
            lora.add("qkv_proj", x, qkv)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        q, k = self.ops.apply_rotary(q, k, rope)
        out = backend(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale).reshape(-1, self.q_size)
        projected = self.o_proj(out)
        if lora is not None:
            lora.add("o_proj", out, projected)
        return projected


class DecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig, qkv_bias: bool) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, qkv_bias)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = GatedMLP(
            config.hidden_size, config.intermediate_size, bias=getattr(config, "mlp_bias", False)
        )

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        rope: object,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        backend: AttentionBackend,
        lora: LoRALayer | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (this layer's MLP output, the residual stream before it): the sum of the two is the
        layer's output, left to the next norm to form in the same pass as its own work."""
        h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, rope, kv_cache, meta, backend, lora)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h, lora), residual


class LlamaForCausalLM(nn.Module):
    qkv_bias = False

    def __init__(self, config: PretrainedConfig, max_positions: int) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, self.qkv_bias or getattr(config, "attention_bias", False))
            for _ in range(config.num_hidden_layers)
        )
        self.rotary = RotaryEmbedding(self.head_dim, max_positions, rope_parameters(config))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if not self.tie_word_embeddings:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.attention_backend: AttentionBackend = TorchPagedAttention()
        self.ops = TORCH_OPS

    @property
    def num_kv_heads(self) -> int:
        return self.layers[0].self_attn.num_kv_heads

    @property
    def head_dim(self) -> int:
        return self.layers[0].self_attn.head_dim

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
        lora: LoRAStep | None = None,
    ) -> torch.Tensor:
        """Hidden states after the final norm, one row per token of the step. `lora` adds each adapted
        row's LoRA delta (None: the base model for every row, at no extra cost)."""
        x = self.embed_tokens(input_ids)
        residual = None
        rope = self.ops.rope(self.rotary, positions, x.dtype)
        for index, (layer, kv_cache) in enumerate(zip(self.layers, kv_caches, strict=True)):
            layer_lora = lora.layer(index) if lora is not None else None
            x, residual = layer(x, residual, rope, kv_cache, meta, self.attention_backend, layer_lora)
        return self.norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.tie_word_embeddings:
            return self.ops.linear(hidden, self.embed_tokens.weight, None)
        return self.lm_head(hidden)

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy Hugging Face-named tensors into our (partly fused) parameters; every parameter must be set."""
        params = dict(self.named_parameters())
        missing = set(params)
        for hf_name, tensor in weights:
            name = hf_name.removeprefix("model.")
            if "rotary_emb" in name or (name == "lm_head.weight" and self.tie_word_embeddings):
                continue
            fragment = next((f for f in _STACKED if f".{f}." in name), None)
            if fragment is None:
                target, shard = name, None
            else:
                fused, shard = _STACKED[fragment]
                target = name.replace(fragment, fused)
            if target not in params:
                raise ValueError(f"checkpoint tensor {hf_name!r} has no place in {type(self).__name__}")
            param = params[target]
            if shard is None:
                _copy(param, tensor, hf_name)
            else:
                _shard_view(param, self.layers[0], fragment, shard).copy_(tensor)
            missing.discard(target)
        if missing:
            raise ValueError(f"checkpoint lacks weights for: {', '.join(sorted(missing)[:5])}")


def _copy(param: torch.Tensor, tensor: torch.Tensor, name: str) -> None:
    if param.shape != tensor.shape:
        raise ValueError(
            f"{name}: checkpoint shape {tuple(tensor.shape)} != model shape {tuple(param.shape)}"
        )
    param.copy_(tensor)


def _shard_view(param: torch.Tensor, layer: DecoderLayer, fragment: str, shard: int) -> torch.Tensor:
    """The rows of a fused weight (or bias) that one original projection occupies."""
    if fragment in ("gate_proj", "up_proj"):
        size = layer.mlp.intermediate_size
        return param.narrow(0, shard * size, size)
    attn = layer.self_attn
    offsets = (0, attn.q_size, attn.q_size + attn.kv_size)
    sizes = (attn.q_size, attn.kv_size, attn.kv_size)
    return param.narrow(0, offsets[shard], sizes[shard])


class MistralForCausalLM(LlamaForCausalLM):
    pass


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias = True
