"""The CPU attention backend: decode attention by a small C kernel (kernels/paged_decode.c) that reads K/V
straight from the paged cache; prefill chunks still go through SDPA.

The kernel is compiled with the system C compiler on first use (about a second) into the data directory,
keyed by its source, the compiler flags and the CPU, and loaded with ctypes: no torch headers, no build
step at install time. Where no compiler works, `load_kernel` returns None and the torch backend is used.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import platform
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from tokenmill.config import default_data_dir
from tokenmill.models.attention import TorchPagedAttention

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("kernels") / "paged_decode.c"
_FLAGS = (
    "-O3", "-march=native", "-shared", "-fPIC",
    # The parts of -ffast-math the kernel's vectorised reductions need. Not -ffast-math itself (nor -Ofast,
    # -funsafe-math-optimizations): linked into a shared object it adds crtfastmath.o, whose constructor
    # flushes denormals to zero in the whole process that loads the library (Python floats, torch).
    # Not -ffinite-math-only either: the softmax starts its running maximum at -INFINITY.
    "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math", "-freciprocal-math",
)  # fmt: skip
_SYMBOLS = {torch.float32: "paged_decode_f32", torch.bfloat16: "paged_decode_bf16"}
_i64, _ptr = ctypes.c_int64, ctypes.c_void_p


@functools.cache
def load_kernel() -> ctypes.CDLL | None:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        logger.warning("no C compiler found: using the torch attention backend (slower decode on CPU)")
        return None
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join(_FLAGS).encode() + _cpu_identity().encode()).hexdigest()[:16]
    library = default_data_dir() / "kernels" / f"paged_decode-{key}.so"
    if not library.exists():
        library.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=library.parent) as scratch:
            built = Path(scratch) / library.name
            result = subprocess.run(
                [compiler, *_FLAGS, str(_SOURCE), "-o", str(built), "-lm"], capture_output=True, text=True
            )
            if result.returncode != 0:
                logger.warning("compiling the CPU attention kernel failed, using torch:\n%s", result.stderr)
                return None
            built.replace(library)  # atomic: concurrent builders each publish a complete file
    kernel = ctypes.CDLL(str(library))
    for symbol in _SYMBOLS.values():
        function = getattr(kernel, symbol)
        function.restype = ctypes.c_int
        function.argtypes = [_ptr] * 6 + [_i64] * 7 + [ctypes.c_float]
    return kernel


def _cpu_identity() -> str:
    """-march=native code is only valid on the CPU that built it; the data directory may be shared."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line for line in cpuinfo if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return platform.machine() + platform.processor() + flags


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
                k_cache.shape[0], q.shape[2], k_cache.shape[1], block_tables.shape[1], block_size, scale,
            )  # fmt: skip

        statuses = list(self.pool.map(run, slices)) if len(slices) > 1 else [run(slices[0])]
        if any(statuses):
            raise RuntimeError(f"paged decode kernel failed with status {max(statuses)}")
        return out


def kernel_supports(dtype: torch.dtype, head_dim: int, group_size: int) -> bool:
    """The shapes the kernel's fixed-size buffers hold (see MAX_HEAD_DIM and MAX_GROUP in the C source)."""
    return dtype in _SYMBOLS and head_dim <= 256 and group_size <= 16
