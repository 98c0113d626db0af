"""Building blocks shared by the decoder models: RMSNorm, rotary embeddings (with rope scaling), SwiGLU MLP.

Numerics follow transformers' Llama implementation (norm in float32, rotary tables in float32 cast to the
model dtype) so that greedy tokens match the reference exactly.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import PretrainedConfig

from tokenmill.models.errors import UnsupportedModelError

if TYPE_CHECKING:
    from tokenmill.models.lora_layers import LoRALayer


class TorchOps:
    """The operators of a decoder layer that a faster backend may take over (models/cpu_ops.py), in plain
    torch: the reference the backends are tested against, and the path on other devices and dtypes."""

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return nn.functional.linear(x, weight, bias)

    def linear_int8(
        self,
        x: torch.Tensor,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        block_sums: torch.Tensor,
        bias: torch.Tensor | None,
    ) -> torch.Tensor:
        """A product with an int8 weight (models/quantization.py), through a dequantised copy; `block_sums`
        serve kernels that quantize x too."""
        weight = (qweight.to(torch.float32) * scales[:, None]).to(x.dtype)
        return nn.functional.linear(x, weight, bias)

    def linear_packed(
        self, x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int
    ) -> torch.Tensor:
        """A product with a weight in the packed kernel's layout (models/packed_linear.py), unpacked."""
        from tokenmill.models.packed_linear import unpack  # packed_linear builds on this module

        return nn.functional.linear(x, unpack(packed, out_features), bias)

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual); without a residual, x itself is the new residual."""
        if residual is not None:
            x = x + residual
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        return weight * x32.to(x.dtype), x

    def rope(self, rotary: RotaryEmbedding, positions: torch.Tensor, dtype: torch.dtype) -> object:
        """Once per step: whatever `apply_rotary` needs for these positions (here cos and sin, [T, 1, D])."""
        return rotary.cos[positions].to(dtype).unsqueeze(1), rotary.sin[positions].to(dtype).unsqueeze(1)

    def apply_rotary(
        self, q: torch.Tensor, k: torch.Tensor, rope: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [T, H, D], k: [T, KV, D]; rotate-half layout, as in Hugging Face checkpoints."""
        cos, sin = rope
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return nn.functional.silu(gate) * up


TORCH_OPS = TorchOps()


def use_ops(model: nn.Module, ops: TorchOps) -> None:
    """Every module of `model` that computes with `ops` (Linear, RMSNorm, ...) switches to `ops`."""
    for module in model.modules():
        if hasattr(module, "ops"):
            module.ops = ops


class Linear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.ops = TORCH_OPS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.ops = TORCH_OPS

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Adds the residual stream first (one fused step with a kernel); returns (normed, residual)."""
        return self.ops.add_rms_norm(x, residual, self.weight, self.eps)


def rope_parameters(config: PretrainedConfig) -> dict:
    """transformers 5 keeps theta and scaling together in `rope_parameters`; older configs split them."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    scaling = getattr(config, "rope_scaling", None) or {}
    params = {**scaling, **params}
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    return params


def inverse_frequencies(head_dim: int, params: dict) -> torch.Tensor:
    theta = float(params["rope_theta"])
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = params["rope_type"]
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(params["factor"])
    if rope_type == "llama3":
        # Llama 3.1: leave high frequencies alone, divide low ones by `factor`, interpolate in between.
        factor = float(params["factor"])
        low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
        old_len = float(params["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(is_medium, smoothed, scaled)
    raise UnsupportedModelError(
        f"rope_scaling: rope type {rope_type!r} is not supported (default, linear, llama3)"
    )


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables for every position, indexed by each token's position (no per-step trig)."""

    def __init__(self, head_dim: int, max_positions: int, params: dict) -> None:
        super().__init__()
        inv_freq = inverse_frequencies(head_dim, params)
        positions = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def require_silu(config: PretrainedConfig) -> None:
    """GatedMLP (and the silu_mul kernel) compute SwiGLU only."""
    activation = getattr(config, "hidden_act", "silu")
    if activation != "silu":
        raise UnsupportedModelError(f"hidden_act {activation!r} is not supported (supported: 'silu')")


class GatedMLP(nn.Module):
    """SwiGLU with gate and up projections fused into one GEMM."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False) -> None:
        super().__init__()
        self.intermediate_size = intermediate_size
        self.ops = TORCH_OPS
        self.gate_up_proj = Linear(hidden_size, 2 * intermediate_size, bias=bias)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor, lora: LoRALayer | None = None) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if lora is not None:
            lora.add("gate_up_proj", x, gate_up)
        hidden = self.ops.silu_mul(gate_up)
        out = self.down_proj(hidden)
        if lora is not None:
            lora.add("down_proj", hidden, out)
        return out
