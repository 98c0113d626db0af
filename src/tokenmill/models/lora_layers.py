"""The torch side of multi-LoRA serving: adapter weights stacked in slots, and the batched delta of one step.

Each fused projection (`qkv_proj`, `o_proj`, `gate_up_proj`, `down_proj`) keeps, per layer, two stacked
tensors over the slots:
    A: [slots, in_features, shards * rank]     the shards' A matrices side by side (transposed)
    B: [slots, shards * rank, out_features]    block-diagonal: shard j's B (scaled) in its output columns
so that one shrink and one expand matmul add the delta of every shard of a fused output at once (a shard
the adapter does not target stays zero). Ranks below the stack's rank are zero-padded.

A step's LoRA tokens are grouped by slot and cut into tiles of equal size, each tile belonging to one slot;
every tile multiplies its own slot's A and B in one batched matmul, whatever the number of adapters in the
step. Rows of the base model are not touched, and a step without any adapter does no LoRA work at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

PEFT_TARGETS = {
    # PEFT target -> (our fused module, shard index)
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "o_proj": ("o_proj", 0),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
    "down_proj": ("down_proj", 0),
}
PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn"}
PARENT.update({"gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"})

# A tile costs a copy of its slot's weights; small matmuls are bound by reading the weights, so that costs
# about as much as this many rows of padding.
_TILE_COST_ROWS = 16


@dataclass(frozen=True, slots=True)
class FusedShape:
    in_features: int
    shard_sizes: tuple[int, ...]

    @property
    def out_features(self) -> int:
        return sum(self.shard_sizes)

    def shard_offset(self, shard: int) -> int:
        return sum(self.shard_sizes[:shard])


def fused_shapes(model: nn.Module) -> dict[str, FusedShape]:
    """Each adaptable fused module of a Llama-family model and the output rows of its shards."""
    attn = model.layers[0].self_attn
    hidden = attn.o_proj.out_features
    inter = model.layers[0].mlp.intermediate_size
    return {
        "qkv_proj": FusedShape(hidden, (attn.q_size, attn.kv_size, attn.kv_size)),
        "o_proj": FusedShape(attn.q_size, (hidden,)),
        "gate_up_proj": FusedShape(hidden, (inter, inter)),
        "down_proj": FusedShape(inter, (hidden,)),
    }


def target_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """PEFT target -> (in_features, out_features) of the original, unfused projection."""
    fused = fused_shapes(model)
    return {
        target: (fused[module].in_features, fused[module].shard_sizes[shard])
        for target, (module, shard) in PEFT_TARGETS.items()
    }


class LoRAStack:
    """Slot tensors for every layer, allocated when the first adapter loads (a base-only engine pays
    nothing) and widened when an adapter of a larger rank arrives."""

    def __init__(self, model: nn.Module, num_slots: int, dtype: torch.dtype, device: torch.device) -> None:
        self.shapes = fused_shapes(model)
        self.num_layers = len(model.layers)
        self.num_slots = num_slots
        self.dtype = dtype
        self.device = device
        self.rank = 0
        self.weights: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []

    def ensure_rank(self, rank: int) -> None:
        if rank <= self.rank:
            return
        old, old_rank = self.weights, self.rank
        self.weights = []
        for layer in range(self.num_layers):
            tensors = {}
            for name, shape in self.shapes.items():
                n = len(shape.shard_sizes)
                a = torch.zeros(
                    self.num_slots, shape.in_features, n * rank, dtype=self.dtype, device=self.device
                )
                b = torch.zeros(
                    self.num_slots, n * rank, shape.out_features, dtype=self.dtype, device=self.device
                )
                if old:
                    old_a, old_b = old[layer][name]
                    for j in range(n):
                        a[:, :, j * rank : j * rank + old_rank] = old_a[
                            :, :, j * old_rank : (j + 1) * old_rank
                        ]
                        b[:, j * rank : j * rank + old_rank] = old_b[:, j * old_rank : (j + 1) * old_rank]
                tensors[name] = (a, b)
            self.weights.append(tensors)
        self.rank = rank

    @torch.no_grad()
    def clear(self, slot: int) -> None:
        for tensors in self.weights:
            for a, b in tensors.values():
                a[slot].zero_()
                b[slot].zero_()

    @torch.no_grad()
    def write(self, slot: int, layer: int, target: str, lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
        """lora_a: [r, in] and lora_b: [out, r] as PEFT stores them, `lora_b` already scaled."""
        module, shard = PEFT_TARGETS[target]
        shape = self.shapes[module]
        a, b = self.weights[layer][module]
        r, rank = lora_a.shape[0], self.rank
        offset, size = shape.shard_offset(shard), shape.shard_sizes[shard]
        a[slot, :, shard * rank : shard * rank + r] = lora_a.t().to(self.dtype)
        b[slot, shard * rank : shard * rank + r, offset : offset + size] = lora_b.t().to(self.dtype)

    def step(self, segments: Sequence[tuple[int, int, int]]) -> LoRAStep:
        """segments: (first token, number of tokens, slot) of each adapted sequence in the step's layout.

        Either every slot gets one tile as long as the largest group (the stacked weights are used as they
        are: best when the groups are about even, as in decode steps), or the groups are cut into tiles of
        a common size and each tile gathers its slot's weights (best when one long prefill dominates)."""
        tokens_of: dict[int, list[int]] = {}
        for first, num, slot in segments:
            tokens_of.setdefault(slot, []).extend(range(first, first + num))
        counts = [len(tokens) for tokens in tokens_of.values()]
        tile, tiled_cost = _tile_size(counts)
        whole_stack = self.num_slots * max(counts) <= tiled_cost
        if whole_stack:
            tile = max(counts)
            tokens_of = {slot: tokens_of.get(slot, []) for slot in range(self.num_slots)}
        rows: list[int] = []
        dest: list[int] = []
        keep: list[int] = []
        tile_slots: list[int] = []
        filler = segments[0][0]  # any token: padding rows are computed, then dropped
        for slot, tokens in tokens_of.items():
            num_tiles = max(1, -(-len(tokens) // tile))
            keep.extend(range(len(rows), len(rows) + len(tokens)))
            dest.extend(tokens)
            rows.extend(tokens + [filler] * (num_tiles * tile - len(tokens)))
            tile_slots.extend([slot] * num_tiles)

        def as_tensor(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int64, device=self.device)

        return LoRAStep(
            self,
            tile,
            as_tensor(rows),
            None if whole_stack else as_tensor(tile_slots),
            as_tensor(dest),
            as_tensor(keep) if len(rows) != len(dest) else None,
        )


def _tile_size(counts: list[int]) -> tuple[int, int]:
    """The tile size that balances padding rows against per-tile weight gathers, and its cost in rows."""
    largest = max(counts)
    candidates = {largest}
    size = 1
    while size < largest:
        candidates.add(size)
        size *= 2

    def cost(tile: int) -> int:
        tiles = sum(-(-c // tile) for c in counts)
        return tiles * tile + _TILE_COST_ROWS * tiles

    best = min(sorted(candidates), key=cost)
    return best, cost(best)


@dataclass(frozen=True, slots=True)
class LoRAStep:
    """One step's grouping of adapted tokens, shared by every layer."""

    stack: LoRAStack
    tile: int
    rows: torch.Tensor
    """[tiles * tile] token index of each tile row (padding repeats a token of the same slot)."""
    tile_slots: torch.Tensor | None
    """[tiles] the slot of each tile; None: tile i is slot i, for every slot (no weight gather)."""
    dest: torch.Tensor
    """[adapted tokens] token index of each real row, in tile-row order."""
    keep: torch.Tensor | None
    """[adapted tokens] positions of the real rows among the tile rows; None when there is no padding."""

    def layer(self, index: int) -> LoRALayer:
        return LoRALayer(self, self.stack.weights[index])


@dataclass(frozen=True, slots=True)
class LoRALayer:
    step: LoRAStep
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]

    def add(self, module: str, x: torch.Tensor, out: torch.Tensor) -> None:
        """out += the adapters' delta for module(x), row by row; rows of the base model are left alone."""
        step = self.step
        a, b = self.weights[module]
        if step.tile_slots is not None:
            a, b = a.index_select(0, step.tile_slots), b.index_select(0, step.tile_slots)
        xs = x.index_select(0, step.rows).view(-1, step.tile, x.shape[-1])
        delta = torch.bmm(torch.bmm(xs, a), b).view(-1, out.shape[-1])
        if step.keep is not None:
            delta = delta.index_select(0, step.keep)
        out.index_add_(0, step.dest, delta)
