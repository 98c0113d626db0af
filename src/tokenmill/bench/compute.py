"""The machine's rooflines, measured, and what a workload asks of them.

Offline throughput is judged against compute: the useful FLOPs of a workload (what the model must compute
for its requests, nothing padded or computed twice) per second, over the measured peak of a large matrix
product in the serving dtype. Single-stream decode is judged against memory (bench/decode.py): the bytes a
step reads over the measured read bandwidth. A mixed workload is bound by both: its decode passes read every
weight whatever the batch, so where a CPU computes far faster than it reads memory (AMX), the bytes alone
can keep any engine below a share of the compute peak; `least_bytes_read` says how far."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from torch import nn

from tokenmill.engine.model_runner import kv_bytes_per_block
from tokenmill.models.layers import Linear
from tokenmill.models.packed_linear import PackedLinear
from tokenmill.models.quantization import Int8Linear, weight_bytes_per_step

BANDWIDTH_BUFFER_BYTES = 1 << 30
"""Far larger than any CPU cache, so the probe reads from memory as a decode step's weights are."""

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


def measure_read_bandwidth(passes: int = 5) -> float | None:
    """Bytes/s all threads read from memory at best; None where the kernel library cannot be built."""
    from tokenmill.models.cpu_ops import load_ops_kernel

    kernel = load_ops_kernel()
    if kernel is None:
        return None
    buffer = torch.ones(BANDWIDTH_BUFFER_BYTES, dtype=torch.uint8)  # written once: pages are resident
    best = float("inf")
    for _ in range(passes):
        start = time.perf_counter()
        kernel.read_memory(buffer.data_ptr(), buffer.numel(), torch.get_num_threads())
        best = min(best, time.perf_counter() - start)
    return BANDWIDTH_BUFFER_BYTES / best


def kv_bytes_per_token(model: nn.Module) -> int:
    """Bytes of one token's cached K/V over all layers, in the model's dtype (the cache's)."""
    return kv_bytes_per_block(model, 1, model.embed_tokens.weight.dtype)


def least_bytes_read(
    model: nn.Module, prompt_lens: Sequence[int], output_lens: Sequence[int]
) -> dict[str, int]:
    """Bytes any engine reads for these requests where neither the weights nor the KV cache stay in the
    CPU's caches: "weights", every weight once per forward pass, of which there are at least as many as
    the longest request's output tokens (each is the input of the pass that computes the next); and
    "cache", for every generated token after the first, the cached K/V of the tokens before its input."""
    passes = max(output_lens, default=0)
    # The n - 1 decodes of a request read contexts of p, p + 1, ..., p + n - 2 cached tokens.
    positions = sum(
        (n - 1) * p + (n - 1) * (n - 2) // 2 for p, n in zip(prompt_lens, output_lens, strict=True)
    )
    return {"weights": passes * weight_bytes_per_step(model), "cache": positions * kv_bytes_per_token(model)}


def memory_floor(
    model: nn.Module,
    prompt_lens: Sequence[int],
    output_lens: Sequence[int],
    bandwidth: float,
    compute_seconds: float,
) -> dict:
    """The bench's report of `least_bytes_read` at `bandwidth` bytes/s, against `compute_seconds` of useful
    work at the compute peak: no run is faster than the longer of the two."""
    least = least_bytes_read(model, prompt_lens, output_lens)
    seconds = sum(least.values()) / bandwidth
    return {
        "least_bytes_read": least,
        "read_bandwidth_gb_s": bandwidth / 1e9,
        "memory_floor_seconds": seconds,
        "best_possible_share": compute_seconds / max(compute_seconds, seconds),
    }


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
