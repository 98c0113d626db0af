"""The fleet of chat models over the FakeEngine: load on demand, LRU eviction under a memory budget, failed
loads, drain and shutdown, as a client or an operator would see them."""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.serving.fake_engine import FakeEngine
from tokenmill.catalog.fleet_model import ModelDeployment, ModelState, ModelUnavailable, UnknownModel
from tokenmill.catalog.lifecycle import Fleet, Ticket
from tokenmill.catalog.router import ModelOverloaded
from tokenmill.config import ConfigError
from tokenmill.engine.request import RequestOutput
from tokenmill.engine.sampling_params import SamplingParams

MiB = 2**20


class Factory:
    """make_replica for one model: counts the loads, keeps the engines, fails while `fail` is set."""

    def __init__(self, tokenizer: Any, model_id: str) -> None:
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.engines: list[FakeEngine] = []
        self.calls = 0
        self.fail: Exception | None = None
        self.start_gate: threading.Event | None = None

    def __call__(self) -> FakeEngine:
        self.calls += 1
        if self.fail is not None:
            raise self.fail
        engine = FakeEngine(self.tokenizer, model_id=self.model_id, step_delay_s=0.001)
        engine.start_gate = self.start_gate
        self.engines.append(engine)
        return engine

    @property
    def engine(self) -> FakeEngine:
        return self.engines[-1]


def _fleet(
    tokenizer: Any, ids: str, budget_mib: int | None = None, pinned: str = ""
) -> tuple[Fleet, dict[str, Factory]]:
    factories = {model_id: Factory(tokenizer, model_id) for model_id in ids.split()}
    deployments = [
        ModelDeployment(model_id, 100 * MiB, factory, pinned=model_id in pinned.split())
        for model_id, factory in factories.items()
    ]
    clock = itertools.count().__next__  # strictly increasing, so "least recently used" is unambiguous
    budget = None if budget_mib is None else budget_mib * MiB
    return Fleet(deployments, budget, clock=lambda: float(clock())), factories


async def _use(fleet: Fleet, model_id: str) -> str:
    """One whole request: check out, run to the end, release. Returns the reply."""
    with await fleet.checkout(model_id) as ticket:
        engine = ticket.assign(work_tokens=64)
        outputs = [out async for out in engine.generate("Hi", SamplingParams(max_tokens=32), "r")]
    assert outputs[-1].finished
    return outputs[-1].outputs[0].text


async def _stream(ticket: Ticket, request_id: str) -> tuple[AsyncIterator[RequestOutput], FakeEngine]:
    """A request whose stream is in flight: the first snapshot has been read, the rest has not."""
    engine = ticket.assign(work_tokens=64)
    assert isinstance(engine, FakeEngine)
    stream = engine.generate("Tell me a story", SamplingParams(max_tokens=20), request_id)
    await anext(stream)
    return stream, engine


def _states(fleet: Fleet) -> dict[str, ModelState]:
    return {s.model_id: s.state for s in fleet.status()}


async def test_a_model_loads_on_first_use_and_reports_its_status(smollm2_tokenizer):
    fleet, factories = _fleet(smollm2_tokenizer, "a b")
    await fleet.start()
    assert _states(fleet) == {"a": ModelState.UNLOADED, "b": ModelState.UNLOADED}
    assert fleet.status_of("a").idle_s is None and list(fleet.engines()) == []
    assert await _use(fleet, "a")
    status = fleet.status_of("a")
    assert status.state is ModelState.LOADED and status.num_loads == 1 and status.last_load_s is not None
    assert status.in_flight == 0 and status.idle_s is not None and status.memory_bytes == 100 * MiB
    assert [(r.index, r.in_flight_seqs) for r in status.replicas] == [(0, 0)]
    assert list(fleet.engines()) == [("a", 0, factories["a"].engine)]
    assert factories["b"].calls == 0
    with pytest.raises(UnknownModel):
        await fleet.checkout("nope")
    await fleet.shutdown()


async def test_the_least_recently_used_idle_model_makes_room(smollm2_tokenizer):
    fleet, factories = _fleet(smollm2_tokenizer, "a b c", budget_mib=200)
    await _use(fleet, "a")
    await _use(fleet, "b")
    await _use(fleet, "a")  # b is now the least recently used
    assert fleet.memory_used_bytes == 200 * MiB
    assert await _use(fleet, "c")
    assert _states(fleet) == {"a": ModelState.LOADED, "b": ModelState.UNLOADED, "c": ModelState.LOADED}
    assert not factories["b"].engine.started  # its engine was shut down
    assert fleet.memory_used_bytes == 200 * MiB
    assert await _use(fleet, "b")  # and it comes back on demand, in place of a
    assert _states(fleet)["a"] is ModelState.UNLOADED and fleet.status_of("b").num_loads == 2
    await fleet.shutdown()


async def test_a_model_with_a_request_in_flight_is_never_unloaded(smollm2_tokenizer):
    fleet, factories = _fleet(smollm2_tokenizer, "a b c", budget_mib=200)
    busy = await fleet.checkout("a")  # a is the least recently used, but busy
    stream, engine = await _stream(busy, "long")
    await _use(fleet, "b")
    assert await _use(fleet, "c")
    assert _states(fleet) == {"a": ModelState.LOADED, "b": ModelState.UNLOADED, "c": ModelState.LOADED}
    assert engine.started
    rest = [out async for out in stream]  # the stream keeps going to its end
    assert rest[-1].finished and rest[-1].outputs[0].finish_reason in ("stop", "length")
    busy.release()

    # Every loaded model busy: the request for b is refused and nothing changes.
    with await fleet.checkout("a") as on_a, await fleet.checkout("c") as on_c:
        before = (_states(fleet), fleet.memory_used_bytes, factories["b"].calls)
        with pytest.raises(ModelUnavailable) as refused:
            await fleet.checkout("b")
        assert refused.value.retry_after_s == 1 and refused.value.state is ModelState.UNLOADED
        assert refused.value.reason.startswith("not enough memory") and "busy" in refused.value.reason
        assert (_states(fleet), fleet.memory_used_bytes, factories["b"].calls) == before
        assert factories["a"].engine.started and factories["c"].engine.started
        assert on_a.model_id == "a" and on_c.model_id == "c"
    assert await _use(fleet, "b")  # once they are idle there is room again
    await fleet.shutdown()


async def test_concurrent_checkouts_share_one_load(smollm2_tokenizer):
    fleet, factories = _fleet(smollm2_tokenizer, "a")
    factories["a"].start_gate = gate = threading.Event()
    waiting = [asyncio.create_task(fleet.checkout("a")) for _ in range(5)]
    await asyncio.sleep(0)  # let every checkout reach the load
    assert fleet.status_of("a").state is ModelState.LOADING and not any(t.done() for t in waiting)
    gate.set()
    tickets = await asyncio.gather(*waiting)
    assert factories["a"].calls == 1 and fleet.status_of("a").num_loads == 1
    assert fleet.status_of("a").in_flight == 5
    for ticket in tickets:
        ticket.release()
    assert fleet.status_of("a").in_flight == 0
    await fleet.shutdown()


async def test_a_failed_load_is_reported_and_the_others_keep_serving(smollm2_tokenizer):
    fleet, factories = _fleet(smollm2_tokenizer, "good bad", budget_mib=300, pinned="good bad")
    factories["bad"].fail = OSError("weights file is truncated")
    await fleet.start()  # never raises for a load failure
    bad = fleet.status_of("bad")
    assert bad.state is ModelState.FAILED and bad.reason == "OSError: weights file is truncated"
    assert fleet.memory_used_bytes == 100 * MiB  # the failed load's memory was given back
    assert await _use(fleet, "good")
    with pytest.raises(ModelUnavailable) as refused:
        await fleet.checkout("bad")
    assert refused.value.state is ModelState.FAILED and refused.value.retry_after_s is None
    assert "weights file is truncated" in str(refused.value)

    with pytest.raises(ModelUnavailable):
        await fleet.load("bad")  # the operator's retry fails the same way while the file is broken
    factories["bad"].fail = None
    status = await fleet.load("bad")
    assert status.state is ModelState.LOADED and status.reason is None
    assert await _use(fleet, "bad")
    await fleet.shutdown()


async def test_a_load_failing_on_demand_answers_every_waiting_request(smollm2_tokenizer):
    fleet, factories = _fleet(smollm2_tokenizer, "a b")
    factories["a"].fail = RuntimeError("out of memory")
    results = await asyncio.gather(*(fleet.checkout("a") for _ in range(3)), return_exceptions=True)
    assert all(isinstance(r, ModelUnavailable) and "out of memory" in r.reason for r in results)
    assert fleet.status_of("a").state is ModelState.FAILED and fleet.memory_used_bytes == 0
    assert await _use(fleet, "b")
    await fleet.shutdown()


async def test_drain_lets_open_requests_finish_then_stops(smollm2_tokenizer):
    fleet, factories = _fleet(smollm2_tokenizer, "a", pinned="a")
    await fleet.start()
    ticket = await fleet.checkout("a")
    stream, engine = await _stream(ticket, "in-flight")
    draining = asyncio.create_task(fleet.drain("a"))
    await anext(stream)  # the stream keeps producing while the drain waits
    assert fleet.status_of("a").state is ModelState.DRAINING
    with pytest.raises(ModelUnavailable, match="being drained"):
        await fleet.checkout("a")
    rest = [out async for out in stream]
    assert rest[-1].finished and engine.aborted == []
    assert not draining.done() and engine.started
    ticket.release()
    status = await draining
    assert status.state is ModelState.STOPPED and not engine.started and fleet.memory_used_bytes == 0
    with pytest.raises(ModelUnavailable, match="stopped by the operator"):
        await fleet.checkout("a")  # it stays stopped: no load on demand
    assert factories["a"].calls == 1

    assert (await fleet.load("a")).state is ModelState.LOADED
    assert factories["a"].calls == 2 and await _use(fleet, "a")
    await fleet.shutdown()


async def test_drain_with_a_deadline_stops_the_engine_under_open_requests(smollm2_tokenizer):
    fleet, _ = _fleet(smollm2_tokenizer, "a")
    ticket = await fleet.checkout("a")
    stream, engine = await _stream(ticket, "stuck")
    status = await fleet.drain("a", timeout_s=0.05)
    assert status.state is ModelState.STOPPED and not engine.started
    await stream.aclose()
    ticket.release()  # a late release is harmless
    assert fleet.status_of("a").in_flight == 0


async def test_unload_then_a_later_request_loads_it_again(smollm2_tokenizer):
    fleet, factories = _fleet(smollm2_tokenizer, "a")
    await _use(fleet, "a")
    status = await fleet.unload("a")
    assert status.state is ModelState.UNLOADED and not factories["a"].engine.started
    assert fleet.memory_used_bytes == 0 and list(fleet.engines()) == []
    assert await _use(fleet, "a")
    assert factories["a"].calls == 2 and fleet.status_of("a").num_loads == 2
    await fleet.shutdown()


async def test_shutdown_waits_for_open_requests_then_stops_every_engine(smollm2_tokenizer):
    fleet, factories = _fleet(smollm2_tokenizer, "a b")
    await _use(fleet, "b")
    ticket = await fleet.checkout("a")
    stream, engine = await _stream(ticket, "last")
    stopping = asyncio.create_task(fleet.shutdown())
    await anext(stream)
    assert not stopping.done() and engine.started
    with pytest.raises(ModelUnavailable, match="shutting down"):
        await fleet.checkout("b")
    assert [out async for out in stream][-1].finished
    ticket.release()
    await stopping
    assert not engine.started and not factories["b"].engine.started
    assert set(_states(fleet).values()) == {ModelState.STOPPED}


def _deployment(model_id: str, mib: int, pinned: bool = False) -> ModelDeployment:
    return ModelDeployment(model_id, mib * MiB, lambda: None, pinned=pinned)  # type: ignore[arg-type,return-value]


def test_settings_that_could_never_work_are_refused_naming_the_field():
    with pytest.raises(
        ConfigError, match=r"memory_budget: 100 MiB is smaller than the smallest model, x \(300 MiB\)"
    ):
        Fleet([_deployment("x", 300), _deployment("y", 400)], 100 * MiB)
    with pytest.raises(ConfigError, match="memory_budget: .*y"):
        Fleet([_deployment("x", 300), _deployment("y", 600)], 500 * MiB)
    with pytest.raises(ConfigError, match="memory_budget: the pinned models"):
        Fleet([_deployment("x", 300, pinned=True), _deployment("y", 300, pinned=True)], 500 * MiB)
    with pytest.raises(ConfigError, match="'x' is deployed twice"):
        Fleet([_deployment("x", 300), _deployment("x", 300)])
    with pytest.raises(ConfigError, match="num_replicas"):
        ModelDeployment("x", MiB, lambda: None, num_replicas=0)  # type: ignore[arg-type,return-value]
    Fleet([_deployment("x", 300, pinned=True), _deployment("y", 300)], 300 * MiB)  # fits one at a time


async def test_a_request_waits_a_bounded_time_for_its_model_to_start(smollm2_tokenizer):
    factory = Factory(smollm2_tokenizer, "a")
    factory.start_gate = gate = threading.Event()
    fleet = Fleet([ModelDeployment("a", 100 * MiB, factory)], start_wait_s=0.2)
    with pytest.raises(ModelUnavailable) as refused:
        await fleet.checkout("a")  # the load takes longer than the request may wait
    assert refused.value.state is ModelState.LOADING and refused.value.retry_after_s == 5
    assert "still starting" in str(refused.value)
    gate.set()  # the load went on meanwhile, for the next requests
    assert await _use(fleet, "a")
    await fleet.shutdown()


async def test_a_request_waits_a_bounded_time_for_a_restarting_replica(smollm2_tokenizer):
    factory = Factory(smollm2_tokenizer, "a")
    fleet = Fleet([ModelDeployment("a", 100 * MiB, factory)], start_wait_s=0.5)
    assert await _use(fleet, "a")
    factory.engine.healthy = False  # its worker died and is restarting

    async def restarted() -> None:
        await asyncio.sleep(0.1)
        factory.engine.healthy = True

    back = asyncio.create_task(restarted())
    assert await _use(fleet, "a")  # waited for it rather than being refused at once
    await back
    factory.engine.healthy = False  # and stays down: past the wait, the router refuses (503 + Retry-After)
    with await fleet.checkout("a") as ticket, pytest.raises(ModelOverloaded, match="restarting") as refused:
        ticket.assign(work_tokens=64)
    assert refused.value.retry_after_s == 2
    await fleet.shutdown()
