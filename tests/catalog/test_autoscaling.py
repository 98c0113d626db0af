"""Autoscaling over the FakeEngine: a burst adds replicas, a lull drains them one at a time (never cutting a
request short), a `min_replicas: 0` model unloads when idle and loads again on its next request, and the
memory budget caps what scaling up may take. The clock is the test's, so every delay is exact."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.catalog.test_lifecycle import Factory, MiB, _stream, _use
from tokenmill.catalog.autoscaler import Scaler, wanted_replicas
from tokenmill.catalog.fleet_model import Autoscaling, ModelDeployment, ModelState, ModelStatus
from tokenmill.catalog.lifecycle import Fleet
from tokenmill.config import ConfigError

POLICY = Autoscaling(min_replicas=1, max_replicas=3, target_in_flight=2, scale_down_delay_s=5)
SAFETY_S = 10.0


class Clock:
    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s


def _fleet(
    tokenizer: Any, policy: Autoscaling, budget_mib: int | None = None, replicas: int = 1
) -> tuple[Fleet, Factory, Clock]:
    factory, clock = Factory(tokenizer, "m"), Clock()
    deployment = ModelDeployment("m", 100 * MiB, factory, num_replicas=replicas, autoscaling=policy)
    budget = None if budget_mib is None else budget_mib * MiB
    # The loop's own looks never come in a test's way: the test looks when it means to.
    return Fleet([deployment], budget, clock=clock, autoscale_interval_s=3600), factory, clock


async def _settled(fleet: Fleet, replicas: int) -> ModelStatus:
    """The status once the model serves `replicas` replicas and drains none (scaling runs in tasks)."""
    for _ in range(int(SAFETY_S / 0.005)):
        status = fleet.status_of("m")
        if len(status.replicas) == replicas and not any(r.draining for r in status.replicas):
            return status
        await asyncio.sleep(0.005)
    raise AssertionError(f"not {replicas} replicas in time: {fleet.status_of('m')}")


def test_the_wanted_count_follows_demand_within_the_bounds():
    assert [wanted_replicas(POLICY, n) for n in (0, 1, 2, 3, 5, 6, 100)] == [1, 1, 1, 2, 3, 3, 3]
    to_zero = Autoscaling(min_replicas=0, max_replicas=2)
    assert [wanted_replicas(to_zero, n) for n in (0, 1, 9)] == [0, 1, 2]


def test_the_count_moves_only_after_its_delay_up_at_once_and_down_one_at_a_time():
    scaler = Scaler(Autoscaling(max_replicas=4, target_in_flight=1, scale_up_delay_s=2, scale_down_delay_s=5))
    assert scaler.decide(1, 4, now_s=0) == 1  # demand for 4 starts now
    assert scaler.decide(1, 4, now_s=1) == 1
    assert scaler.decide(1, 4, now_s=2) == 4  # held for the delay: all the way up
    assert scaler.decide(4, 0, now_s=3) == 4
    assert scaler.decide(4, 4, now_s=7) == 4  # the lull ended before the delay: it starts over
    assert scaler.decide(4, 0, now_s=8) == 4
    assert scaler.decide(4, 0, now_s=13) == 3  # one step down per delay
    assert scaler.decide(3, 0, now_s=14) == 3
    assert scaler.decide(3, 0, now_s=19) == 2
    assert scaler.decide(2, 3, now_s=20) == 2  # a short burst does not count yet


def test_policies_that_cannot_work_are_refused():
    with pytest.raises(ConfigError, match="max_replicas"):
        Autoscaling(min_replicas=3, max_replicas=2)
    with pytest.raises(ConfigError, match="target_in_flight"):
        Autoscaling(target_in_flight=0)
    with pytest.raises(ConfigError, match="num_replicas"):
        ModelDeployment("m", 1, lambda: None, num_replicas=4, autoscaling=POLICY)  # type: ignore[arg-type, return-value]
    with pytest.raises(ConfigError, match="pinned"):
        ModelDeployment("m", 1, lambda: None, pinned=True, autoscaling=Autoscaling(min_replicas=0))  # type: ignore[arg-type, return-value]


async def test_a_burst_adds_replicas_and_a_lull_drains_them_one_at_a_time(smollm2_tokenizer):
    fleet, factory, clock = _fleet(smollm2_tokenizer, POLICY)
    await _use(fleet, "m")
    burst = [await fleet.checkout("m") for _ in range(5)]
    fleet.autoscale()  # 5 in flight, 2 per replica wanted: 3 replicas, at once (no scale-up delay)
    status = await _settled(fleet, 3)
    assert fleet.memory_used_bytes == 300 * MiB == status.memory_bytes
    assert status.num_scale_ups == 1 and status.last_scaling.startswith("1 -> 3 replicas: 5 request(s)")
    engines = {ticket.assign(work_tokens=64) for ticket in burst}
    assert engines == set(factory.engines)  # the router spreads the burst over all three

    for ticket in burst:
        ticket.release()
    fleet.autoscale()  # the lull starts
    clock.now_s = 4.9
    fleet.autoscale()
    assert len(fleet.status_of("m").replicas) == 3
    clock.now_s = 5
    fleet.autoscale()
    await _settled(fleet, 2)
    clock.now_s = 10
    fleet.autoscale()
    status = await _settled(fleet, 1)
    assert status.num_scale_downs == 2 and fleet.memory_used_bytes == 100 * MiB
    assert sum(e.started for e in factory.engines) == 1  # the drained ones were shut down
    clock.now_s = 100
    fleet.autoscale()  # min_replicas 1: it stays
    assert (await _settled(fleet, 1)).state is ModelState.LOADED
    assert await _use(fleet, "m")
    await fleet.shutdown()


async def test_a_drained_replica_finishes_its_requests_and_takes_no_new_ones(smollm2_tokenizer):
    fleet, factory, clock = _fleet(smollm2_tokenizer, POLICY, replicas=2)
    first, second = await fleet.checkout("m"), await fleet.checkout("m")
    stream_a, engine_a = await _stream(first, "a")
    stream_b, engine_b = await _stream(second, "b")
    assert engine_a is not engine_b
    clock.now_s = 5
    fleet.autoscale()
    clock.now_s = 10
    fleet.autoscale()  # 2 in flight want 1 replica, for the whole delay: one is drained
    status = fleet.status_of("m")
    assert [r.draining for r in status.replicas] == [False, True]  # the same load: the newer one goes
    for _ in range(3):
        with await fleet.checkout("m") as ticket:
            assert ticket.assign(work_tokens=64) is engine_a
    rest = [out async for out in stream_b]  # the drained replica's stream runs to its end
    assert rest[-1].finished and rest[-1].outputs[0].finish_reason in ("stop", "length")
    assert engine_b.started and len(fleet.status_of("m").replicas) == 2
    second.release()
    status = await _settled(fleet, 1)
    assert not engine_b.started and engine_a.started and fleet.memory_used_bytes == 100 * MiB
    assert [out async for out in stream_a][-1].finished
    first.release()
    await fleet.shutdown()


async def test_a_model_scales_to_zero_when_idle_and_back_on_its_next_request(smollm2_tokenizer):
    fleet, factory, clock = _fleet(smollm2_tokenizer, Autoscaling(min_replicas=0, scale_down_delay_s=30))
    await fleet.start()
    assert fleet.status_of("m").state is ModelState.UNLOADED  # nothing loads before a request
    assert await _use(fleet, "m")
    with await fleet.checkout("m"):
        fleet.autoscale()
        clock.now_s = 60
        fleet.autoscale()  # a request is open: not idle, however long
        assert fleet.status_of("m").state is ModelState.LOADED
    fleet.autoscale()
    clock.now_s = 89
    fleet.autoscale()
    assert fleet.status_of("m").state is ModelState.LOADED
    clock.now_s = 90
    fleet.autoscale()
    status = fleet.status_of("m")
    assert status.state is ModelState.UNLOADED and fleet.memory_used_bytes == 0
    assert status.num_scale_downs == 1 and "1 -> 0" in status.last_scaling
    assert await _use(fleet, "m")  # the cold start is this request's
    status = fleet.status_of("m")
    assert status.state is ModelState.LOADED and status.num_loads == 2 and status.last_load_s is not None
    assert len(factory.engines) == 2 and not factory.engines[0].started
    await fleet.shutdown()


async def test_scaling_up_takes_only_what_the_memory_budget_has_room_for(smollm2_tokenizer):
    fleet, factory, _ = _fleet(smollm2_tokenizer, POLICY, budget_mib=250)
    tickets = [await fleet.checkout("m") for _ in range(6)]
    fleet.autoscale()  # wants 3, the budget holds 2
    status = await _settled(fleet, 2)
    assert status.last_scaling.startswith("1 -> 2 replicas") and fleet.memory_used_bytes == 200 * MiB
    fleet.autoscale()
    assert "the memory budget is full" in fleet.status_of("m").last_scaling
    assert len(factory.engines) == 2
    for ticket in tickets:
        ticket.release()
    await fleet.shutdown()


async def test_a_replica_that_fails_to_start_gives_its_memory_back(smollm2_tokenizer):
    fleet, factory, _ = _fleet(smollm2_tokenizer, POLICY)
    tickets = [await fleet.checkout("m") for _ in range(3)]
    factory.fail = RuntimeError("out of memory")
    fleet.autoscale()
    for _ in range(int(SAFETY_S / 0.005)):
        if fleet.memory_used_bytes == 100 * MiB:
            break
        await asyncio.sleep(0.005)
    assert len(fleet.status_of("m").replicas) == 1 and fleet.memory_used_bytes == 100 * MiB
    factory.fail = None
    fleet.autoscale()  # the next look tries again
    await _settled(fleet, 2)
    for ticket in tickets:
        ticket.release()
    await fleet.shutdown()


async def test_the_autoscaler_runs_on_its_own_once_the_fleet_starts(smollm2_tokenizer):
    factory = Factory(smollm2_tokenizer, "m")
    deployment = ModelDeployment("m", 100 * MiB, factory, autoscaling=POLICY)
    fleet = Fleet([deployment], autoscale_interval_s=0.01)
    await fleet.start()
    tickets = [await fleet.checkout("m") for _ in range(4)]
    await _settled(fleet, 2)
    for ticket in tickets:
        ticket.release()
    await fleet.shutdown()
    assert not any(e.started for e in factory.engines)


async def test_the_operator_drains_one_replica_and_the_model_serves_on(smollm2_tokenizer):
    factory = Factory(smollm2_tokenizer, "m")
    fleet = Fleet([ModelDeployment("m", 100 * MiB, factory, num_replicas=2)])
    busy = await fleet.checkout("m")
    stream, engine = await _stream(busy, "long")
    (number,) = [r.index for r in fleet.status_of("m").replicas if r.in_flight_seqs]
    with pytest.raises(LookupError):
        await fleet.drain_replica("m", 7)
    draining = asyncio.create_task(fleet.drain_replica("m", number))
    await asyncio.sleep(0)
    assert [r.draining for r in fleet.status_of("m").replicas if r.index == number] == [True]
    with await fleet.checkout("m") as ticket:
        assert ticket.assign(work_tokens=64) is not engine  # new requests go to the other one
    assert not draining.done()
    assert [out async for out in stream][-1].finished  # the drained replica finishes what it runs
    busy.release()
    status = await draining
    assert [r.index for r in status.replicas] == [1 - number] and fleet.memory_used_bytes == 100 * MiB
    assert not engine.started
    with pytest.raises(ValueError, match="only one"):
        await fleet.drain_replica("m", 1 - number)
    assert await _use(fleet, "m")
    await fleet.shutdown()
