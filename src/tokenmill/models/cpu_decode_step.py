"""A decode step of a Llama-family model as one C call (kernels/decode_step.c) instead of ~300 from Python.

On a small model the operators of a decode step each take microseconds and Python's dispatch around them
(module calls, ctypes, tensor allocation) took more than half the step. The whole-step kernel runs the same
operators as CpuKernelOps in the same order, so its hidden states are bit for bit those of the per-operator
path (tests/models/test_cpu_decode_step.py). It takes steps whose every row is a query over its own
sequence's cache (decodes, and prompt tokens the model runner lays out as such: engine/model_runner.py), up
to `max_rows` of them, without LoRA adapters. Everything else goes through the modules as before.
"""

from __future__ import annotations

import ctypes
import sys

import torch
from torch import nn

from tokenmill.models.attention import AttentionMetadata
from tokenmill.models.cpu_attention import KernelPagedAttention
from tokenmill.models.cpu_ops import _SUFFIX, MAX_Q8_ROWS, CpuKernelOps, KernelRope
from tokenmill.models.layers import GatedMLP, Linear, RMSNorm, RotaryEmbedding
from tokenmill.models.llama import Attention, DecoderLayer, LlamaForCausalLM
from tokenmill.models.packed_linear import PackedLinear
from tokenmill.models.quantization import Int8Linear

_i64, _ptr, _f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float


class _Matrix(ctypes.Structure):
    _fields_ = [
        ("kind", _i64), ("weight", _ptr), ("scales", _ptr), ("block_sums", _ptr), ("bias", _ptr),
        ("rows", _i64), ("cols", _i64),
    ]  # fmt: skip


_DENSE, _INT8, _PACKED = 0, 1, 2


class _Layer(ctypes.Structure):
    _fields_ = [
        ("input_norm", _ptr), ("post_norm", _ptr), ("qkv", _Matrix), ("o", _Matrix), ("gate_up", _Matrix),
        ("down", _Matrix), ("k_cache", _ptr), ("v_cache", _ptr), ("window", _i64),
    ]  # fmt: skip


class _Model(ctypes.Structure):
    _fields_ = [
        ("num_layers", _i64), ("hidden", _i64), ("num_heads", _i64), ("num_kv_heads", _i64),
        ("head_dim", _i64), ("intermediate", _i64), ("num_slots", _i64), ("block_size", _i64),
        ("eps", _f32), ("scale", _f32),
    ]  # fmt: skip


class _Batch(ctypes.Structure):
    _fields_ = [
        ("num_seqs", _i64), ("max_blocks", _i64), ("positions", _ptr), ("slots", _ptr),
        ("block_tables", _ptr), ("context_lens", _ptr), ("cos", _ptr), ("sin", _ptr),
    ]  # fmt: skip


def _pointer(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def _matrix(module: nn.Module) -> _Matrix:
    if isinstance(module, PackedLinear):
        return _Matrix(
            _PACKED, module.packed.data_ptr(), None, None, _pointer(module.bias), module.out_features,
            module.in_features,
        )  # fmt: skip
    if isinstance(module, Int8Linear):
        return _Matrix(
            _INT8, module.qweight.data_ptr(), module.scales.data_ptr(), module.block_sums.data_ptr(),
            _pointer(module.bias), module.out_features, module.in_features,
        )  # fmt: skip
    return _Matrix(_DENSE, module.weight.data_ptr(), None, None, _pointer(module.bias), *module.weight.shape)


class CpuDecodeStep:
    """Called by the model's forward with a step's embeddings; returns its final hidden states, or None for
    a step it does not take."""

    def __init__(self, ops: CpuKernelOps, model: nn.Module) -> None:
        self.ops = ops
        self.model = model
        dtype = model.embed_tokens.weight.dtype
        self.function = getattr(ops.kernel, f"decode_step_{_SUFFIX[dtype]}")
        self._caches: list | None = None
        self._layers: ctypes.Array | None = None
        self._shape: _Model | None = None
        self.max_rows = min(_max_rows(p, dtype, ops) for layer in model.layers for p in _projections(layer))
        """The most rows a step takes: as many as its products' kernels take."""

    @classmethod
    def for_model(cls, model: nn.Module, ops: CpuKernelOps) -> CpuDecodeStep | None:
        """The step for `model`, or None where the kernel does not compute what the model's modules would."""
        if type(model).forward is not LlamaForCausalLM.forward:
            return None
        dtype = model.embed_tokens.weight.dtype
        if not (
            dtype in ops.gemms
            and isinstance(model.attention_backend, KernelPagedAttention)
            and type(model.rotary) is RotaryEmbedding
            and type(model.norm) is RMSNorm
        ):
            return None
        eps = model.norm.eps
        for layer in model.layers:
            if not (
                type(layer) is DecoderLayer
                and type(layer.self_attn) is Attention
                and type(layer.mlp) is GatedMLP
            ):
                return None
            if not (
                type(layer.input_layernorm) is type(layer.post_attention_layernorm) is RMSNorm
                and layer.input_layernorm.eps == layer.post_attention_layernorm.eps == eps
                and layer.self_attn.scale == model.layers[0].self_attn.scale
                and all(_kernel_computes(p, dtype, ops) for p in _projections(layer))
            ):
                return None
        return cls(ops, model)

    def __call__(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
    ) -> torch.Tensor | None:
        rows = x.shape[0]
        if (
            meta.prefills
            or rows != meta.num_decodes
            or not 0 < rows <= self.max_rows
            or not x.is_contiguous()
        ):
            return None
        block_tables, context_lens, block_size, _ = meta.decodes
        rope = self.ops.rope(self.model.rotary, positions, x.dtype)
        assert isinstance(rope, KernelRope)
        if kv_caches is not self._caches:
            self._build(kv_caches, block_size)
        batch = _Batch(
            rows, block_tables.shape[1], rope.positions.data_ptr(), meta.slot_mapping.data_ptr(),
            block_tables.data_ptr(), context_lens.data_ptr(), rope.cos.data_ptr(), rope.sin.data_ptr(),
        )  # fmt: skip
        out = torch.empty_like(x)
        status = self.function(
            ctypes.byref(self._shape), self._layers, self.model.norm.weight.data_ptr(), ctypes.byref(batch),
            x.data_ptr(), out.data_ptr(), self.ops.num_threads,
        )  # fmt: skip
        if status:
            raise RuntimeError(f"decode step kernel failed with status {status}")
        return out

    def _build(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], block_size: int) -> None:
        """The weights' and caches' addresses, once: they stay where they are for the model's life."""
        layers = []
        for layer, (k_cache, v_cache) in zip(self.model.layers, kv_caches, strict=True):
            attention, mlp = layer.self_attn, layer.mlp
            layers.append(
                _Layer(
                    layer.input_layernorm.weight.data_ptr(),
                    layer.post_attention_layernorm.weight.data_ptr(),
                    _matrix(attention.qkv_proj),
                    _matrix(attention.o_proj),
                    _matrix(mlp.gate_up_proj),
                    _matrix(mlp.down_proj),
                    k_cache.data_ptr(),
                    v_cache.data_ptr(),
                    attention.cache.window or 0,
                )
            )
        first = self.model.layers[0].self_attn
        self._shape = _Model(
            len(layers), self.model.config.hidden_size, first.num_heads, first.num_kv_heads, first.head_dim,
            self.model.layers[0].mlp.intermediate_size, kv_caches[0][0].shape[1], block_size,
            self.model.norm.eps, first.scale,
        )  # fmt: skip
        self._layers = (_Layer * len(layers))(*layers)
        self._caches = kv_caches


def _projections(layer: DecoderLayer) -> tuple[nn.Module, ...]:
    attention, mlp = layer.self_attn, layer.mlp
    return attention.qkv_proj, attention.o_proj, mlp.gate_up_proj, mlp.down_proj


def _kernel_computes(projection: nn.Module, dtype: torch.dtype, ops: CpuKernelOps) -> bool:
    """A dense or packed projection, or an int8 one where this CPU has the int8 kernel."""
    kind = type(projection)
    return (
        kind is Linear
        or (kind is PackedLinear and ops.packed_gemm is not None)
        or (kind is Int8Linear and dtype in ops.gemms_q8)
    )


def _max_rows(projection: nn.Module, dtype: torch.dtype, ops: CpuKernelOps) -> int:
    """Up to how many rows the kernel computes this projection's product (packed: any number)."""
    if type(projection) is PackedLinear:
        return sys.maxsize
    if type(projection) is Int8Linear:
        return MAX_Q8_ROWS
    return ops.max_gemm_rows[dtype]
