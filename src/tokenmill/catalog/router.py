"""Admission to a model's replicas: each request goes to the replica with the least outstanding work, where
(prefix routing) the prompt tokens a replica's cache still holds, because it served that prefix recently,
count as work it will not do, or (session routing) a request naming a `user` goes where that user's last
one went; a warm replica never takes a request it would make queue while another would run it at once. A
replica whose bounded queue is full, or that is down or draining, takes nothing more. Replicas join and
leave the pool while it serves (autoscaling, an operator's drain). When every replica is full the
request is refused at once (503 + Retry-After) instead of waiting: a queue that only grows serves nobody on
time."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Collection, Sequence

from tokenmill.catalog.prefix_affinity import PrefixAffinity
from tokenmill.engine.client import EngineClient

ROUTINGS = ("prefix", "least-load", "session")

OVERLOAD_RETRY_AFTER_S = 1
"""How long a refused client should wait: one second is about how long a short request holds its seat."""
RESTART_RETRY_AFTER_S = 2
"""... and when every replica is down: a worker process restarts in about that long."""


class ModelOverloaded(Exception):
    """Every replica of the model already holds as many sequences as it may run plus queue (or is down)."""

    def __init__(
        self,
        model: str,
        retry_after_s: int = OVERLOAD_RETRY_AFTER_S,
        why: str = "every replica's queue is full",
    ) -> None:
        super().__init__(f"The model {model!r} is overloaded: {why}. Retry in {retry_after_s} s.")
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
        self.number = -1
        """Its name within the pool, kept while other replicas come and go (set by `ReplicaPool`)."""
        self._in_flight_seqs = 0
        self._outstanding_tokens = 0
        self.draining = False
        """Being removed: it takes nothing new; `idle` tells when its last sequence is released."""
        self.idle = asyncio.Event()
        self.idle.set()

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
        return self.has_room_for(1)

    def has_room_for(self, num_seqs: int) -> bool:
        """A replica that is down (restarting) or draining has room for nothing."""
        return (
            not self.draining
            and self.engine.healthy
            and self._in_flight_seqs + num_seqs <= self.capacity_seqs
        )

    def _add(self, num_seqs: int, work_tokens: int) -> None:
        self._in_flight_seqs += num_seqs
        self._outstanding_tokens += work_tokens
        if self._in_flight_seqs:
            self.idle.clear()
        else:
            self.idle.set()


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

    def done(self, work_tokens: int) -> None:
        """Part of the work is behind the replica (a prompt was computed): it no longer counts as outstanding.
        Without this a request whose prompt is done but still decoding would weigh as if it had not started,
        and prefix routing would send a repeat of its prefix away from the replica that holds it."""
        if self._released:
            return
        work_tokens = min(max(0, work_tokens), self._work_tokens)
        self._work_tokens -= work_tokens
        self.replica._add(0, -work_tokens)

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self.replica._add(-self._num_seqs, -self._work_tokens)


class ReplicaPool:
    """The replicas of one model behind a single `assign`. Synchronous and lock-free: every call happens on
    the event loop thread, so a choice and its bookkeeping can never interleave with another."""

    def __init__(self, model_id: str, replicas: Sequence[Replica], routing: str = "prefix") -> None:
        if not replicas:
            raise ValueError(f"replicas: the model {model_id!r} needs at least one replica")
        self.model_id = model_id
        self._numbers = itertools.count()
        self._replicas: tuple[Replica, ...] = ()
        for replica in replicas:
            self.add(replica)
        self._affinity: PrefixAffinity | None = None
        self.routing = routing
        self._down: set[int] = set()
        """Replicas (by number) seen unhealthy: a worker that restarts comes back with an empty cache."""
        self.num_warm_routed = 0
        """Requests sent to the replica holding their prefix rather than to the least loaded one."""

    @property
    def replicas(self) -> tuple[Replica, ...]:
        """Every replica, the draining ones included."""
        return self._replicas

    @property
    def any_healthy(self) -> bool:
        """Some replica that is not draining can serve now."""
        return any(r.engine.healthy for r in self._replicas if not r.draining)

    @property
    def num_serving(self) -> int:
        """Replicas not being drained."""
        return sum(not r.draining for r in self._replicas)

    def add(self, replica: Replica) -> None:
        """A replica that takes requests from now on."""
        replica.number = next(self._numbers)
        self._replicas += (replica,)

    def drain(self, replica: Replica) -> None:
        """It takes nothing new from now on (its open requests run to their end); the prefixes it served
        are forgotten. Remove it once `replica.idle` is set."""
        replica.draining = True
        if self._affinity is not None:
            self._affinity.forget(replica.number)

    def remove(self, replica: Replica) -> None:
        self._replicas = tuple(r for r in self._replicas if r is not replica)

    @property
    def routing(self) -> str:
        return self._routing

    @routing.setter
    def routing(self, routing: str) -> None:
        """Switching to prefix routing starts from no history: it learns from the next requests on."""
        if routing not in ROUTINGS:
            raise ValueError(f"routing: must be one of {', '.join(ROUTINGS)}, got {routing!r}")
        self._routing = routing
        self._affinity = PrefixAffinity() if routing != "least-load" else None

    @property
    def in_flight_seqs(self) -> int:
        return sum(r.in_flight_seqs for r in self._replicas)

    def check_room(self, num_seqs: int = 1) -> None:
        """Raises `ModelOverloaded` now if no replica could take `num_seqs` more sequences: lets a caller
        refuse a request before the work of preparing it (`assign` still decides, and may still refuse)."""
        if not any(r.has_room_for(num_seqs) for r in self._replicas):
            raise self._refusal()

    def assign(
        self,
        work_tokens: int,
        num_seqs: int = 1,
        prompt_ids: Sequence[int] | None = None,
        cache_salt: str | None = None,
        exclude: Collection[Replica] = (),
        session: str | None = None,
    ) -> Assignment:
        """Hold seats for `num_seqs` sequences expected to cost `work_tokens` (prompt plus tokens to
        generate) on the replica with the least outstanding work, counting (prefix routing) the prompt
        tokens a replica's cache already holds as work it will not do: the longest remembered prefix of
        `prompt_ids` (`cache_salt`: the LoRA adapter, whose KV no other request shares). Ties go to the
        replica with fewer sequences, then to the first. A warm replica never takes a request it would make
        wait while another would run it at once. `exclude`: replicas that already failed this request.
        Session routing sends a request naming a `session` (its `user`) to the replica that served that
        session last, on the same condition; one naming none is routed by prefix.
        Raises `ModelOverloaded` when no replica has room, including for a request no replica could ever
        hold."""
        if num_seqs < 1:
            raise ValueError(f"num_seqs: must be at least 1, got {num_seqs}")
        if work_tokens < 0:
            raise ValueError(f"work_tokens: must not be negative, got {work_tokens}")
        candidates = [r for r in self._replicas if r.has_room_for(num_seqs) and r not in exclude]
        if not candidates:
            raise self._refusal()
        coldest = min(candidates, key=lambda r: (r.outstanding_tokens, r.in_flight_seqs, r.number))
        if self._affinity is None or len(self._replicas) == 1:
            return Assignment(coldest, num_seqs, work_tokens)
        self._forget_restarted()
        if self._routing == "session" and session:
            key = self._affinity.session(session)
            last = self._affinity.owner(key)
            best = next((r for r in candidates if last is not None and r.number == last[0]), coldest)
            if best is not coldest and _would_queue(best, num_seqs) and not _would_queue(coldest, num_seqs):
                best = coldest
            self._affinity.record(key, best.number)
            return Assignment(best, num_seqs, work_tokens)
        if not prompt_ids:
            return Assignment(coldest, num_seqs, work_tokens)
        hashes = self._affinity.hashes(prompt_ids, cache_salt)
        warm, cached_tokens = self._affinity.owner(hashes) or (None, 0)
        best = min(
            candidates,
            key=lambda r: (
                r.outstanding_tokens - (cached_tokens if r.number == warm else 0),
                r.in_flight_seqs,
                r.number,
            ),
        )
        if best is not coldest and _would_queue(best, num_seqs) and not _would_queue(coldest, num_seqs):
            best = coldest
        if best is not coldest:
            self.num_warm_routed += 1
        self._affinity.record(hashes, best.number)
        saved = cached_tokens if best.number == warm else 0
        return Assignment(best, num_seqs, max(0, work_tokens - saved))

    def _forget_restarted(self) -> None:
        assert self._affinity is not None
        for replica in self._replicas:
            if not replica.engine.healthy and replica.number not in self._down:
                self._down.add(replica.number)
                self._affinity.forget(replica.number)
            elif replica.engine.healthy:
                self._down.discard(replica.number)

    def _refusal(self) -> ModelOverloaded:
        if not self.any_healthy:
            return ModelOverloaded(self.model_id, RESTART_RETRY_AFTER_S, "every replica is restarting")
        return ModelOverloaded(self.model_id)


def _would_queue(replica: Replica, num_seqs: int) -> bool:
    return replica.in_flight_seqs + num_seqs > replica.max_running
