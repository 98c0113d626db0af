"""The CPU attention backend: decode attention by a small C kernel (kernels/paged_decode.c) that reads K/V
straight from the paged cache; prefill chunks still go through SDPA. The kernel is built on first use
(`native.compile_library`); where it cannot be, `load_kernel` returns None and the torch backend is used.
"""

from __future__ import annotations

import ctypes
import functools
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from tokenmill.models.attention import TorchPagedAttention
from tokenmill.models.native import compile_library

_SYMBOLS = {torch.float32: "paged_decode_f32", torch.bfloat16: "paged_decode_bf16"}
_i64, _ptr = ctypes.c_int64, ctypes.c_void_p


@functools.cache
def load_kernel() -> ctypes.CDLL | None:
    kernel = compile_library("paged_decode.c")
    if kernel is None:
        return None
    for symbol in _SYMBOLS.values():
        function = getattr(kernel, symbol)
        function.restype = ctypes.c_int
        function.argtypes = [_ptr] * 6 + [_i64] * 8 + [ctypes.c_float]
    return kernel


class KernelPagedAttention(TorchPagedAttention):
    """Runs the kernel on contiguous slices of the decode batch from a few threads: ctypes releases the GIL,
    and plain threads avoid a second OpenMP runtime spinning against torch's on the same cores."""

    def __init__(self, kernel: ctypes.CDLL, num_threads: int | None = None) -> None:
        self.kernel = kernel
        self.num_threads = num_threads or torch.get_num_threads()
        self.pool = ThreadPoolExecutor(self.num_threads, thread_name_prefix="paged-decode")

    def prepare_decodes(
        self, block_tables: np.ndarray, context_lens: np.ndarray, block_size: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, int, list[tuple[int, int]]]:
        # Split the rows into one slice per thread with about equal context (the work is linear in it).
        bounds = np.searchsorted(
            np.cumsum(context_lens), np.linspace(0, context_lens.sum(), self.num_threads + 1)
        )
        edges = sorted({0, len(context_lens), *(int(b) + 1 for b in bounds[1:-1])})
        slices = [(a, min(b, len(context_lens))) for a, b in zip(edges, edges[1:], strict=False) if a < b]
        return torch.from_numpy(block_tables), torch.from_numpy(context_lens), block_size, slices

    def decode(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        tables: tuple[torch.Tensor, torch.Tensor, int, list[tuple[int, int]]],
        scale: float,
        window: int | None = None,
    ) -> torch.Tensor:
        block_tables, context_lens, block_size, slices = tables
        q = q.contiguous()
        out = torch.empty_like(q)
        function = getattr(self.kernel, _SYMBOLS[q.dtype])

        def run(rows: tuple[int, int]) -> int:
            first, last = rows
            return function(
                q[first].data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), block_tables[first].data_ptr(),
                context_lens[first:].data_ptr(), out[first].data_ptr(), last - first, q.shape[1],
                k_cache.shape[0], q.shape[2], k_cache.shape[1], block_tables.shape[1], block_size, window or 0,
                scale,
            )  # fmt: skip

        statuses = list(self.pool.map(run, slices)) if len(slices) > 1 else [run(slices[0])]
        if any(statuses):
            raise RuntimeError(f"paged decode kernel failed with status {max(statuses)}")
        return out


def kernel_supports(dtype: torch.dtype, head_dim: int, group_size: int) -> bool:
    """The shapes the kernel's fixed-size buffers hold (see MAX_HEAD_DIM and MAX_GROUP in the C source)."""
    return dtype in _SYMBOLS and head_dim <= 256 and group_size <= 16
