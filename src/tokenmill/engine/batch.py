"""The typed message from the scheduler to the model runner: which tokens of which sequences to compute."""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenmill.engine.request import Sequence


@dataclass(frozen=True, slots=True)
class ScheduledSeq:
    """Compute KV (and, if `samples`, the next-token logits) for `seq.token_ids[start : start + num_new_tokens]`."""

    seq: Sequence
    start: int
    num_new_tokens: int
    samples: bool
    """The chunk reaches the last known token, so this step yields the sequence's next token."""

    @property
    def end(self) -> int:
        return self.start + self.num_new_tokens


@dataclass(slots=True)
class ScheduledBatch:
    items: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    """Sequences whose blocks were taken back this step; they will be recomputed later."""

    @property
    def num_tokens(self) -> int:
        return sum(item.num_new_tokens for item in self.items)

    @property
    def sampling_items(self) -> list[ScheduledSeq]:
        return [item for item in self.items if item.samples]

    def __bool__(self) -> bool:
        return bool(self.items)
