"""Defaults that fit the machine: `plan_engine` picks the dtype from what the CPU computes natively and sizes the
KV cache by the work it serves (one context, or max_num_seqs sequences of KV_TOKENS_PER_SEQ tokens), never
by how much memory happens to be free, and says why; nothing is loaded to find out."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.tiny_models import load_reference
from tokenmill.config import ConfigError, EngineConfig
from tokenmill.engine import setup
from tokenmill.engine.setup import KV_TOKENS_PER_SEQ, plan_engine

# tiny_models: 2 layers x 2 KV heads x head_dim 16 x (K and V) x 4 bytes (float32) per token.
TINY_KV_BYTES_PER_TOKEN_F32 = 2 * 2 * 16 * 2 * 4


def _plan(tiny_llama_dir: Path, **kwargs: object) -> setup.EnginePlan:
    return plan_engine(EngineConfig.from_kwargs(str(tiny_llama_dir), **kwargs))


def test_auto_dtype_is_bfloat16_only_where_the_cpu_computes_it(
    tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(setup, "native_bf16_flag", lambda: "avx512_bf16")
    native = _plan(tiny_llama_dir)
    assert native.dtype == torch.bfloat16 and "avx512_bf16" in native.dtype_reason
    monkeypatch.setattr(setup, "native_bf16_flag", lambda: None)
    emulated = _plan(tiny_llama_dir)
    assert emulated.dtype == torch.float32 and "no native bfloat16" in emulated.dtype_reason
    assert _plan(tiny_llama_dir, dtype="bfloat16").dtype == torch.bfloat16  # asked for: always honoured


def test_the_default_kv_cache_holds_one_context_or_every_sequence(tiny_llama_dir: Path) -> None:
    one_context = _plan(tiny_llama_dir, dtype="float32", max_num_seqs=1)  # the model's context: 512
    assert one_context.num_blocks * one_context.block_size == 512
    assert one_context.kv_bytes_per_token == TINY_KV_BYTES_PER_TOKEN_F32
    many = _plan(tiny_llama_dir, dtype="float32", max_num_seqs=32)
    assert many.num_blocks * many.block_size == 32 * KV_TOKENS_PER_SEQ
    assert many.kv_cache_bytes == 32 * KV_TOKENS_PER_SEQ * TINY_KV_BYTES_PER_TOKEN_F32
    assert "32 sequences" in many.kv_reason and "32 sequences" in many.describe()


def test_the_default_never_takes_more_than_its_share_of_free_memory(
    tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    free = 64 * 1024 * TINY_KV_BYTES_PER_TOKEN_F32  # room for 64k tokens; the default share is 20%
    monkeypatch.setattr(setup, "free_memory_bytes", lambda device: free)
    plan = _plan(tiny_llama_dir, dtype="float32", max_num_seqs=1024)  # would want 128k tokens
    assert plan.kv_cache_bytes <= 0.2 * free
    assert "20% of the" in plan.kv_reason


def test_a_small_budget_shortens_the_advertised_context(tiny_llama_dir: Path) -> None:
    plan = _plan(tiny_llama_dir, dtype="float32", kv_cache_memory=160 * TINY_KV_BYTES_PER_TOKEN_F32)
    assert plan.max_model_len == plan.num_blocks * plan.block_size == 160  # of the model's 512
    assert "the context is cut to the 160 tokens" in plan.kv_reason
    with pytest.raises(ConfigError, match="kv_cache_memory"):
        _plan(tiny_llama_dir, dtype="float32", kv_cache_memory=4096, max_model_len=512)


def test_weights_are_counted_once_when_tied(tiny_llama_dir: Path) -> None:
    plan = _plan(tiny_llama_dir, dtype="float32")
    reference = load_reference(tiny_llama_dir)  # tied input and output embeddings: one tensor
    assert plan.weight_bytes == sum(p.numel() for p in reference.parameters()) * 4
