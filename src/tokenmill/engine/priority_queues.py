"""The scheduler's sequences split by priority class, so that scheduler.py reads as decisions rather than list
bookkeeping. Pure Python, no torch.

Interactive work (live API calls) is always considered before batch work (batch-API lines), and batch work is
always the first to give memory back. Both holders iterate interactive first, which is the order a step
serves sequences in; read backwards, it is the order memory is taken back in.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterator

from tokenmill.engine.block_pool import NO_BLOCK
from tokenmill.engine.request import Sequence
from tokenmill.engine.sampling_params import Priority


def is_batch(seq: Sequence) -> bool:
    return seq.params.priority is Priority.BATCH


class WaitingQueues:
    """Sequences waiting for admission: one first-come-first-served queue per class."""

    def __init__(self) -> None:
        self.interactive: deque[Sequence] = deque()
        self.batch: deque[Sequence] = deque()

    def queue_of(self, seq: Sequence) -> deque[Sequence]:
        return self.batch if is_batch(seq) else self.interactive

    def append(self, seq: Sequence) -> None:
        self.queue_of(seq).append(seq)

    def appendleft(self, seq: Sequence) -> None:
        """A preempted sequence goes back to the front of its own class: it was admitted before everything
        still waiting there, and recomputing it does not make it any younger."""
        self.queue_of(seq).appendleft(seq)

    def remove(self, seq: Sequence) -> None:
        self.queue_of(seq).remove(seq)

    def __contains__(self, seq: object) -> bool:
        return isinstance(seq, Sequence) and seq in self.queue_of(seq)

    def __len__(self) -> int:
        return len(self.interactive) + len(self.batch)

    def __iter__(self) -> Iterator[Sequence]:
        yield from self.interactive
        yield from self.batch

    def __getitem__(self, index: int) -> Sequence:
        return list(self)[index]


class RunningSeqs:
    """Sequences holding KV blocks, oldest first within each class."""

    def __init__(self) -> None:
        self.interactive: list[Sequence] = []
        self.batch: list[Sequence] = []

    def list_of(self, seq: Sequence) -> list[Sequence]:
        return self.batch if is_batch(seq) else self.interactive

    def add(self, seq: Sequence) -> None:
        self.list_of(seq).append(seq)

    def remove(self, seq: Sequence) -> None:
        self.list_of(seq).remove(seq)

    def victim_for(self, seq: Sequence) -> Sequence:
        """Whom to preempt when running `seq` needs blocks: the newest batch sequence, and only when there is
        none, the newest interactive one. A batch `seq` is itself in `batch`, so it can only ever preempt
        itself or a newer batch sequence, never an interactive one."""
        return self.batch[-1] if self.batch else self.interactive[-1]

    def blocks_only_batch_holds(self, ref_counts: list[int]) -> set[int]:
        """The KV blocks that would come free if every running batch sequence were preempted: those no
        interactive sequence shares."""
        holders = Counter(b for seq in self.batch for b in seq.block_ids if b != NO_BLOCK)
        return {block_id for block_id, n in holders.items() if n == ref_counts[block_id]}

    def newest_batch_pinning_alone(self) -> Sequence | None:
        """The newest batch sequence whose LoRA adapter no interactive sequence uses: preempting such
        sequences is what can unpin an adapter slot (a slot is pinned once per running sequence)."""
        live = {seq.params.lora for seq in self.interactive}
        return next(
            (s for s in reversed(self.batch) if s.params.lora is not None and s.params.lora not in live), None
        )

    def __len__(self) -> int:
        return len(self.interactive) + len(self.batch)

    def __iter__(self) -> Iterator[Sequence]:
        yield from self.interactive
        yield from self.batch
