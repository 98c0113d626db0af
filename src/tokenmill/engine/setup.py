"""From an EngineConfig to a loaded model on its device, with its tokenizer and a KV pool sized to the budget."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from tokenmill.config import ConfigError, EngineConfig, chat_template_text
from tokenmill.engine.hardware import free_memory_bytes, native_bf16_flag
from tokenmill.engine.model_runner import kv_bytes_per_block
from tokenmill.models.attention import TorchPagedAttention, kv_window
from tokenmill.models.cpu_attention import KernelPagedAttention, kernel_supports, load_kernel
from tokenmill.models.cpu_decode_step import CpuDecodeStep
from tokenmill.models.cpu_ops import CpuKernelOps, load_ops_kernel
from tokenmill.models.layers import use_ops
from tokenmill.models.loader import ModelSource, iter_weights, load_hf_config, load_tokenizer, resolve_model
from tokenmill.models.packed_linear import pack_model
from tokenmill.models.quantization import quantize_model
from tokenmill.models.registry import create_model

logger = logging.getLogger(__name__)


KV_TOKENS_PER_SEQ = 128
"""The default KV pool holds every running sequence at this average length, or one full context, whichever is
more: sized by the work it serves, not by how much memory the machine happens to have."""


@dataclass(frozen=True, slots=True)
class EnginePlan:
    """What an engine will use, decided from its config, the checkpoint's config and this machine before any
    weight is read: `load_model` follows it, `tokenmill doctor` shows it, and the reasons go to the log."""

    source: ModelSource
    device: torch.device
    dtype: torch.dtype
    dtype_reason: str
    max_model_len: int
    num_blocks: int
    block_size: int
    kv_bytes_per_token: int
    kv_reason: str
    weight_bytes: int

    @property
    def kv_cache_bytes(self) -> int:
        return self.num_blocks * self.block_size * self.kv_bytes_per_token

    def describe(self) -> str:
        return (
            f"{self.dtype_name} on {self.device} ({self.dtype_reason}); context {self.max_model_len} tokens; "
            f"KV cache {self.num_blocks * self.block_size} tokens, {self.kv_cache_bytes / 2**20:.0f} MiB "
            f"({self.kv_reason})"
        )

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


@dataclass(frozen=True, slots=True)
class LoadedModel:
    model_id: str
    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    plan: EnginePlan
    vocab_size: int
    eos_token_ids: tuple[int, ...]


def plan_engine(config: EngineConfig) -> EnginePlan:
    """Raises ConfigError (naming the field) for settings that cannot work here."""
    source = resolve_model(config.model.model)
    return _plan(config, source, load_hf_config(source))


def _plan(config: EngineConfig, source: ModelSource, hf_config: PretrainedConfig) -> EnginePlan:
    device = _device(config.model.device)
    dtype, dtype_reason = _dtype(config.model.dtype, hf_config, device)
    max_model_len = _max_model_len(config.model.max_model_len, hf_config)
    # The model on the meta device allocates nothing but knows its KV layout (layers, KV heads, head size).
    shape = create_model(hf_config, dtype, torch.device("meta"), max_model_len)
    block_size = config.cache.block_size
    kv_bytes_per_token = kv_bytes_per_block(shape, block_size, dtype) // block_size
    # What one sequence holds at most: its whole context, or (every layer windowed) a window and a step.
    window = kv_window(shape.cache_layout)
    kv_span = max_model_len
    if window is not None:
        kv_span = min(max_model_len, window + config.scheduler.max_num_batched_tokens + block_size)
    num_blocks, kv_reason = _num_blocks(config, kv_bytes_per_token, kv_span, device)
    pool_tokens = num_blocks * block_size
    if config.model.max_model_len is not None and kv_span > pool_tokens:
        raise ConfigError(
            f"kv_cache_memory: the KV pool holds {pool_tokens} tokens, fewer than a sequence of max_model_len "
            f"{config.model.max_model_len} needs ({kv_span}); give it more memory or lower max_model_len"
        )
    if pool_tokens < kv_span:
        # A context the pool cannot hold could never be served: advertise what surely fits.
        kv_reason += f"; the context is cut to the {pool_tokens} tokens it holds"
        max_model_len = pool_tokens
    return EnginePlan(
        source=source,
        device=device,
        dtype=dtype,
        dtype_reason=dtype_reason,
        max_model_len=max_model_len,
        num_blocks=num_blocks,
        block_size=block_size,
        kv_bytes_per_token=kv_bytes_per_token,
        kv_reason=kv_reason,
        weight_bytes=sum(p.numel() for p in shape.parameters()) * dtype.itemsize,
    )


def load_model(config: EngineConfig) -> LoadedModel:
    source = resolve_model(config.model.model)
    hf_config = load_hf_config(source)  # read once: from a GGUF it takes a while
    plan = _plan(config, source, hf_config)
    tokenizer = load_tokenizer(plan.source)
    if config.model.chat_template is not None:
        tokenizer.chat_template = chat_template_text(config.model.chat_template)
    model = create_model(hf_config, plan.dtype, plan.device, plan.max_model_len)
    model.load_weights(iter_weights(plan.source, plan.dtype))
    if config.model.quantization != "none":
        quantize_model(model, config.model.quantization)
    model.attention_backend = _attention_backend(
        config.model.attention_backend, model, plan.dtype, plan.device
    )
    _use_cpu_kernels(config.model.cpu_kernels, model, plan.device)
    return LoadedModel(
        model_id=plan.source.name,
        model=model,
        tokenizer=tokenizer,
        plan=plan,
        vocab_size=hf_config.vocab_size,
        eos_token_ids=_eos_token_ids(hf_config, tokenizer),
    )


def _attention_backend(
    choice: str, model: nn.Module, dtype: torch.dtype, device: torch.device
) -> TorchPagedAttention:
    if choice == "torch":
        return TorchPagedAttention()
    applies = device.type == "cpu" and all(
        kernel_supports(dtype, layer.head_dim, layer.group_size) for layer in model.cache_layout
    )
    kernel = load_kernel() if applies else None
    if kernel is None and choice == "kernel":
        raise ConfigError(
            "attention_backend: the C decode kernel needs a CPU device, float32 or bfloat16, head_dim <= 256 "
            "and a working C compiler (cc or gcc)"
        )
    return KernelPagedAttention(kernel) if kernel is not None else TorchPagedAttention()


def _use_cpu_kernels(choice: str, model: nn.Module, device: torch.device) -> None:
    if choice == "torch":
        return
    kernel = load_ops_kernel() if device.type == "cpu" else None
    if kernel is None and choice in ("kernel", "per-op"):
        raise ConfigError("cpu_kernels: the C kernels need a CPU device and a working C compiler (cc or gcc)")
    if kernel is not None:
        ops = CpuKernelOps(kernel, native_bf16=native_bf16_flag() is not None)
        if ops.packed_gemm is not None:
            pack_model(model)
        use_ops(model, ops)
        if choice != "per-op":
            model.decode_step = CpuDecodeStep.for_model(model, ops)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _dtype(name: str, hf_config: object, device: torch.device) -> tuple[torch.dtype, str]:
    if name != "auto":
        return getattr(torch, name), "as configured"
    if device.type == "cpu":
        flag = native_bf16_flag()
        if flag is not None:
            return torch.bfloat16, f"auto: this CPU computes bfloat16 natively ({flag}), about 2x float32"
        return torch.float32, "auto: this CPU has no native bfloat16 arithmetic, so float32 is faster"
    declared = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(declared, torch.dtype) and declared != torch.float32:
        return declared, "auto: the checkpoint's own dtype"
    return torch.bfloat16, "auto: half precision on the GPU"


def _max_model_len(requested: int | None, hf_config: object) -> int:
    limit = getattr(hf_config, "max_position_embeddings", None) or 2048
    if requested is None:
        return limit
    if requested > limit:
        raise ConfigError(f"max_model_len: {requested} exceeds what the model supports ({limit})")
    return requested


def _num_blocks(
    config: EngineConfig, kv_bytes_per_token: int, max_model_len: int, device: torch.device
) -> tuple[int, str]:
    """-> (blocks, why that many)."""
    cache = config.cache
    block_bytes = kv_bytes_per_token * cache.block_size
    if cache.num_blocks is not None:
        return cache.num_blocks, "num_blocks as configured"
    if cache.kv_cache_memory is not None:
        num_blocks, reason = cache.kv_cache_memory // block_bytes, "kv_cache_memory as configured"
    else:
        max_num_seqs = config.scheduler.max_num_seqs
        wanted_tokens = max(max_model_len, max_num_seqs * KV_TOKENS_PER_SEQ)
        num_blocks = -(-wanted_tokens // cache.block_size)
        reason = (
            f"the larger of one context ({max_model_len}) and {max_num_seqs} sequences x "
            f"{KV_TOKENS_PER_SEQ} tokens"
        )
        free = free_memory_bytes(device)
        if free is None:
            raise ConfigError("kv_cache_memory: cannot read the free memory here; set it explicitly")
        cap_blocks = int(free * cache.kv_cache_fraction) // block_bytes
        if cap_blocks < num_blocks:
            num_blocks = cap_blocks
            reason = (
                f"{cache.kv_cache_fraction:.0%} of the {free / 2**30:.1f} GiB free, less than "
                f"{wanted_tokens} tokens ({reason})"
            )
    if num_blocks < 1:
        raise ConfigError(f"kv_cache_memory: the budget holds no KV block ({block_bytes} bytes each)")
    return num_blocks, reason


def _eos_token_ids(hf_config: object, tokenizer: object) -> tuple[int, ...]:
    ids: set[int] = set()
    for value in (getattr(hf_config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(value)
    return tuple(sorted(ids))
