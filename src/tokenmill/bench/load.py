"""Load shapes: when each request of a load point is sent. Open loop (Poisson arrivals at a request rate, as
independent users arrive, so a slow server builds a queue instead of slowing the senders) or closed loop (a
fixed number of users, each sending its next request when the last one ends). Either stops sending at a
request count and/or a duration, then waits for the requests in flight."""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass

from tokenmill.bench.record import RequestRecord

Sender = Callable[[int, float], Coroutine[None, None, RequestRecord]]
"""send(request index, start of the point on the perf_counter clock) -> its record; never raises."""


@dataclass(frozen=True, slots=True)
class LoadShape:
    """Exactly one of `request_rate` (requests/s; math.inf sends everything at once) and `concurrency`;
    at least one of `num_requests` and `duration_s`."""

    request_rate: float | None = None
    concurrency: int | None = None
    num_requests: int | None = None
    duration_s: float | None = None

    def __post_init__(self) -> None:
        if (self.request_rate is None) == (self.concurrency is None):
            raise ValueError("LoadShape needs exactly one of request_rate and concurrency")
        if self.request_rate is not None and not self.request_rate > 0:
            raise ValueError(f"request_rate must be > 0, got {self.request_rate}")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.num_requests is None and self.duration_s is None:
            raise ValueError("LoadShape needs num_requests or duration_s (or both)")
        if self.num_requests is not None and self.num_requests < 1:
            raise ValueError(f"num_requests must be >= 1, got {self.num_requests}")
        if self.duration_s is not None and not self.duration_s > 0:
            raise ValueError(f"duration_s must be > 0, got {self.duration_s}")

    @property
    def label(self) -> str:
        if self.concurrency is not None:
            return f"concurrency {self.concurrency}"
        return "all at once" if math.isinf(self.request_rate or 0.0) else f"{self.request_rate:g} req/s"

    def may_send(self, index: int, at_s: float) -> bool:
        """Whether request `index` may still be sent `at_s` seconds into the point."""
        if self.num_requests is not None and index >= self.num_requests:
            return False
        return self.duration_s is None or at_s < self.duration_s


def poisson_arrivals_s(rate: float, seed: int) -> Iterator[float]:
    """Send times of a Poisson process: exponential gaps with mean 1/rate, the first request at 0."""
    rng = random.Random(seed)
    at_s = 0.0
    while True:
        yield at_s
        if not math.isinf(rate):
            at_s += rng.expovariate(rate)


async def _open_loop(
    shape: LoadShape, send: Sender, seed: int, done: Callable[[], None]
) -> list[RequestRecord]:
    assert shape.request_rate is not None
    start = time.perf_counter()
    tasks: list[asyncio.Task[RequestRecord]] = []
    for index, at_s in enumerate(poisson_arrivals_s(shape.request_rate, seed)):
        if not shape.may_send(index, at_s):
            break
        delay_s = start + at_s - time.perf_counter()
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        task = asyncio.create_task(send(index, start))
        task.add_done_callback(lambda _: done())
        tasks.append(task)
    return list(await asyncio.gather(*tasks))


async def _closed_loop(shape: LoadShape, send: Sender, done: Callable[[], None]) -> list[RequestRecord]:
    assert shape.concurrency is not None
    start = time.perf_counter()
    indices = itertools.count()
    records: list[tuple[int, RequestRecord]] = []

    async def user() -> None:
        while shape.may_send(index := next(indices), time.perf_counter() - start):
            records.append((index, await send(index, start)))
            done()

    await asyncio.gather(*(user() for _ in range(shape.concurrency)))
    return [record for _, record in sorted(records, key=lambda item: item[0])]


async def run_load(
    shape: LoadShape, send: Sender, seed: int = 0, progress: bool = True
) -> list[RequestRecord]:
    """All requests of one load point, in index order. `progress` shows a tqdm bar on stderr."""
    from tqdm import tqdm

    with tqdm(
        total=shape.num_requests, desc=shape.label, unit="req", disable=not progress, leave=True
    ) as bar:
        if shape.concurrency is not None:
            return await _closed_loop(shape, send, lambda: bar.update(1))
        return await _open_loop(shape, send, seed, lambda: bar.update(1))
