"""Admission to a model's replicas: each request goes to the replica with the least outstanding work, and a
replica whose bounded queue is full takes nothing more. When every replica is full the request is refused at
once (503 + Retry-After) instead of waiting: a queue that only grows serves nobody on time."""

from __future__ import annotations

from collections.abc import Sequence

from tokenmill.engine.client import EngineClient

OVERLOAD_RETRY_AFTER_S = 1
"""How long a refused client should wait: one second is about how long a short request holds its seat."""


class ModelOverloaded(Exception):
    """Every replica of the model already holds as many sequences as it may run plus queue."""

    def __init__(self, model: str, retry_after_s: int = OVERLOAD_RETRY_AFTER_S) -> None:
        super().__init__(
            f"The model {model!r} is overloaded: every replica's queue is full. Retry in {retry_after_s} s."
        )
        self.model = model
        self.retry_after_s = retry_after_s


class Replica:
    """One engine and the work the router has sent it and not yet seen released.

    The counts are the router's own bookkeeping, not the engine's stats: they change in the same event-loop
    step as the decision, so two requests arriving together never both see the same free seat."""

    def __init__(self, engine: EngineClient, max_running: int, max_queue: int) -> None:
        if max_running < 1:
            raise ValueError(f"max_running: must be at least 1, got {max_running}")
        if max_queue < 0:
            raise ValueError(f"max_queue: must be at least 0, got {max_queue}")
        self.engine = engine
        self.max_running = max_running
        self.max_queue = max_queue
        self._in_flight_seqs = 0
        self._outstanding_tokens = 0

    @property
    def in_flight_seqs(self) -> int:
        return self._in_flight_seqs

    @property
    def outstanding_tokens(self) -> int:
        return self._outstanding_tokens

    @property
    def capacity_seqs(self) -> int:
        """Sequences it may hold at once: those running plus those waiting their turn."""
        return self.max_running + self.max_queue

    @property
    def has_room(self) -> bool:
        return self._in_flight_seqs < self.capacity_seqs

    def has_room_for(self, num_seqs: int) -> bool:
        return self._in_flight_seqs + num_seqs <= self.capacity_seqs

    def _add(self, num_seqs: int, work_tokens: int) -> None:
        self._in_flight_seqs += num_seqs
        self._outstanding_tokens += work_tokens


class Assignment:
    """One request's hold on one replica. Releasing it twice is harmless, so every path that ends a request
    (finish, error, disconnect) may release without checking whether another already did."""

    def __init__(self, replica: Replica, num_seqs: int, work_tokens: int) -> None:
        self.replica = replica
        self.engine = replica.engine
        self._num_seqs = num_seqs
        self._work_tokens = work_tokens
        self._released = False
        replica._add(num_seqs, work_tokens)

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self.replica._add(-self._num_seqs, -self._work_tokens)


class ReplicaPool:
    """The replicas of one model behind a single `assign`. Synchronous and lock-free: every call happens on
    the event loop thread, so a choice and its bookkeeping can never interleave with another."""

    def __init__(self, model_id: str, replicas: Sequence[Replica]) -> None:
        if not replicas:
            raise ValueError(f"replicas: the model {model_id!r} needs at least one replica")
        self.model_id = model_id
        self._replicas = tuple(replicas)

    @property
    def replicas(self) -> tuple[Replica, ...]:
        return self._replicas

    @property
    def in_flight_seqs(self) -> int:
        return sum(r.in_flight_seqs for r in self._replicas)

    def check_room(self, num_seqs: int = 1) -> None:
        """Raises `ModelOverloaded` now if no replica could take `num_seqs` more sequences: lets a caller
        refuse a request before the work of preparing it (`assign` still decides, and may still refuse)."""
        if not any(r.has_room_for(num_seqs) for r in self._replicas):
            raise ModelOverloaded(self.model_id)

    def assign(self, work_tokens: int, num_seqs: int = 1) -> Assignment:
        """Hold seats for `num_seqs` sequences expected to cost `work_tokens` (prompt plus tokens to
        generate) on the replica with the least outstanding work; ties go to the one with fewer sequences,
        then to the first. Raises `ModelOverloaded` when no replica has room, including for a request no
        replica could ever hold."""
        if num_seqs < 1:
            raise ValueError(f"num_seqs: must be at least 1, got {num_seqs}")
        if work_tokens < 0:
            raise ValueError(f"work_tokens: must not be negative, got {work_tokens}")
        candidates = [(i, r) for i, r in enumerate(self._replicas) if r.has_room_for(num_seqs)]
        if not candidates:
            raise ModelOverloaded(self.model_id)
        _, best = min(candidates, key=lambda ir: (ir[1].outstanding_tokens, ir[1].in_flight_seqs, ir[0]))
        return Assignment(best, num_seqs, work_tokens)
