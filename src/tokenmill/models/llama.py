"""The Llama decoder family: Llama 2/3, Mistral and Qwen2 differ only in biases, rope and tying. Its classes
are also the skeleton of the other families (models/qwen3.py, glm4.py, moe.py, deepseek_v2.py, ...): a family
overrides how a layer, its attention or the rotary tables are built (`decoder_layer`, `make_rotary`,
`check_config`) and keeps the rest.

Weights arrive under Hugging Face names; q/k/v and gate/up are stacked into one matrix each so a layer
does four GEMMs instead of seven.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn
from transformers import PretrainedConfig

from tokenmill.models.attention import (
    AttentionBackend,
    AttentionMetadata,
    LayerCache,
    TorchPagedAttention,
    sliding_windows,
)
from tokenmill.models.errors import UnsupportedModelError, refusals_named
from tokenmill.models.layers import (
    TORCH_OPS,
    GatedMLP,
    Linear,
    RMSNorm,
    RotaryEmbedding,
    require_silu,
    rope_parameters,
)
from tokenmill.models.lora_layers import LoRALayer, LoRAStep

# HF name fragment -> (our fused parameter, shard index)
STACKED_PROJECTIONS = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


class Attention(nn.Module):
    def __init__(self, config: PretrainedConfig, qkv_bias: bool, window: int | None = None) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.scale = self.head_dim**-0.5
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=qkv_bias)
        self.o_proj = Linear(self.q_size, config.hidden_size, bias=getattr(config, "attention_bias", False))
        self.cache = LayerCache(
            self.num_kv_heads, self.head_dim, group_size=self.num_heads // self.num_kv_heads, window=window
        )
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
        q, k = self.queries_and_keys(qkv)
        v = qkv[:, self.q_size + self.kv_size :].view(-1, self.num_kv_heads, self.head_dim)
        q, k = self.ops.apply_rotary(q, k, rope)
        out = backend(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale, self.cache.window)
        out = out.reshape(-1, self.q_size)
        projected = self.o_proj(out)
        if lora is not None:
            lora.add("o_proj", out, projected)
        return projected

    def queries_and_keys(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, H, D] and k [T, KV, D] out of the fused projection, before the rotary (families that norm
        each head, Qwen3 and Gemma 3, do it here)."""
        q = qkv[:, : self.q_size].view(-1, self.num_heads, self.head_dim)
        k = qkv[:, self.q_size : self.q_size + self.kv_size].view(-1, self.num_kv_heads, self.head_dim)
        return q, k


class DecoderLayer(nn.Module):
    """Pre-norm attention and MLP around the residual stream. The attention and the MLP are the family's
    (Llama's own, Qwen3's with q/k norms, MLA; a dense SwiGLU or a mixture of experts)."""

    def __init__(self, config: PretrainedConfig, attention: nn.Module, mlp: nn.Module | None = None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = attention
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if mlp is None:
            mlp = GatedMLP(
                config.hidden_size, config.intermediate_size, bias=getattr(config, "mlp_bias", False)
            )
        self.mlp = mlp

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
    supports_lora = True
    """LoRA adapters (models/lora_layers.py) know this family's fused projections."""

    def __init__(self, config: PretrainedConfig, max_positions: int) -> None:
        super().__init__()
        self.config = config
        with refusals_named(type(self).__name__):
            self.check_config(config)
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
            windows = sliding_windows(config, config.num_hidden_layers)
            self.layers = nn.ModuleList(
                self.decoder_layer(config, index, window) for index, window in enumerate(windows)
            )
            self.rotary = self.make_rotary(config, max_positions)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if not self.tie_word_embeddings:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.attention_backend: AttentionBackend = TorchPagedAttention()
        self.ops = TORCH_OPS
        self.decode_step: Callable[..., torch.Tensor | None] | None = None
        """Takes whole decode steps where it can (models/cpu_decode_step.py); returns None for the rest."""

    def check_config(self, config: PretrainedConfig) -> None:
        """Raise UnsupportedModelError for an option this implementation would compute wrongly."""
        require_silu(config)

    def decoder_layer(self, config: PretrainedConfig, index: int, window: int | None) -> nn.Module:
        qkv_bias = self.qkv_bias or bool(getattr(config, "attention_bias", False))
        return DecoderLayer(config, Attention(config, qkv_bias, window))

    def make_rotary(self, config: PretrainedConfig, max_positions: int) -> nn.Module:
        """The cos/sin tables `ops.rope` reads (built after the layers, which know the head size)."""
        return RotaryEmbedding(self.head_dim, max_positions, rope_parameters(config))

    @property
    def cache_layout(self) -> tuple[LayerCache, ...]:
        """What each layer caches per token (the model runner allocates the KV cache from it)."""
        return tuple(layer.self_attn.cache for layer in self.layers)

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
        if lora is not None and not self.supports_lora:
            # The engine refuses such requests at submission; this guards other callers.
            raise UnsupportedModelError(f"{type(self).__name__}: LoRA adapters are not supported")
        x = self.embed_tokens(input_ids)
        if self.decode_step is not None and lora is None:
            hidden = self.decode_step(x, positions, kv_caches, meta)
            if hidden is not None:
                return hidden
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
            missing.discard(self.load_tensor(params, name, hf_name, tensor))
        if missing:
            raise ValueError(f"checkpoint lacks weights for: {', '.join(sorted(missing)[:5])}")

    def load_tensor(
        self, params: dict[str, nn.Parameter], name: str, hf_name: str, tensor: torch.Tensor
    ) -> str:
        """One checkpoint tensor (`name` without "model.") into its parameter, or into the rows of a fused one
        (q/k/v, gate/up) that it occupies; returns the parameter's name."""
        fragment = next((f for f in STACKED_PROJECTIONS if f".{f}." in name), None)
        target = name if fragment is None else name.replace(fragment, STACKED_PROJECTIONS[fragment][0])
        if target not in params:
            raise ValueError(f"checkpoint tensor {hf_name!r} has no place in {type(self).__name__}")
        param = params[target]
        if fragment is not None:
            owner = self.get_submodule(target.rsplit(".", 2)[0])  # the attention or the (shared) MLP
            param = shard_rows(param, owner, fragment)
        copy_weight(param, tensor, hf_name)
        return target


def copy_weight(param: torch.Tensor, tensor: torch.Tensor, name: str) -> None:
    """Copy a checkpoint tensor into a parameter (or a view of one) of the same shape."""
    if param.shape != tensor.shape:
        raise ValueError(
            f"{name}: checkpoint shape {tuple(tensor.shape)} != model shape {tuple(param.shape)}"
        )
    param.copy_(tensor)


def shard_rows(param: torch.Tensor, owner: nn.Module, fragment: str) -> torch.Tensor:
    """The rows of a fused weight (or bias) that one original projection occupies. Sizes come from the
    module that owns it: dense MLPs and shared experts of one model differ in width."""
    shard = STACKED_PROJECTIONS[fragment][1]
    if fragment in ("gate_proj", "up_proj"):
        size = owner.intermediate_size
        return param.narrow(0, shard * size, size)
    offsets = (0, owner.q_size, owner.q_size + owner.kv_size)
    sizes = (owner.q_size, owner.kv_size, owner.kv_size)
    return param.narrow(0, offsets[shard], sizes[shard])


class MistralForCausalLM(LlamaForCausalLM):
    pass


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias = True
