"""The fleet's replicas changing while a model serves: the autoscaler's looks (`autoscaler.py` decides,
this carries it out: replicas added beside the serving ones, one drained at a time, an idle model with
`min_replicas: 0` unloaded) and an operator draining one replica. Mixed into `Fleet`, whose state it acts on;
every decision is taken synchronously on the event loop, the slow parts run as the model's `scale_task`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from tokenmill.catalog.fleet_model import ModelState, ModelStatus
from tokenmill.catalog.fleet_state import Instance, ManagedModel
from tokenmill.catalog.router import Replica
from tokenmill.engine.client import EngineClient

logger = logging.getLogger(__name__)

AUTOSCALE_INTERVAL_S = 1.0
"""How often the autoscaler looks at the demand of the models that have a policy."""


class ReplicaScaling:
    """The part of `Fleet` that adds and removes replicas of a loaded model."""

    _models: dict[str, ManagedModel]
    _budget: int | None
    _clock: Callable[[], float]
    _closing: bool
    _autoscale_interval_s: float

    if TYPE_CHECKING:  # Fleet's own

        @property
        def memory_used_bytes(self) -> int: ...

        def _get(self, model_id: str) -> ManagedModel: ...

        def _status(self, m: ManagedModel) -> ModelStatus: ...

        def _evict(self, victim: ManagedModel, why: str) -> None: ...

        async def _shutdown_engines(self, model_id: str, engines: list[EngineClient]) -> None: ...

    async def drain_replica(self, model_id: str, number: int, timeout_s: float | None = None) -> ModelStatus:
        """Takes one replica out (before its node is removed, say): it gets no new requests, finishes those
        it runs (after `timeout_s` it is stopped anyway, ending them with EngineError), then stops. The model
        serves on with the others (the autoscaler may add a replica back). Raises `LookupError` for a
        replica the model does not have, `ValueError` when it is the last one taking requests (drain the
        model instead) or the autoscaler is changing the model's replicas right now."""
        m = self._get(model_id)
        instance = m.instance
        replica = None
        if m.state is ModelState.LOADED and instance is not None:
            replica = next((r for r in instance.pool.replicas if r.number == number), None)
        if replica is None or instance is None:
            raise LookupError(f"the model {model_id!r} has no replica {number} running")
        if m.scaling:
            raise ValueError(f"the replicas of {model_id!r} are being added or drained right now; try again")
        if not replica.draining and instance.pool.num_serving == 1:
            raise ValueError(
                f"replica {number} is the only one of {model_id!r} taking requests; drain the model"
            )
        if not replica.draining:
            instance.pool.drain(replica)
            logger.info("draining replica %d of %s (operator)", number, model_id)
        m.scale_task = asyncio.create_task(
            self._remove_replica(m, instance, replica, timeout_s), name=f"drain {model_id} replica {number}"
        )
        await asyncio.shield(m.scale_task)
        return self._status(m)

    def autoscale(self) -> None:
        """One look at every model with a policy: start adding or draining replicas where its demand has
        wanted another count for long enough, or unload an idle model whose policy allows zero. Decides
        synchronously; the slow parts run as each model's `scale_task`."""
        if self._closing:
            return
        for m in self._models.values():
            if m.scaler is None or m.state is not ModelState.LOADED or m.scaling:
                continue
            assert m.instance is not None
            pool = m.instance.pool
            current, demand = pool.num_serving, m.instance.open_tickets
            target = m.scaler.decide(current, demand, self._clock())
            if target == current:
                continue
            why = f"{demand} request(s) in flight, {m.scaler.policy.target_in_flight} per replica wanted"
            if target > current:
                self._scale_up(m, target - current, why)
            elif target == 0:
                m.num_scale_downs += 1
                self._note_scaling(
                    m, f"1 -> 0 replicas (unloaded): idle for {m.scaler.policy.scale_down_delay_s:g} s"
                )
                self._evict(m, "idle, scaled to zero")
            else:
                self._scale_down(m, why)

    async def _autoscale_forever(self) -> None:
        while True:
            await asyncio.sleep(self._autoscale_interval_s)
            try:
                self.autoscale()
            except Exception:  # noqa: BLE001 - a bug here must not stop the next look
                logger.exception("autoscaling failed")

    def _note_scaling(self, m: ManagedModel, decision: str) -> None:
        m.last_scaling = decision
        logger.info("autoscaling %s: %s", m.model_id, decision)

    def _scale_up(self, m: ManagedModel, count: int, why: str) -> None:
        """Adds up to `count` replicas, as many as the memory budget has room for."""
        assert m.instance is not None
        current, per_replica = m.instance.pool.num_serving, m.deployment.memory_bytes
        if self._budget is not None and per_replica:
            count = min(count, (self._budget - self.memory_used_bytes) // per_replica)
        if count < 1:
            self._note_scaling(m, f"stays at {current} replica(s) ({why}): the memory budget is full")
            return
        m.num_scale_ups += 1
        self._note_scaling(m, f"{current} -> {current + count} replicas: {why}")
        m.reserved_bytes += count * per_replica
        m.scale_task = asyncio.create_task(
            self._add_replicas(m, m.instance, count), name=f"scale up {m.model_id}"
        )

    async def _add_replicas(self, m: ManagedModel, instance: Instance, count: int) -> None:
        dep = m.deployment
        built = await asyncio.gather(
            *(asyncio.to_thread(dep.make_replica) for _ in range(count)), return_exceptions=True
        )
        started: list[EngineClient] = []
        failures = [e for e in built if isinstance(e, BaseException)]
        for engine in (e for e in built if not isinstance(e, BaseException)):
            try:
                await engine.start()
                started.append(engine)
            except Exception as exc:  # noqa: BLE001 - a replica that did not start: logged below
                failures.append(exc)
                await self._shutdown_engines(m.model_id, [engine])
        if failures:
            logger.error(
                "scaling up %s: %d replica(s) failed to start: %s", m.model_id, len(failures), failures[0]
            )
        if m.instance is not instance or m.state is not ModelState.LOADED:
            await self._shutdown_engines(m.model_id, started)  # unloaded meanwhile, which freed the memory
            return
        m.reserved_bytes -= len(failures) * dep.memory_bytes
        for engine in started:
            instance.pool.add(Replica(engine, dep.max_running, dep.max_queue))

    def _scale_down(self, m: ManagedModel, why: str) -> None:
        """Drains the replica with the least work in flight and removes it once its requests have ended."""
        assert m.instance is not None
        pool = m.instance.pool
        serving = [r for r in pool.replicas if not r.draining]
        replica = min(serving, key=lambda r: (r.in_flight_seqs, -r.number))
        m.num_scale_downs += 1
        self._note_scaling(m, f"{len(serving)} -> {len(serving) - 1} replicas: {why}")
        pool.drain(replica)
        m.scale_task = asyncio.create_task(
            self._remove_replica(m, m.instance, replica), name=f"scale down {m.model_id}"
        )

    async def _remove_replica(
        self, m: ManagedModel, instance: Instance, replica: Replica, timeout_s: float | None = None
    ) -> None:
        try:
            await asyncio.wait_for(replica.idle.wait(), timeout_s)
        except TimeoutError:
            logger.warning(
                "replica %d of %s still busy after %s s: stopping it", replica.number, m.model_id, timeout_s
            )
        if m.instance is not instance or m.state is not ModelState.LOADED:
            return  # the whole model is being stopped: its engines, this one included, go with it
        instance.pool.remove(replica)
        await self._shutdown_engines(m.model_id, [replica.engine])
        m.reserved_bytes -= m.deployment.memory_bytes
