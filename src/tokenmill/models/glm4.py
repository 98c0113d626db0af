"""GLM-4 (Glm4ForCausalLM): Llama's attention and SwiGLU with four norms per layer and GLM's rotary.

GLM's rotary turns only the first `partial_rotary_factor` of each head and pairs adjacent dimensions
(2i, 2i+1) where Hugging Face Llama pairs i with i + head_dim/2. Attention only ever uses q . k, which is
unchanged when q and k have their dimensions permuted alike, so at load time each query and key head's
rows are reordered to

    [x_0 .. x_{r/2-1}, first half of the unrotated dims, y_0 .. y_{r/2-1}, second half]

(x_i, y_i: the pair GLM rotates by frequency i; r: the rotary dims) and the rotary tables carry cos 1 and
sin 0 on the unrotated positions. The shared rotate-half rotary (and its C kernel) then computes exactly
GLM's products, and the KV cache simply holds keys in that order. V and o_proj are untouched.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from transformers import PretrainedConfig

from tokenmill.models.attention import AttentionBackend, AttentionMetadata
from tokenmill.models.errors import UnsupportedModelError
from tokenmill.models.layers import RMSNorm, RotaryEmbedding, rope_parameters
from tokenmill.models.llama import Attention, DecoderLayer, LlamaForCausalLM
from tokenmill.models.lora_layers import LoRALayer

ARCHITECTURE = "Glm4ForCausalLM"


class Glm4DecoderLayer(DecoderLayer):
    """Llama's layer plus a norm on the attention output and one on the MLP output, each before it joins
    the residual stream; o_proj has no bias even where q/k/v have one."""

    def __init__(self, config: PretrainedConfig, window: int | None = None) -> None:
        super().__init__(config, Attention(config, bool(getattr(config, "attention_bias", True)), window))
        self.self_attn.o_proj.register_parameter("bias", None)
        self.post_self_attn_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_mlp_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

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
        """As Llama's: (this layer's normed MLP output, the residual stream before it)."""
        h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, rope, kv_cache, meta, backend)
        h, _ = self.post_self_attn_layernorm(h)
        h, residual = self.post_attention_layernorm(h, residual)
        h = self.mlp(h)
        return self.post_mlp_layernorm(h)[0], residual


class Glm4ForCausalLM(LlamaForCausalLM):
    supports_lora = False
    """Adapters would need the load-time q/k row permutation applied to their B matrices too."""

    def decoder_layer(self, config: PretrainedConfig, index: int, window: int | None) -> Glm4DecoderLayer:
        return Glm4DecoderLayer(config, window)

    def make_rotary(self, config: PretrainedConfig, max_positions: int) -> RotaryEmbedding:
        self.rotary_dim = _rotary_dim(config, self.head_dim)
        return _padded_rotary(self.head_dim, self.rotary_dim, max_positions, rope_parameters(config))

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Llama's loading, then each query and key head's rows put in the rotate-half order (see above)."""
        super().load_weights(weights)
        order = rotate_half_order(self.head_dim, self.rotary_dim)
        for layer in self.layers:
            attn = layer.self_attn
            qk_rows = attn.q_size + attn.kv_size
            for param in (attn.qkv_proj.weight, attn.qkv_proj.bias):
                if param is not None:
                    heads = param[:qk_rows].unflatten(0, (attn.num_heads + attn.num_kv_heads, self.head_dim))
                    heads.copy_(heads[:, order.to(heads.device)])


def rotate_half_order(head_dim: int, rotary_dim: int) -> torch.Tensor:
    """For each position of a head in rotate-half order, the GLM dimension it takes (see the module doc)."""
    pairs = torch.arange(rotary_dim).view(-1, 2)
    unrotated = torch.arange(rotary_dim, head_dim).view(2, -1)
    return torch.cat((pairs[:, 0], unrotated[0], pairs[:, 1], unrotated[1]))


def _rotary_dim(config: PretrainedConfig, head_dim: int) -> int:
    params = rope_parameters(config)
    factor = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    rotary_dim = int(head_dim * factor)  # transformers truncates the same way
    if rotary_dim <= 0 or rotary_dim % 2 or (head_dim - rotary_dim) % 2:
        raise UnsupportedModelError(
            f"{ARCHITECTURE}: partial_rotary_factor {factor} gives {rotary_dim} rotary dims of head_dim "
            f"{head_dim}; supported: an even, positive number with an even remainder"
        )
    return rotary_dim


def _padded_rotary(head_dim: int, rotary_dim: int, max_positions: int, params: dict) -> RotaryEmbedding:
    """Tables of `rotary_dim` frequencies widened to head_dim, as rotate-half reads them: each half is the
    frequencies followed by the unrotated dims' cos 1 and sin 0 (x * 1 + y * 0 == x exactly)."""
    rotary = RotaryEmbedding(rotary_dim, max_positions, params)
    half, pad = rotary_dim // 2, (head_dim - rotary_dim) // 2
    for name, fill in (("cos", 1.0), ("sin", 0.0)):
        table = getattr(rotary, name)[:, :half]
        padding = torch.full((table.shape[0], pad), fill, dtype=table.dtype, device=table.device)
        rotary.register_buffer(name, torch.cat((table, padding, table, padding), dim=-1), persistent=False)
    return rotary
