"""bfloat16 projections stored in the layout of the CPU's packed product kernel (cpu_ops.c), swapped in at
load where that kernel runs (AVX-512 BF16): a decode step's products then run at close to memory speed with
few rows and close to the CPU's bfloat16 peak with many (see `packed_gemm_bf16`), and prefill chunks take the
same kernel, a little faster than torch's GEMM. The layout is also what AMX tile multiplies take, so on CPUs
with AMX the same packed weights go through tiles, 1.1-2.9x faster than torch's (oneDNN) GEMM. The packed
weight replaces the original: no copy is kept (a tied output head gets a packed copy of its own; the
embedding lookup keeps the table).

Layout: panels of PANEL output columns, each holding its columns' inputs two by two,
packed[p, k // 2, c, k % 2] = weight[p * PANEL + c, k], zero-padded to whole panels.
"""

from __future__ import annotations

import torch
from torch import nn

from tokenmill.models.layers import TORCH_OPS, Linear

PANEL = 32
"""Output columns per panel: the kernel's PANEL."""


def pack(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] (K even) -> [ceil(N / PANEL), K / 2, PANEL, 2], contiguous."""
    rows, inner = weight.shape
    padded = nn.functional.pad(weight, (0, 0, 0, -rows % PANEL))
    return padded.view(-1, PANEL, inner // 2, 2).transpose(1, 2).contiguous()


def unpack(packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """The [out_features, K] weight back out of `pack`'s layout."""
    panels, pairs = packed.shape[:2]
    return packed.transpose(1, 2).reshape(panels * PANEL, pairs * 2)[:out_features]


class PackedLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("packed", pack(weight.detach()))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.ops = TORCH_OPS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.linear_packed(x, self.packed, self.bias, self.out_features)


def packable(module: nn.Module) -> bool:
    return type(module) is Linear and module.weight.dtype == torch.bfloat16 and module.in_features % 2 == 0


@torch.no_grad()
def pack_model(model: nn.Module) -> None:
    """Swap every bfloat16 Linear of a loaded model (even inner size) for its packed form, in place, and give
    a tied output head a packed copy of the embedding (the model then reads `lm_head`, as if untied)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if packable(child):
                setattr(parent, name, PackedLinear(child.weight, child.bias))
    embedding = model.embed_tokens.weight
    tied = getattr(model, "tie_word_embeddings", False)
    if tied and embedding.dtype == torch.bfloat16 and embedding.shape[1] % 2 == 0:
        model.lm_head = PackedLinear(embedding, None)
        model.tie_word_embeddings = False
