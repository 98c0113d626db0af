"""From an EngineConfig to a loaded model on its device, with its tokenizer and a KV pool sized to the budget."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from tokenmill.config import ConfigError, EngineConfig
from tokenmill.engine.model_runner import kv_bytes_per_block
from tokenmill.models.attention import TorchPagedAttention
from tokenmill.models.cpu_attention import KernelPagedAttention, kernel_supports, load_kernel
from tokenmill.models.loader import iter_weights, load_hf_config, load_tokenizer, resolve_model
from tokenmill.models.registry import create_model

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LoadedModel:
    model_id: str
    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    dtype: torch.dtype
    device: torch.device
    max_model_len: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    num_blocks: int


def load_model(config: EngineConfig) -> LoadedModel:
    source = resolve_model(config.model.model)
    hf_config = load_hf_config(source)
    tokenizer = load_tokenizer(source)
    device = _device(config.model.device)
    dtype = _dtype(config.model.dtype, hf_config, device)
    max_model_len = _max_model_len(config.model.max_model_len, hf_config)
    model = create_model(hf_config, dtype, device, max_model_len)
    model.load_weights(iter_weights(source, dtype))
    model.attention_backend = _attention_backend(config.model.attention_backend, model, dtype, device)
    block_bytes = kv_bytes_per_block(model, config.cache.block_size, dtype)
    num_blocks = _num_blocks(config, block_bytes, device)
    pool_tokens = num_blocks * config.cache.block_size
    if config.model.max_model_len is not None and config.model.max_model_len > pool_tokens:
        raise ConfigError(
            f"kv_cache_memory: the KV pool holds {pool_tokens} tokens, fewer than max_model_len "
            f"{config.model.max_model_len}; give it more memory or lower max_model_len"
        )
    # A context longer than the pool could never be served: advertise what actually fits.
    max_model_len = min(max_model_len, pool_tokens)
    return LoadedModel(
        model_id=source.name,
        model=model,
        tokenizer=tokenizer,
        dtype=dtype,
        device=device,
        max_model_len=max_model_len,
        vocab_size=hf_config.vocab_size,
        eos_token_ids=_eos_token_ids(hf_config, tokenizer),
        num_blocks=num_blocks,
    )


def _attention_backend(
    choice: str, model: nn.Module, dtype: torch.dtype, device: torch.device
) -> TorchPagedAttention:
    if choice == "torch":
        return TorchPagedAttention()
    group_size = model.layers[0].self_attn.num_heads // model.num_kv_heads
    applies = device.type == "cpu" and kernel_supports(dtype, model.head_dim, group_size)
    kernel = load_kernel() if applies else None
    if kernel is None and choice == "kernel":
        raise ConfigError(
            "attention_backend: the C decode kernel needs a CPU device, float32 or bfloat16, head_dim <= 256 "
            "and a working C compiler (cc or gcc)"
        )
    return KernelPagedAttention(kernel) if kernel is not None else TorchPagedAttention()


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _dtype(name: str, hf_config: object, device: torch.device) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    # float32 on CPU keeps outputs bit-comparable with the reference; GPUs get the checkpoint's half type.
    if device.type == "cpu":
        return torch.float32
    declared = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    return declared if isinstance(declared, torch.dtype) and declared != torch.float32 else torch.bfloat16


def _max_model_len(requested: int | None, hf_config: object) -> int:
    limit = getattr(hf_config, "max_position_embeddings", None) or 2048
    # Mistral-style sliding windows: within the window, attention is exact full attention.
    window = getattr(hf_config, "sliding_window", None)
    if window and (getattr(hf_config, "use_sliding_window", True) is not False):
        limit = min(limit, window)
    if requested is None:
        return limit
    if requested > limit:
        raise ConfigError(f"max_model_len: {requested} exceeds what the model supports ({limit})")
    return requested


def _num_blocks(config: EngineConfig, block_bytes: int, device: torch.device) -> int:
    cache = config.cache
    if cache.num_blocks is not None:
        return cache.num_blocks
    budget = cache.kv_cache_memory
    if budget is None:
        budget = int(_free_memory(device) * cache.kv_cache_fraction)
    num_blocks = budget // block_bytes
    if num_blocks < 1:
        raise ConfigError(f"kv_cache_memory: {budget} bytes hold no KV block ({block_bytes} bytes each)")
    return num_blocks


def _free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise ConfigError("kv_cache_memory: cannot read free memory; set it explicitly")


def _eos_token_ids(hf_config: object, tokenizer: object) -> tuple[int, ...]:
    ids: set[int] = set()
    for value in (getattr(hf_config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(value)
    return tuple(sorted(ids))
