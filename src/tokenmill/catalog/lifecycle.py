"""The fleet: every chat model under one memory budget. A model loads when first asked for (pinned ones at
start), idle models are unloaded least-recently-used first to make room, and an operator can drain one:
new requests are refused while the open ones finish. A `Ticket` (fleet_state.py) is one request's hold on a
loaded model, and no model with an open ticket is ever unloaded to make room. Replicas come and go while a
model serves (scaling.py).

Every decision (which model loads, which ones make room, what state a model is in) is taken synchronously
between two awaits on the event loop, so two loads or evictions can never interleave; only the slow parts
(reading weights, starting and stopping engines, waiting for requests) run after the decision is recorded."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator, Sequence

from tokenmill.catalog.autoscaler import Scaler
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
from tokenmill.catalog.fleet_state import Instance, ManagedModel, Ticket
from tokenmill.catalog.router import ROUTINGS, Replica, ReplicaPool
from tokenmill.catalog.scaling import AUTOSCALE_INTERVAL_S, ReplicaScaling
from tokenmill.engine.client import EngineClient

__all__ = ["Fleet", "Ticket"]

logger = logging.getLogger(__name__)

NO_MEMORY_RETRY_AFTER_S = 1
"""Busy models free their memory as soon as their requests end, so a refused client should retry soon."""
START_WAIT_S = 60.0
"""How long a request waits for its model's replicas to start (a cold load, or every replica restarting)
before it is answered 503 + Retry-After: a client's timeout is longer, an operator's patience shorter."""
STILL_STARTING_RETRY_AFTER_S = 5
REPLICA_POLL_S = 0.05


class Fleet(ReplicaScaling):
    def __init__(
        self,
        deployments: Sequence[ModelDeployment],
        memory_budget_bytes: int | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        autoscale_interval_s: float = AUTOSCALE_INTERVAL_S,
        start_wait_s: float = START_WAIT_S,
    ) -> None:
        check_budget(deployments, memory_budget_bytes)
        self._models = {d.model_id: ManagedModel(d) for d in deployments}
        self._budget = memory_budget_bytes
        self._clock = clock
        self._closing = False
        self._autoscale_interval_s = autoscale_interval_s
        self._start_wait_s = start_wait_s
        self._autoscale_task: asyncio.Task[None] | None = None
        self._unloading: set[asyncio.Task[None]] = set()
        """Shutdowns of evicted models; a load waits for them so memory is really free before it reads."""

    @property
    def memory_budget_bytes(self) -> int | None:
        return self._budget

    @property
    def memory_used_bytes(self) -> int:
        return sum(m.reserved_bytes for m in self._models.values())

    async def start(self) -> None:
        """Loads the pinned models; one that fails is left FAILED (its reason logged) and the rest serve.
        Then the autoscaler runs, if any model has a policy."""
        pinned = [m.model_id for m in self._models.values() if m.deployment.pinned]
        await asyncio.gather(*(self._load_pinned(model_id) for model_id in pinned))
        scaled = any(m.deployment.autoscaling is not None for m in self._models.values())
        if scaled and self._autoscale_task is None:
            self._autoscale_task = asyncio.create_task(self._autoscale_forever(), name="autoscaler")

    async def checkout(self, model_id: str) -> Ticket:
        """A ticket on the model, loading it first if needed: a cold start is this request's latency. Waits
        at most `start_wait_s` for the model to load or, when every replica is restarting, for one to be back;
        past that a load still going raises `ModelUnavailable` (retry after a few seconds), and a model still
        without a replica gets its ticket, which the router refuses (`ModelOverloaded`)."""
        m = self._get(model_id)
        deadline = time.monotonic() + self._start_wait_s
        while True:
            if self._closing:
                raise ModelUnavailable(model_id, m.state, "the server is shutting down")
            if m.state is ModelState.LOADED:
                assert m.instance is not None
                if not m.instance.pool.any_healthy and time.monotonic() < deadline:
                    await asyncio.sleep(REPLICA_POLL_S)  # a restarting worker comes back in seconds
                    continue
                return Ticket(m, m.instance, self._clock)
            if m.state is ModelState.LOADING:
                try:
                    await asyncio.wait_for(self._wait_for_load(m), max(0.0, deadline - time.monotonic()))
                except TimeoutError:
                    raise ModelUnavailable(
                        model_id, m.state, "it is still starting", retry_after_s=STILL_STARTING_RETRY_AFTER_S
                    ) from None
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
        if self._autoscale_task is not None:
            self._autoscale_task.cancel()
            await asyncio.gather(self._autoscale_task, return_exceptions=True)
        await asyncio.gather(
            *(self._stop(m, timeout_s, ModelState.STOPPED, "shutdown") for m in self._models.values())
        )
        await asyncio.gather(*(m.scale_task for m in self._models.values() if m.scale_task is not None))
        await asyncio.gather(*self._unloading)

    def status(self) -> list[ModelStatus]:
        return [self._status(m) for m in self._models.values()]

    def deployment(self, model_id: str) -> ModelDeployment:
        return self._get(model_id).deployment

    def status_of(self, model_id: str) -> ModelStatus:
        return self._status(self._get(model_id))

    def set_routing(self, model_id: str, routing: str) -> ModelStatus:
        """From the next request on (and for later loads); raises ValueError for an unknown routing."""
        m = self._get(model_id)
        if m.instance is not None:
            m.instance.pool.routing = routing  # validates
        elif routing not in ROUTINGS:
            raise ValueError(f"routing: must be one of {', '.join(ROUTINGS)}, got {routing!r}")
        m.routing = routing
        return self._status(m)

    def engines(self) -> Iterator[tuple[str, int, EngineClient]]:
        """(model id, replica number, engine) of every started replica, for metrics."""
        for m in self._models.values():
            if m.instance is not None:
                for replica in m.instance.pool.replicas:
                    yield m.model_id, replica.number, replica.engine

    def _get(self, model_id: str) -> ManagedModel:
        try:
            return self._models[model_id]
        except KeyError:
            raise UnknownModel(model_id) from None

    async def _load_pinned(self, model_id: str) -> None:
        try:
            await self.load(model_id)
        except ModelUnavailable as exc:
            logger.warning("pinned model %s is not serving: %s", model_id, exc.reason)

    def _begin_load(self, m: ManagedModel) -> None:
        """Decides the load and the evictions it needs in one synchronous step; raises when there is no room,
        having changed nothing."""
        if self._closing:
            raise ModelUnavailable(m.model_id, m.state, "the server is shutting down")
        for victim in self._victims_for(m):
            self._evict(victim, f"to make room for {m.model_id}")
        pending = list(self._unloading)
        m.state, m.reason, m.reserved_bytes = ModelState.LOADING, None, m.deployment.total_memory_bytes
        m.load_task = asyncio.create_task(self._run_load(m, pending), name=f"load {m.model_id}")

    def _victims_for(self, m: ManagedModel) -> list[ManagedModel]:
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
        for other in sorted(idle, key=ManagedModel.recency_s):
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

    def _evict(self, victim: ManagedModel, why: str) -> None:
        """Unloads a model no request holds, at once: the next request loads it again."""
        assert victim.instance is not None
        engines = victim.instance.engines
        victim.state, victim.instance, victim.reserved_bytes = ModelState.UNLOADED, None, 0
        logger.info("unloading %s: %s", victim.model_id, why)
        task = asyncio.create_task(self._shutdown_engines(victim.model_id, engines))
        self._unloading.add(task)
        task.add_done_callback(self._unloading.discard)

    async def _run_load(self, m: ManagedModel, pending_unloads: list[asyncio.Task[None]]) -> None:
        """Never raises: a failure becomes the model's FAILED state, so one bad model cannot stop others."""
        dep = m.deployment
        engines: list[EngineClient] = []
        started_s = self._clock()
        try:
            await asyncio.gather(*pending_unloads)
            # Replicas in worker processes load side by side; whatever was built is shut down on failure.
            built = await asyncio.gather(
                *(asyncio.to_thread(dep.make_replica) for _ in range(dep.num_replicas)),
                return_exceptions=True,
            )
            engines.extend(e for e in built if not isinstance(e, BaseException))
            failure = next((e for e in built if isinstance(e, BaseException)), None)
            if failure is not None:
                raise failure
            for engine in engines:
                await engine.start()
        except Exception as exc:
            logger.error("loading %s failed: %s: %s", m.model_id, type(exc).__name__, exc, exc_info=exc)
            await self._fail_load(m, engines, f"{type(exc).__name__}: {exc}")
            return
        except asyncio.CancelledError:
            await self._fail_load(m, engines, "the load was cancelled")
            raise
        replicas = [Replica(e, dep.max_running, dep.max_queue) for e in engines]
        pool = ReplicaPool(m.model_id, replicas, m.routing)
        m.last_load_s = self._clock() - started_s
        m.instance = Instance(pool, loaded_at_s=self._clock())
        if dep.autoscaling is not None:
            m.scaler = Scaler(dep.autoscaling)
        m.state = ModelState.LOADED
        m.num_loads += 1
        logger.info(
            "loaded %s (%d replica(s), %s) in %.2f s",
            m.model_id,
            dep.num_replicas,
            format_bytes(dep.total_memory_bytes),
            m.last_load_s,
        )

    async def _fail_load(self, m: ManagedModel, engines: list[EngineClient], reason: str) -> None:
        await self._shutdown_engines(m.model_id, engines)
        m.state, m.reason, m.reserved_bytes = ModelState.FAILED, reason, 0

    async def _wait_for_load(self, m: ManagedModel) -> None:
        """Shielded: a caller that gives up (a client disconnect) must not cancel the load others await."""
        assert m.load_task is not None
        await asyncio.shield(m.load_task)

    async def _stop(
        self, m: ManagedModel, timeout_s: float | None, target: ModelState, why: str
    ) -> ModelStatus:
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

    async def _drain(self, m: ManagedModel, timeout_s: float | None, target: ModelState, why: str) -> None:
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

    def _unavailable(self, m: ManagedModel) -> ModelUnavailable:
        if m.state is ModelState.DRAINING:
            return ModelUnavailable(m.model_id, m.state, "it is being drained")
        return ModelUnavailable(m.model_id, m.state, m.reason or f"it is {m.state}")

    def _status(self, m: ManagedModel) -> ModelStatus:
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
            memory_bytes=m.reserved_bytes or m.deployment.total_memory_bytes,
            in_flight=in_flight,
            idle_s=idle_s,
            num_loads=m.num_loads,
            last_load_s=m.last_load_s,
            replicas=() if instance is None else tuple(map(_replica_status, instance.pool.replicas)),
            routing=m.routing,
            autoscaling=m.deployment.autoscaling,
            last_scaling=m.last_scaling,
            num_scale_ups=m.num_scale_ups,
            num_scale_downs=m.num_scale_downs,
        )


def _replica_status(replica: Replica) -> ReplicaStatus:
    stats = replica.engine.stats()
    return ReplicaStatus(
        index=replica.number,
        running_seqs=stats.num_running_seqs,
        waiting_seqs=stats.num_waiting_seqs,
        in_flight_seqs=replica.in_flight_seqs,
        outstanding_tokens=replica.outstanding_tokens,
        kv_cache_usage=stats.kv_cache_usage,
        healthy=replica.engine.healthy,
        draining=replica.draining,
        pid=getattr(replica.engine, "pid", None),
        node=getattr(replica.engine, "node_ip", None),
        prompt_tokens=stats.num_prompt_tokens,
        cached_prompt_tokens=stats.num_cached_prompt_tokens,
    )


def _stop_reason(target: ModelState, why: str) -> str | None:
    if target is not ModelState.STOPPED:
        return None
    return "the server is shutting down" if why == "shutdown" else "stopped by the operator"
