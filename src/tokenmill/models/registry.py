"""Architecture name (config.json `architectures[0]`) -> our model class."""

from __future__ import annotations

import importlib

import torch
from torch import nn
from transformers import PretrainedConfig

from tokenmill.models.errors import UnsupportedModelError

_ARCHITECTURES = {
    "LlamaForCausalLM": "tokenmill.models.llama:LlamaForCausalLM",
    "MistralForCausalLM": "tokenmill.models.llama:MistralForCausalLM",
    "Qwen2ForCausalLM": "tokenmill.models.llama:Qwen2ForCausalLM",
    "Gemma3ForCausalLM": "tokenmill.models.gemma3:Gemma3ForCausalLM",
    "Qwen3ForCausalLM": "tokenmill.models.qwen3:Qwen3ForCausalLM",
    "Glm4ForCausalLM": "tokenmill.models.glm4:Glm4ForCausalLM",
    "MixtralForCausalLM": "tokenmill.models.mixtral:MixtralForCausalLM",
    "Qwen2MoeForCausalLM": "tokenmill.models.qwen_moe:Qwen2MoeForCausalLM",
    "Qwen3MoeForCausalLM": "tokenmill.models.qwen_moe:Qwen3MoeForCausalLM",
    "DeepseekV2ForCausalLM": "tokenmill.models.deepseek_v2:DeepseekV2ForCausalLM",
}
SUPPORTED_ARCHITECTURES = tuple(_ARCHITECTURES)


def model_class(architecture: str) -> type[nn.Module]:
    target = _ARCHITECTURES.get(architecture)
    if target is None:
        raise UnsupportedModelError(
            f"architecture {architecture!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def create_model(
    config: PretrainedConfig, dtype: torch.dtype, device: torch.device, max_positions: int
) -> nn.Module:
    """An empty (randomly initialised) model of the checkpoint's architecture; call `load_weights` next."""
    architectures = getattr(config, "architectures", None) or []
    if not architectures:
        raise UnsupportedModelError(
            "config.json: `architectures` is missing; cannot tell which model to build"
        )
    cls = model_class(architectures[0])
    with torch.device(device):
        model = cls(config, max_positions)
    # Parameters take the serving dtype; the rotary tables stay float32 (cast per step, as transformers does).
    for param in model.parameters():
        param.data = param.data.to(dtype)
    return model.eval()
