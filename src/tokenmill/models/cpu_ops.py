"""The decode step's operators on the CPU, by kernels/cpu_ops.c (built on first use by
`native.compile_library`, inside kernels/decode_step.c; where it cannot be, `load_ops_kernel` returns None
and TorchOps run).

Matrix products: torch's bfloat16 GEMM streams a weight matrix at a few GB/s when the other operand has one
row, so a decode step spent most of its time in `aten::mm`; the kernel reads each weight once at close to
memory speed, with AVX-512 BF16 dot products or, on CPUs without AVX-512, AVX2 FMAs on weights widened to
float32 (on SmolLM2's shapes: 3-6x torch at one row; it takes up to 8 rows with AVX2 and 64 with AVX-512,
see skinny_gemm_max_rows). float32 products of few rows go through the same kernel. Larger products (long
prefill chunks, big batches) are compute-bound and stay with torch's GEMM. With AVX-512 BF16, bfloat16
projections are packed at load (models/packed_linear.py) and every product against them, of any size, goes
through the packed kernel (`linear_packed`), faster than both at every size (by AMX tile multiplies where
the CPU has them). int8 weights (models/quantization.py) go through an int8 kernel (AVX-512 VNNI, or AVX2)
up to 16 rows and a dequantised copy beyond. The fused small operators (residual add + RMSNorm, rotary,
SiLU * up) run for float32 and bfloat16 and replace several torch calls each.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tokenmill.models.layers import RotaryEmbedding, TorchOps
from tokenmill.models.native import compile_library

MAX_Q8_ROWS = 16
"""Up to this many rows the int8 kernel computes (its Q8_MAX_ROWS); beyond, torch's GEMM on a dequantised
copy."""

_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}
_i64, _ptr, _f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
_GEMM = [_ptr, _i64, _ptr, _ptr, _ptr, _i64, _i64, _i64, _i64, ctypes.c_int]
_GEMM_Q8 = [_ptr, _i64, _ptr, _ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64, _i64, ctypes.c_int]
_NORM = [_ptr, _i64, _ptr, _i64, _ptr, _ptr, _i64, _i64, _i64, _f32]
_ROTARY = [_ptr, _i64, _i64, _i64, _i64, _ptr, _ptr, _ptr]
_SILU_MUL = [_ptr, _i64, _ptr, _i64, _i64, _i64]
_DECODE_STEP = [_ptr, _ptr, _ptr, _ptr, _ptr, _ptr, ctypes.c_int]
_SIGNATURES = {
    "skinny_gemm_supported": (ctypes.c_int, []),
    "skinny_gemm_f32_supported": (ctypes.c_int, []),
    "skinny_gemm_q8_supported": (ctypes.c_int, []),
    "packed_gemm_supported": (ctypes.c_int, []),
    "packed_gemm_bf16": (ctypes.c_int, _GEMM),
    "skinny_gemm_max_rows": (ctypes.c_int, [ctypes.c_int]),
    "skinny_gemm_bf16": (ctypes.c_int, _GEMM),
    "skinny_gemm_f32": (ctypes.c_int, _GEMM),
    **{f"add_rms_norm_{suffix}": (None, _NORM) for suffix in _SUFFIX.values()},
    **{f"rotary_{suffix}": (None, _ROTARY) for suffix in _SUFFIX.values()},
    **{f"silu_mul_{suffix}": (None, _SILU_MUL) for suffix in _SUFFIX.values()},
    **{f"decode_step_{suffix}": (ctypes.c_int, _DECODE_STEP) for suffix in _SUFFIX.values()},
    **{f"skinny_gemm_q8_{suffix}": (ctypes.c_int, _GEMM_Q8) for suffix in _SUFFIX.values()},
    "dequantize_q8": (None, [_ptr, _ptr, _ptr, _i64, _i64, ctypes.c_int, ctypes.c_int]),
    "read_memory": (ctypes.c_uint64, [_ptr, _i64, ctypes.c_int]),
}


@functools.cache
def load_ops_kernel() -> ctypes.CDLL | None:
    # -fopenmp links libgomp.so.1: torch has loaded that same library (by that name), so the kernel's
    # parallel loops run on torch's OpenMP thread pool rather than a second one competing for the cores.
    library = compile_library("decode_step.c", ("-fopenmp",))
    if library is None:
        return None
    for symbol, (restype, argtypes) in _SIGNATURES.items():
        function = getattr(library, symbol)
        function.restype, function.argtypes = restype, argtypes
    return library


@dataclass(frozen=True, slots=True)
class KernelRope:
    """A step's rotary input for the kernel: the positions and the float32 tables they index."""

    positions: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor


def _kernel_ready(
    x: torch.Tensor, other: torch.Tensor | None = None, third: torch.Tensor | None = None
) -> bool:
    """2-D CPU tensors of one dtype the kernels handle, rows contiguous (None: an absent optional one).
    Called a few hundred times a step: plain attribute checks, no generators."""
    if x.dtype not in _SUFFIX or not x.is_cpu or x.dim() != 2 or x.stride(1) != 1:
        return False
    for t in (other, third):
        if t is not None and (t.dtype != x.dtype or not t.is_cpu or t.stride(-1) != 1):
            return False
    return True


class CpuKernelOps(TorchOps):
    """TorchOps with the kernel taking every call it handles; the rest fall through to torch."""

    def __init__(self, kernel: ctypes.CDLL, native_bf16: bool = True) -> None:
        self.kernel = kernel
        self.widen_bf16 = not native_bf16
        """Without native bfloat16 arithmetic (AVX2 CPUs) torch's bfloat16 GEMM runs ~7x slower than its
        float32 one: larger bfloat16 products are computed in float32 and rounded back."""
        self.gemms = {}
        """dtype -> the few-row product for it, where this CPU has one."""
        if kernel.skinny_gemm_supported():
            self.gemms[torch.bfloat16] = kernel.skinny_gemm_bf16
        if kernel.skinny_gemm_f32_supported():
            self.gemms[torch.float32] = kernel.skinny_gemm_f32
        self.max_gemm_rows = {
            dtype: kernel.skinny_gemm_max_rows(dtype == torch.bfloat16) for dtype in self.gemms
        }
        """dtype -> up to how many rows its product kernel takes (more rows: torch's GEMM)."""
        self.gemms_q8 = {}
        """dtype of the activations -> the few-row product with int8 weights, where this CPU has one."""
        if kernel.skinny_gemm_q8_supported():
            self.gemms_q8 = {
                dtype: getattr(kernel, f"skinny_gemm_q8_{sfx}") for dtype, sfx in _SUFFIX.items()
            }
        self.dequantize_q8 = kernel.dequantize_q8
        self.packed_gemm = kernel.packed_gemm_bf16 if kernel.packed_gemm_supported() else None
        """The product against packed bfloat16 weights (models/packed_linear.py), where this CPU has it."""
        self.norms = {dtype: getattr(kernel, f"add_rms_norm_{suffix}") for dtype, suffix in _SUFFIX.items()}
        self.rotaries = {dtype: getattr(kernel, f"rotary_{suffix}") for dtype, suffix in _SUFFIX.items()}
        self.silu_muls = {dtype: getattr(kernel, f"silu_mul_{suffix}") for dtype, suffix in _SUFFIX.items()}
        self.num_threads = torch.get_num_threads()

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        gemm = self.gemms.get(x.dtype)
        if not (
            gemm is not None
            and x.shape[0] <= self.max_gemm_rows[x.dtype]
            and _kernel_ready(x, weight, bias)
            and weight.is_contiguous()
            and x.shape[1] == weight.shape[1]
        ):
            return self._torch_linear(x, weight, bias)
        return self._product(gemm, x, weight, bias, weight.shape[0])

    def _torch_linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.widen_bf16 and x.dtype == weight.dtype == torch.bfloat16:
            wide_bias = None if bias is None else bias.float()
            return super().linear(x.float(), weight.float(), wide_bias).to(torch.bfloat16)
        return super().linear(x, weight, bias)

    def linear_packed(
        self, x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int
    ) -> torch.Tensor:
        if not (
            self.packed_gemm is not None
            and x.dtype == torch.bfloat16
            and _kernel_ready(x, bias)
            and x.shape[1] == 2 * packed.shape[1]
        ):
            return super().linear_packed(x, packed, bias, out_features)
        return self._product(self.packed_gemm, x, packed, bias, out_features)

    def _product(
        self,
        gemm: Callable[..., int],
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        out_features: int,
    ) -> torch.Tensor:
        """y = x w^T (+ bias) by a product kernel taking cpu_ops.c's GEMM arguments; `weight` in its layout."""
        out = torch.empty((x.shape[0], out_features), dtype=x.dtype)
        status = gemm(
            x.data_ptr(), x.stride(0), weight.data_ptr(), None if bias is None else bias.data_ptr(),
            out.data_ptr(), out.stride(0), x.shape[0], out_features, x.shape[1], self.num_threads,
        )  # fmt: skip
        if status:
            raise RuntimeError(f"product kernel failed with status {status}")
        return out

    def linear_int8(
        self,
        x: torch.Tensor,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        block_sums: torch.Tensor,
        bias: torch.Tensor | None,
    ) -> torch.Tensor:
        if not (x.dtype in _SUFFIX and _kernel_ready(x, bias) and qweight.is_contiguous()):
            return super().linear_int8(x, qweight, scales, block_sums, bias)
        rows, (outer, inner) = x.shape[0], qweight.shape
        gemm = self.gemms_q8.get(x.dtype)
        if rows > MAX_Q8_ROWS or gemm is None:  # compute-bound: torch's GEMM on a dequantised copy
            weight = torch.empty((outer, inner), dtype=x.dtype)
            self.dequantize_q8(
                qweight.data_ptr(), scales.data_ptr(), weight.data_ptr(), outer, inner, self.num_threads,
                x.dtype == torch.bfloat16,
            )  # fmt: skip
            return self._torch_linear(x, weight, bias)
        out = torch.empty((rows, outer), dtype=x.dtype)
        status = gemm(
            x.data_ptr(), x.stride(0), qweight.data_ptr(), scales.data_ptr(), block_sums.data_ptr(),
            None if bias is None else bias.data_ptr(), out.data_ptr(), out.stride(0), rows, outer, inner,
            self.num_threads,
        )  # fmt: skip
        if status:
            raise RuntimeError(f"int8 GEMM kernel failed with status {status}")
        return out

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """With a residual, adds x into it in place (the stream is this forward pass's own tensor)."""
        if not (_kernel_ready(x, weight, residual) and weight.is_contiguous()):
            return super().add_rms_norm(x, residual, weight, eps)
        out = torch.empty(x.shape, dtype=x.dtype)
        self.norms[x.dtype](
            x.data_ptr(), x.stride(0), None if residual is None else residual.data_ptr(),
            0 if residual is None else residual.stride(0), weight.data_ptr(), out.data_ptr(), out.stride(0),
            x.shape[0], x.shape[1], eps,
        )  # fmt: skip
        return out, x if residual is None else residual

    def rope(self, rotary: RotaryEmbedding, positions: torch.Tensor, dtype: torch.dtype) -> object:
        if dtype not in _SUFFIX or positions.device.type != "cpu":
            return super().rope(rotary, positions, dtype)
        positions = positions.to(torch.int64).contiguous()
        # The kernel indexes the tables unchecked; torch's lookup would raise here, and so does this.
        if positions.numel() and not 0 <= int(positions.min()) <= int(positions.max()) < rotary.cos.shape[0]:
            raise IndexError(f"rotary position out of range 0..{rotary.cos.shape[0] - 1}")
        return KernelRope(positions, rotary.cos, rotary.sin)

    def apply_rotary(
        self, q: torch.Tensor, k: torch.Tensor, rope: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """In place, both in one call: q and k are adjacent heads of this step's fresh projection output."""
        if not isinstance(rope, KernelRope):
            return super().apply_rotary(q, k, rope)
        tokens, heads, head_dim = q.shape[0], q.shape[1] + k.shape[1], q.shape[2]
        # One token's rows may report any stride for their size-1 first dimension: compare the others.
        adjacent = q.stride()[1:] == k.stride()[1:] == (head_dim, 1) and (
            tokens == 1 or q.stride(0) == k.stride(0)
        )
        if not (adjacent and k.data_ptr() == q.data_ptr() + q.shape[1] * head_dim * q.element_size()):
            tables = rope.cos[rope.positions].to(q.dtype), rope.sin[rope.positions].to(q.dtype)
            return super().apply_rotary(q, k, (tables[0].unsqueeze(1), tables[1].unsqueeze(1)))
        self.rotaries[q.dtype](
            q.data_ptr(), q.stride(0), q.shape[0], heads, head_dim, rope.positions.data_ptr(),
            rope.cos.data_ptr(), rope.sin.data_ptr(),
        )  # fmt: skip
        return q, k

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        if not _kernel_ready(gate_up):
            return super().silu_mul(gate_up)
        rows, width = gate_up.shape
        out = torch.empty((rows, width // 2), dtype=gate_up.dtype)
        self.silu_muls[gate_up.dtype](
            gate_up.data_ptr(), gate_up.stride(0), out.data_ptr(), out.stride(0), rows, width // 2
        )
        return out
