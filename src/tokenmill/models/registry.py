"""Architecture name (config.json `architectures[0]`) -> our model class."""

from __future__ import annotations

import importlib

import torch
from torch import nn
from transformers import PretrainedConfig


class UnsupportedModelError(ValueError):
    """The checkpoint asks for something this engine does not implement; the message says what."""


_ARCHITECTURES = {
    "LlamaForCausalLM": "tokenmill.models.llama:LlamaForCausalLM",
    "MistralForCausalLM": "tokenmill.models.llama:MistralForCausalLM",
    "Qwen2ForCausalLM": "tokenmill.models.llama:Qwen2ForCausalLM",
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
