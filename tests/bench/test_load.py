"""Load shapes against a fake sender (no server): Poisson arrivals, closed-loop concurrency, bounds."""

from __future__ import annotations

import asyncio
import itertools
import math
import time

import pytest

from tokenmill.bench.load import LoadShape, poisson_arrivals_s, run_load
from tokenmill.bench.record import RequestRecord


class FakeServer:
    """Answers every request after `latency_s`; remembers the most requests it ever had in flight."""

    def __init__(self, latency_s: float) -> None:
        self.latency_s = latency_s
        self.in_flight = 0
        self.max_in_flight = 0
        self.indices: list[int] = []

    async def send(self, index: int, start: float) -> RequestRecord:
        record = RequestRecord(send_s=time.perf_counter() - start)
        self.indices.append(index)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        await asyncio.sleep(self.latency_s)
        self.in_flight -= 1
        record.end_s = time.perf_counter() - start
        return record


def test_poisson_arrivals() -> None:
    arrivals = list(itertools.islice(poisson_arrivals_s(4.0, seed=1), 20_001))
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert arrivals[0] == 0.0 and all(gap >= 0 for gap in gaps)
    assert sum(gaps) / len(gaps) == pytest.approx(0.25, rel=0.03)  # mean gap 1/rate
    # Exponential gaps: the standard deviation equals the mean (a fixed-interval sender would have none).
    mean = sum(gaps) / len(gaps)
    assert math.sqrt(sum((g - mean) ** 2 for g in gaps) / len(gaps)) == pytest.approx(0.25, rel=0.05)
    assert list(itertools.islice(poisson_arrivals_s(4.0, seed=1), 5)) == arrivals[:5]  # seeded
    assert list(itertools.islice(poisson_arrivals_s(math.inf, seed=1), 3)) == [0.0, 0.0, 0.0]


def test_load_shape_validation_and_labels() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        LoadShape(request_rate=1.0, concurrency=2, num_requests=1)
    with pytest.raises(ValueError, match="num_requests or duration_s"):
        LoadShape(request_rate=1.0)
    assert LoadShape(request_rate=2.0, num_requests=1).label == "2 req/s"
    assert LoadShape(request_rate=math.inf, num_requests=1).label == "all at once"
    assert LoadShape(concurrency=4, duration_s=1.0).label == "concurrency 4"


async def test_closed_loop_keeps_concurrency_users_busy() -> None:
    server = FakeServer(latency_s=0.02)
    records = await run_load(LoadShape(concurrency=3, num_requests=10), server.send, progress=False)
    assert len(records) == 10 and sorted(server.indices) == list(range(10))
    assert server.max_in_flight == 3


async def test_open_loop_all_at_once() -> None:
    server = FakeServer(latency_s=0.05)
    records = await run_load(LoadShape(request_rate=math.inf, num_requests=8), server.send, progress=False)
    # All 8 were in flight at once: nobody waited for an answer before sending.
    assert len(records) == 8 and server.max_in_flight == 8


async def test_open_loop_does_not_wait_for_answers() -> None:
    """At 50 req/s with 0.3 s answers the server holds many requests at once: arrivals are independent."""
    server = FakeServer(latency_s=0.3)
    await run_load(LoadShape(request_rate=50.0, num_requests=20), server.send, seed=2, progress=False)
    assert server.max_in_flight >= 5


async def test_duration_bounds_sending() -> None:
    # A request cap far above what 0.3 s allows: if the duration were ignored, all 1000 would be sent.
    # (No wall-clock bounds: on a loaded machine the event loop may run late.)
    server = FakeServer(latency_s=0.01)
    records = await run_load(
        LoadShape(request_rate=100.0, duration_s=0.3, num_requests=1000), server.send, progress=False
    )
    assert 1 <= len(records) < 200
    closed = await run_load(
        LoadShape(concurrency=2, duration_s=0.1, num_requests=1000), FakeServer(0.02).send, progress=False
    )
    assert 1 <= len(closed) < 200
