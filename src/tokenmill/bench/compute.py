"""Offline throughput against the machine's compute: the useful FLOPs of a workload (what the model must
compute for its requests, nothing padded or computed twice) per second, over the measured peak of a large
matrix product in the serving dtype. Offline work is compute-bound, so this is its roofline, as the memory
bandwidth is single-stream decode's (bench/decode.py)."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from torch import nn

from tokenmill.models.layers import Linear
from tokenmill.models.packed_linear import PackedLinear
from tokenmill.models.quantization import Int8Linear

PEAK_SIZE = 2048
"""Side of the square product the peak is measured on: large enough for torch's GEMM to reach its best."""


def gemm_flops_per_s(dtype: torch.dtype, size: int = PEAK_SIZE, passes: int = 5) -> float:
    """FLOP/s of torch's `size`-square matrix product in `dtype` on all threads, best of `passes`."""
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    torch.mm(a, b)  # warm: the first call sets up torch's threads and buffers
    best = float("inf")
    for _ in range(passes):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def gemm_peak(dtype: torch.dtype, size: int = PEAK_SIZE) -> dict[str, float]:
    """The measured GEMM rates that can serve `dtype`, by dtype name, and "peak", the best of them: a
    bfloat16 model's large products may run in float32 (the engine does so on CPUs without native bfloat16
    arithmetic, where torch's bfloat16 GEMM is several times slower), so float32's rate counts for it."""
    dtypes = [dtype, torch.float32] if dtype == torch.bfloat16 else [dtype]
    rates = {str(d).removeprefix("torch."): gemm_flops_per_s(d, size) for d in dtypes}
    return {**rates, "peak": max(rates.values())}


def useful_flops(model: nn.Module, prompt_lens: Sequence[int], output_lens: Sequence[int]) -> float | None:
    """FLOPs a Llama-family decoder needs for these requests: every token it reads (the prompt, then each
    generated token but the last) through every layer's projections and causal attention over the tokens
    before it, and the output head once per generated token. None for a model whose layers hold anything
    but dense, packed or int8 projections (mixture-of-experts, latent attention): counting those is not done
    here."""
    projections = [m for m in model.layers.modules() if type(m) in (Linear, Int8Linear, PackedLinear)]
    counted = {id(p) for m in projections for p in m.parameters()}
    if any(p.dim() > 1 and id(p) not in counted for p in model.layers.parameters()):
        return None
    per_token = sum(2 * m.in_features * m.out_features for m in projections)
    # QK^T and attention-weighted V: 2 FLOPs per multiply-add, per head dimension, per attended position.
    per_position = sum(4 * layer.self_attn.num_heads * layer.self_attn.head_dim for layer in model.layers)
    head = 2 * model.embed_tokens.weight.numel()  # the output head is vocabulary x hidden, tied or not
    total = 0
    for prompt_len, output_len in zip(prompt_lens, output_lens, strict=True):
        tokens = prompt_len + output_len - 1
        total += tokens * per_token + per_position * tokens * (tokens + 1) // 2 + output_len * head
    return float(total)
