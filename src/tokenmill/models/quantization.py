"""Weight-only int8 quantization at load (`quantization="int8"`): every projection's weight becomes int8
with one float32 scale per output row (absmax / 127), halving the bytes a decode step streams. A tied output
head gets an int8 copy of its own; the embedding lookup keeps the original table.

On CPUs with AVX-512 VNNI or AVX2 a decode step's few rows of activations (float32 or bfloat16) are
quantized too, in blocks of 64 values with a scale each, so the kernel (models/cpu_ops.py) multiplies bytes
with bytes; elsewhere, and for products with many rows (prefill), a dequantised copy of the weight goes
through torch's GEMM.
`tokenmill bench quality` measures what this costs.
"""

from __future__ import annotations

import torch
from torch import nn

from tokenmill.models.layers import TORCH_OPS, Linear
from tokenmill.models.packed_linear import PackedLinear

QUANTIZATIONS = ("int8",)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values, float32 scale per row) with values * scale ~= weight; rows of zeros get scale 1."""
    absmax = weight.float().abs().amax(dim=1)
    scales = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax))
    values = torch.round(weight.float() / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return values, scales


ACTIVATION_BLOCK = 64
"""The CPU kernel quantizes activations in blocks of this many values (its Q8_BLOCK)."""


def block_sums(values: torch.Tensor) -> torch.Tensor:
    """[N, ceil(K / ACTIVATION_BLOCK)] int32: each weight row's sum over each activation block."""
    rows, inner = values.shape
    padded = torch.nn.functional.pad(values.to(torch.int32), (0, -inner % ACTIVATION_BLOCK))
    return padded.view(rows, -1, ACTIVATION_BLOCK).sum(dim=2, dtype=torch.int32)


class Int8Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        qweight, scales = quantize_int8(weight)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("block_sums", block_sums(qweight))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.ops = TORCH_OPS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.linear_int8(x, self.qweight, self.scales, self.block_sums, self.bias)


@torch.no_grad()
def quantize_model(model: nn.Module, method: str) -> None:
    """Swap every Linear of a loaded model for its quantized form, in place (and untie a tied head)."""
    if method not in QUANTIZATIONS:
        raise ValueError(f"quantization {method!r} is not supported; supported: {', '.join(QUANTIZATIONS)}")
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Linear):
                setattr(parent, name, Int8Linear(child.weight, child.bias))
    if getattr(model, "tie_word_embeddings", False):
        model.lm_head = Int8Linear(model.embed_tokens.weight, None)
        model.tie_word_embeddings = False


def weight_bytes_per_step(model: nn.Module) -> int:
    """Bytes of the weights one decode step multiplies with: every parameter, quantized and packed weight,
    except the embedding table where the output head does not read it (the lookup takes one row)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    total += sum(
        b.numel() * b.element_size()
        for m in model.modules()
        if isinstance(m, (Int8Linear, PackedLinear))
        for b in m.buffers(recurse=False)
    )
    if not getattr(model, "tie_word_embeddings", False):
        embedding = model.embed_tokens.weight
        total -= embedding.numel() * embedding.element_size()
    return total
