"""What buyers in the model square see as a model's live speed and health: figures measured from this
server's own traffic over the last few minutes, not a benchmark run once. Only recent requests count, so a
model that slowed down under load shows it, and a model nobody used lately shows no figures rather than old
ones."""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

_Outcome = Literal["ok", "error", "refused"]


@dataclass(frozen=True, slots=True)
class LiveFigures:
    window_s: int
    requests: int
    """Accepted requests that ended in the window, plus refusals."""
    refused: int
    """Refused with 503 (overloaded or unavailable) before any work."""
    errors: int
    """Accepted, then ended by a server-side (engine) error; a client that disconnects is not one."""
    output_tokens_per_s_p50: float | None
    """Median decode speed of one stream, as one buyer would see it (not the server's total throughput)."""
    ttft_p50_s: float | None
    ttft_p95_s: float | None
    error_rate: float | None
    """errors / accepted; None when nothing was accepted."""
    availability: float | None
    """accepted / (accepted + refused); None without traffic."""

    @property
    def has_traffic(self) -> bool:
        return self.requests > 0


class _Event(NamedTuple):
    ended_at: float
    outcome: _Outcome
    ttft_s: float | None
    output_tokens_per_s: float | None


class LiveStats:
    """Per-model sliding window of request outcomes. Called from the server's one event loop, so it takes
    no locks. Memory is bounded twice: by the window (old events go on every call) and by `max_events` per
    model (the oldest go first), so a burst cannot grow it without limit."""

    def __init__(
        self,
        window_s: float = 900,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_events: int = 10_000,
    ) -> None:
        if not window_s > 0:
            raise ValueError("window_s: must be > 0")
        if max_events < 1:
            raise ValueError("max_events: must be >= 1")
        self._window_s = window_s
        self._clock = clock
        self._max_events = max_events
        self._events: dict[str, deque[_Event]] = {}

    def record_request(
        self, model: str, *, ok: bool, ttft_s: float | None, output_tokens_per_s: float | None
    ) -> None:
        """An accepted request ended. `ttft_s` / `output_tokens_per_s` are None when unknown (no token came
        out; a single token has no decode speed)."""
        _check_measure("ttft_s", ttft_s)
        _check_measure("output_tokens_per_s", output_tokens_per_s)
        self._add(model, _Event(self._clock(), "ok" if ok else "error", ttft_s, output_tokens_per_s))

    def record_refusal(self, model: str) -> None:
        self._add(model, _Event(self._clock(), "refused", None, None))

    def figures(self, model: str) -> LiveFigures:
        events = self._recent(model)
        refused = sum(1 for e in events if e.outcome == "refused")
        errors = sum(1 for e in events if e.outcome == "error")
        accepted = len(events) - refused
        ttfts = sorted(e.ttft_s for e in events if e.ttft_s is not None)
        speeds = sorted(e.output_tokens_per_s for e in events if e.output_tokens_per_s is not None)
        return LiveFigures(
            window_s=int(self._window_s),
            requests=len(events),
            refused=refused,
            errors=errors,
            output_tokens_per_s_p50=nearest_rank(speeds, 50),
            ttft_p50_s=nearest_rank(ttfts, 50),
            ttft_p95_s=nearest_rank(ttfts, 95),
            error_rate=errors / accepted if accepted else None,
            availability=accepted / len(events) if events else None,
        )

    def _add(self, model: str, event: _Event) -> None:
        events = self._events.get(model)
        if events is None:
            events = self._events[model] = deque(maxlen=self._max_events)
        events.append(event)
        self._drop_old(model, event.ended_at)

    def _recent(self, model: str) -> Sequence[_Event]:
        self._drop_old(model, self._clock())
        return self._events.get(model, ())

    def _drop_old(self, model: str, now: float) -> None:
        """An event exactly `window_s` old is out: the window is the half-open (now - window_s, now]."""
        events = self._events.get(model)
        if events is None:
            return
        while events and events[0].ended_at <= now - self._window_s:
            events.popleft()
        if not events:
            del self._events[model]  # a model no longer used costs nothing


def nearest_rank(sorted_values: Sequence[float], percentile: int) -> float | None:
    """The nearest-rank percentile: the smallest value with at least `percentile`% of the values at or
    below it. Always one of the measured values (no interpolation), so a p95 of 20 requests is the 19th
    fastest one, a figure that really happened."""
    if not sorted_values:
        return None
    rank = max(1, -(-percentile * len(sorted_values) // 100))  # ceil in integers: 0.95 * 20 is not 19.0
    return sorted_values[rank - 1]


def _check_measure(name: str, value: float | None) -> None:
    if value is not None and not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name}: must be a finite number >= 0 or None, not {value!r}")
