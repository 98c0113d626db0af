"""The fleet: every chat model under one memory budget. A model loads when first asked for (pinned ones at
start), idle models are unloaded least-recently-used first to make room, and an operator can drain one:
new requests are refused while the open ones finish. A `Ticket` is one request's hold on a loaded model, and
no model with an open ticket is ever unloaded to make room.

Every decision (which model loads, which ones make room, what state a model is in) is taken synchronously
between two awaits on the event loop, so two loads or evictions can never interleave; only the slow parts
(reading weights, starting and stopping engines, waiting for requests) run after the decision is recorded."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tokenmill.catalog.fleet_model import (
    ModelDeployment,
    ModelState,
    ModelStatus,
    ModelUnavailable,
    ReplicaStatus,
    UnknownModel,
    check_budget,
    format_bytes,
)
from tokenmill.catalog.router import Assignment, Replica, ReplicaPool
from tokenmill.engine.client import EngineClient

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from tokenmill.engine.lora import LoRARequest

logger = logging.getLogger(__name__)

NO_MEMORY_RETRY_AFTER_S = 1
"""Busy models free their memory as soon as their requests end, so a refused client should retry soon."""


@dataclass(eq=False)
class _Instance:
    """One load of a model. Tickets hold the instance, not the model, so a ticket that outlives a forced
    drain releases into the old instance and never miscounts a later load."""

    pool: ReplicaPool
    loaded_at_s: float
    open_tickets: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.idle.set()

    @property
    def engines(self) -> list[EngineClient]:
        return [r.engine for r in self.pool.replicas]


@dataclass(eq=False)
class _Model:
    deployment: ModelDeployment
    state: ModelState = ModelState.UNLOADED
    reason: str | None = None
    instance: _Instance | None = None
    reserved_bytes: int = 0
    """Memory counted against the budget: set when a load is decided, cleared once the engines are down."""
    last_used_s: float | None = None
    num_loads: int = 0
    last_load_s: float | None = None
    load_task: asyncio.Task[None] | None = None
    stop_task: asyncio.Task[None] | None = None

    @property
    def model_id(self) -> str:
        return self.deployment.model_id

    def recency_s(self) -> float:
        """A fresh load counts as a use, so a model is not evicted before its first request reaches it."""
        loaded_at = self.instance.loaded_at_s if self.instance else float("-inf")
        return max(loaded_at, self.last_used_s if self.last_used_s is not None else float("-inf"))


class Ticket:
    """One request's hold on a loaded model, from checkout until `release` (call it on every path that ends
    the request; a second call does nothing). It routes the request to a replica at most once."""

    def __init__(self, model: _Model, instance: _Instance, clock: Callable[[], float]) -> None:
        engine = instance.pool.replicas[0].engine
        self.model_id: str = model.model_id
        self.tokenizer: PreTrainedTokenizerBase = engine.tokenizer
        self.max_model_len: int = engine.max_model_len
        self._model = model
        self._instance = instance
        self._clock = clock
        self._assignment: Assignment | None = None
        self._released = False
        self.lora: LoRARequest | None = None
        """Set for an adapter model's request: the adapter its base model's engine applies."""
        instance.open_tickets += 1
        instance.idle.clear()
        model.last_used_s = clock()

    def check_fits(self, num_prompt_tokens: int, max_tokens: int) -> None:
        """Replicas of one model share its context length, so the first one answers for all."""
        self._instance.pool.replicas[0].engine.check_fits(num_prompt_tokens, max_tokens)

    def check_room(self, num_seqs: int = 1) -> None:
        """`ModelOverloaded` at once when every replica is full (before the request is even tokenized)."""
        self._instance.pool.check_room(num_seqs)

    def assign(self, work_tokens: int, num_seqs: int = 1) -> EngineClient:
        """The replica to run the request on; raises `ModelOverloaded` when every replica is full."""
        if self._released:
            raise RuntimeError(f"the ticket for {self.model_id!r} was already released")
        if self._assignment is not None:
            raise RuntimeError(f"the ticket for {self.model_id!r} was already assigned a replica")
        self._assignment = self._instance.pool.assign(work_tokens, num_seqs)
        return self._assignment.engine

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        if self._assignment is not None:
            self._assignment.release()
        self._instance.open_tickets -= 1
        if self._instance.open_tickets == 0:
            self._instance.idle.set()
        self._model.last_used_s = self._clock()

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


class Fleet:
    def __init__(
        self,
        deployments: Sequence[ModelDeployment],
        memory_budget_bytes: int | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        check_budget(deployments, memory_budget_bytes)
        self._models = {d.model_id: _Model(d) for d in deployments}
        self._budget = memory_budget_bytes
        self._clock = clock
        self._closing = False
        self._unloading: set[asyncio.Task[None]] = set()
        """Shutdowns of evicted models; a load waits for them so memory is really free before it reads."""

    @property
    def memory_budget_bytes(self) -> int | None:
        return self._budget

    @property
    def memory_used_bytes(self) -> int:
        return sum(m.reserved_bytes for m in self._models.values())

    async def start(self) -> None:
        """Loads the pinned models; one that fails is left FAILED (its reason logged) and the rest serve."""
        pinned = [m.model_id for m in self._models.values() if m.deployment.pinned]
        await asyncio.gather(*(self._load_pinned(model_id) for model_id in pinned))

    async def checkout(self, model_id: str) -> Ticket:
        """A ticket on the model, loading it first if needed: a cold start is this request's latency."""
        m = self._get(model_id)
        while True:
            if self._closing:
                raise ModelUnavailable(model_id, m.state, "the server is shutting down")
            if m.state is ModelState.LOADED:
                assert m.instance is not None
                return Ticket(m, m.instance, self._clock)
            if m.state is ModelState.LOADING:
                await self._wait_for_load(m)
            elif m.state is ModelState.UNLOADED:
                self._begin_load(m)
            else:
                raise self._unavailable(m)

    async def load(self, model_id: str) -> ModelStatus:
        """Loads now, also a STOPPED or FAILED model (a retry); raises `ModelUnavailable` when there is no
        room or the load fails."""
        m = self._get(model_id)
        while True:
            if m.state is ModelState.LOADED:
                return self._status(m)
            if m.state is ModelState.LOADING:
                await self._wait_for_load(m)
                if m.state is ModelState.FAILED:
                    raise self._unavailable(m)
            elif m.state is ModelState.DRAINING:
                raise self._unavailable(m)
            else:
                self._begin_load(m)

    async def unload(self, model_id: str, timeout_s: float | None = None) -> ModelStatus:
        """Drains, then leaves the model UNLOADED: the next request loads it again on demand."""
        return await self._stop(self._get(model_id), timeout_s, ModelState.UNLOADED, "operator")

    async def drain(self, model_id: str, timeout_s: float | None = None) -> ModelStatus:
        """Refuses new requests, lets the open ones finish (after `timeout_s` their engines are shut down
        anyway), then leaves the model STOPPED until an explicit `load`."""
        return await self._stop(self._get(model_id), timeout_s, ModelState.STOPPED, "drained")

    async def shutdown(self, timeout_s: float | None = None) -> None:
        """Graceful stop: refuse new requests, let open ones finish up to the deadline, stop every engine."""
        self._closing = True
        await asyncio.gather(
            *(self._stop(m, timeout_s, ModelState.STOPPED, "shutdown") for m in self._models.values())
        )
        await asyncio.gather(*self._unloading)

    def status(self) -> list[ModelStatus]:
        return [self._status(m) for m in self._models.values()]

    def status_of(self, model_id: str) -> ModelStatus:
        return self._status(self._get(model_id))

    def engines(self) -> Iterator[tuple[str, int, EngineClient]]:
        """(model id, replica index, engine) of every started replica, for metrics."""
        for m in self._models.values():
            if m.instance is not None:
                for index, engine in enumerate(m.instance.engines):
                    yield m.model_id, index, engine

    def _get(self, model_id: str) -> _Model:
        try:
            return self._models[model_id]
        except KeyError:
            raise UnknownModel(model_id) from None

    async def _load_pinned(self, model_id: str) -> None:
        try:
            await self.load(model_id)
        except ModelUnavailable as exc:
            logger.warning("pinned model %s is not serving: %s", model_id, exc.reason)

    def _begin_load(self, m: _Model) -> None:
        """Decides the load and the evictions it needs in one synchronous step; raises when there is no room,
        having changed nothing."""
        if self._closing:
            raise ModelUnavailable(m.model_id, m.state, "the server is shutting down")
        for victim in self._victims_for(m):
            self._evict(victim, m.model_id)
        pending = list(self._unloading)
        m.state, m.reason, m.reserved_bytes = ModelState.LOADING, None, m.deployment.total_memory_bytes
        m.load_task = asyncio.create_task(self._run_load(m, pending), name=f"load {m.model_id}")

    def _victims_for(self, m: _Model) -> list[_Model]:
        """Idle, unpinned, loaded models, least recently used first, until `m` fits."""
        if self._budget is None:
            return []
        need = m.deployment.total_memory_bytes
        free = self._budget - self.memory_used_bytes
        idle = [
            o
            for o in self._models.values()
            if o.state is ModelState.LOADED
            and not o.deployment.pinned
            and o.instance is not None
            and o.instance.open_tickets == 0
        ]
        victims = []
        for other in sorted(idle, key=_Model.recency_s):
            if free >= need:
                break
            victims.append(other)
            free += other.reserved_bytes
        if free < need:
            raise ModelUnavailable(
                m.model_id,
                m.state,
                f"not enough memory: {m.model_id} needs {format_bytes(need)} and only {format_bytes(free)} "
                f"of the {format_bytes(self._budget)} budget can be freed, the other loaded models are busy",
                retry_after_s=NO_MEMORY_RETRY_AFTER_S,
            )
        return victims

    def _evict(self, victim: _Model, for_model_id: str) -> None:
        assert victim.instance is not None
        engines = victim.instance.engines
        victim.state, victim.instance, victim.reserved_bytes = ModelState.UNLOADED, None, 0
        logger.info("unloading %s to make room for %s", victim.model_id, for_model_id)
        task = asyncio.create_task(self._shutdown_engines(victim.model_id, engines))
        self._unloading.add(task)
        task.add_done_callback(self._unloading.discard)

    async def _run_load(self, m: _Model, pending_unloads: list[asyncio.Task[None]]) -> None:
        """Never raises: a failure becomes the model's FAILED state, so one bad model cannot stop others."""
        dep = m.deployment
        engines: list[EngineClient] = []
        started_s = self._clock()
        try:
            await asyncio.gather(*pending_unloads)
            for _ in range(dep.num_replicas):
                engine = await asyncio.to_thread(dep.make_replica)
                engines.append(engine)
                await engine.start()
        except Exception as exc:
            logger.error("loading %s failed: %s: %s", m.model_id, type(exc).__name__, exc, exc_info=exc)
            await self._fail_load(m, engines, f"{type(exc).__name__}: {exc}")
            return
        except asyncio.CancelledError:
            await self._fail_load(m, engines, "the load was cancelled")
            raise
        pool = ReplicaPool(m.model_id, [Replica(e, dep.max_running, dep.max_queue) for e in engines])
        m.last_load_s = self._clock() - started_s
        m.instance = _Instance(pool, loaded_at_s=self._clock())
        m.state = ModelState.LOADED
        m.num_loads += 1
        logger.info(
            "loaded %s (%d replica(s), %s) in %.2f s",
            m.model_id,
            dep.num_replicas,
            format_bytes(dep.total_memory_bytes),
            m.last_load_s,
        )

    async def _fail_load(self, m: _Model, engines: list[EngineClient], reason: str) -> None:
        await self._shutdown_engines(m.model_id, engines)
        m.state, m.reason, m.reserved_bytes = ModelState.FAILED, reason, 0

    async def _wait_for_load(self, m: _Model) -> None:
        """Shielded: a caller that gives up (a client disconnect) must not cancel the load others await."""
        assert m.load_task is not None
        await asyncio.shield(m.load_task)

    async def _stop(self, m: _Model, timeout_s: float | None, target: ModelState, why: str) -> ModelStatus:
        while m.state in (ModelState.LOADING, ModelState.DRAINING):
            if m.state is ModelState.LOADING:
                await self._wait_for_load(m)
            else:
                assert m.stop_task is not None
                await asyncio.shield(m.stop_task)
        if m.state is ModelState.LOADED:
            m.state = ModelState.DRAINING
            m.stop_task = asyncio.create_task(
                self._drain(m, timeout_s, target, why), name=f"drain {m.model_id}"
            )
            await asyncio.shield(m.stop_task)
        else:
            m.state, m.reason = target, _stop_reason(target, why)
        return self._status(m)

    async def _drain(self, m: _Model, timeout_s: float | None, target: ModelState, why: str) -> None:
        instance = m.instance
        assert instance is not None
        if instance.open_tickets:
            logger.info("draining %s: waiting for %d open request(s)", m.model_id, instance.open_tickets)
            try:
                await asyncio.wait_for(instance.idle.wait(), timeout_s)
            except TimeoutError:
                logger.warning(
                    "draining %s timed out after %s s; aborting %d open request(s)",
                    m.model_id,
                    timeout_s,
                    instance.open_tickets,
                )
        await self._shutdown_engines(m.model_id, instance.engines)
        m.instance, m.reserved_bytes = None, 0
        m.state, m.reason = target, _stop_reason(target, why)
        logger.info("unloaded %s (%s)", m.model_id, why)

    async def _shutdown_engines(self, model_id: str, engines: list[EngineClient]) -> None:
        results = await asyncio.gather(*(e.shutdown() for e in engines), return_exceptions=True)
        for index, result in enumerate(results):
            if isinstance(result, BaseException):
                logger.error("shutting down %s replica %d failed", model_id, index, exc_info=result)

    def _unavailable(self, m: _Model) -> ModelUnavailable:
        if m.state is ModelState.DRAINING:
            return ModelUnavailable(m.model_id, m.state, "it is being drained")
        return ModelUnavailable(m.model_id, m.state, m.reason or f"it is {m.state}")

    def _status(self, m: _Model) -> ModelStatus:
        instance = m.instance
        in_flight = instance.open_tickets if instance is not None else 0
        if in_flight:
            idle_s: float | None = 0.0
        else:
            idle_s = None if m.last_used_s is None else self._clock() - m.last_used_s
        return ModelStatus(
            model_id=m.model_id,
            state=m.state,
            reason=m.reason,
            pinned=m.deployment.pinned,
            memory_bytes=m.deployment.total_memory_bytes,
            in_flight=in_flight,
            idle_s=idle_s,
            num_loads=m.num_loads,
            last_load_s=m.last_load_s,
            replicas=()
            if instance is None
            else tuple(_replica_status(i, r) for i, r in enumerate(instance.pool.replicas)),
        )


def _replica_status(index: int, replica: Replica) -> ReplicaStatus:
    stats = replica.engine.stats()
    return ReplicaStatus(
        index=index,
        running_seqs=stats.num_running_seqs,
        waiting_seqs=stats.num_waiting_seqs,
        in_flight_seqs=replica.in_flight_seqs,
        outstanding_tokens=replica.outstanding_tokens,
        kv_cache_usage=stats.kv_cache_usage,
    )


def _stop_reason(target: ModelState, why: str) -> str | None:
    if target is not ModelState.STOPPED:
        return None
    return "the server is shutting down" if why == "shutdown" else "stopped by the operator"
