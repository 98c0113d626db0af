"""Serving metrics as pure functions of the request log: latency distributions (TTFT, TPOT, inter-token
latency), throughput over the measurement window, goodput under an SLO, errors by type, and the check of the
server's token counts against the client's. No I/O and no clock here, so tests feed hand-made logs."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from tokenmill.bench.record import RequestRecord


@dataclass(frozen=True, slots=True)
class Slo:
    """What a user of a chat stream needs: the first token soon, then tokens at least as fast as they read."""

    ttft_s: float = 1.0
    """Largest acceptable time to first token."""
    min_tokens_per_s: float = 20.0
    """Slowest acceptable decode rate of one stream (1 / TPOT)."""

    def __post_init__(self) -> None:
        if self.ttft_s <= 0:
            raise ValueError(f"Slo.ttft_s must be > 0, got {self.ttft_s}")
        if self.min_tokens_per_s <= 0:
            raise ValueError(f"Slo.min_tokens_per_s must be > 0, got {self.min_tokens_per_s}")

    def met_by(self, record: RequestRecord) -> bool:
        """A failed request never meets it; a one-token reply has no TPOT and is judged on TTFT alone."""
        first = ttft_s(record)
        if not record.ok or first is None or first > self.ttft_s:
            return False
        per_token = tpot_s(record)
        return per_token is None or per_token * self.min_tokens_per_s <= 1.0


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default), so figures match other tools."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True, slots=True)
class Distribution:
    """Summary of one latency, in seconds; all None when nothing was measured (e.g. every request failed)."""

    count: int
    mean: float | None
    p50: float | None
    p90: float | None
    p99: float | None

    @classmethod
    def of(cls, values: Sequence[float]) -> Distribution:
        if not values:
            return cls(0, None, None, None, None)
        return cls(
            len(values),
            sum(values) / len(values),
            percentile(values, 50),
            percentile(values, 90),
            percentile(values, 99),
        )


def ttft_s(record: RequestRecord) -> float | None:
    """Time to first token: first text-bearing chunk's arrival minus the send time."""
    first = record.first_token_s
    return None if first is None else first - record.send_s


def tpot_s(record: RequestRecord) -> float | None:
    """Time per output token after the first: (end - first token) / (output tokens - 1), with the server's
    token count, so a server that batches tokens into fewer chunks is still measured per token."""
    first = record.first_token_s
    num_tokens = record.num_output_tokens
    if not record.ok or first is None or num_tokens < 2:
        return None
    return (record.end_s - first) / (num_tokens - 1)


def inter_token_latencies_s(record: RequestRecord) -> list[float]:
    """Gaps between consecutive chunks as the user sees them: the stall a reader notices."""
    times = record.chunk_times_s
    return [later - earlier for earlier, later in zip(times, times[1:], strict=False)]


def window_s(records: Sequence[RequestRecord]) -> float:
    """The measurement window: first send to last end over all requests, failed ones included (they held
    the server too). Throughputs divide by it."""
    if not records:
        return 0.0
    return max(r.end_s for r in records) - min(r.send_s for r in records)


@dataclass(frozen=True, slots=True)
class TokenCheck:
    """The server's `usage` against the client's own count of streamed tokens, over successful requests."""

    num_mismatched_requests: int
    """Requests whose `usage.completion_tokens` differs from the number of text-bearing chunks."""
    num_missing_usage: int
    """Requests whose stream carried no usage (the server ignored `stream_options.include_usage`)."""
    usage_output_tokens: int
    streamed_output_tokens: int


def check_tokens(records: Sequence[RequestRecord]) -> TokenCheck:
    ok = [r for r in records if r.ok]
    with_usage = [r for r in ok if r.output_tokens is not None]
    return TokenCheck(
        num_mismatched_requests=sum(1 for r in with_usage if r.output_tokens != r.streamed_tokens),
        num_missing_usage=len(ok) - len(with_usage),
        usage_output_tokens=sum(r.output_tokens or 0 for r in with_usage),
        streamed_output_tokens=sum(r.streamed_tokens for r in ok),
    )


@dataclass(frozen=True, slots=True)
class LoadMetrics:
    """Everything measured at one load point. Rates are per second of the measurement window."""

    num_requests: int
    num_ok: int
    duration_s: float
    request_throughput: float
    input_tokens_per_s: float
    output_tokens_per_s: float
    total_input_tokens: int
    total_output_tokens: int
    cached_input_tokens: int
    ttft_s: Distribution
    tpot_s: Distribution
    itl_s: Distribution
    e2e_latency_s: Distribution
    slo_attainment: float
    """Share of all requests (failed ones count as missing it) that met the SLO."""
    goodput_requests_per_s: float
    goodput_output_tokens_per_s: float
    """Output tokens/s of the requests that met the SLO only."""
    errors: dict[str, int]
    tokens: TokenCheck


def summarize(records: Sequence[RequestRecord], slo: Slo) -> LoadMetrics:
    ok = [r for r in records if r.ok]
    good = [r for r in ok if slo.met_by(r)]
    duration = window_s(records)

    def per_s(amount: float) -> float:
        return amount / duration if duration > 0 else 0.0

    input_tokens = sum(r.prompt_tokens or 0 for r in ok)
    output_tokens = sum(r.num_output_tokens for r in ok)
    return LoadMetrics(
        num_requests=len(records),
        num_ok=len(ok),
        duration_s=duration,
        request_throughput=per_s(len(ok)),
        input_tokens_per_s=per_s(input_tokens),
        output_tokens_per_s=per_s(output_tokens),
        total_input_tokens=input_tokens,
        total_output_tokens=output_tokens,
        cached_input_tokens=sum(r.cached_tokens or 0 for r in ok),
        ttft_s=Distribution.of([v for r in ok if (v := ttft_s(r)) is not None]),
        tpot_s=Distribution.of([v for r in ok if (v := tpot_s(r)) is not None]),
        itl_s=Distribution.of([gap for r in ok for gap in inter_token_latencies_s(r)]),
        e2e_latency_s=Distribution.of([r.end_s - r.send_s for r in ok]),
        slo_attainment=len(good) / len(records) if records else 0.0,
        goodput_requests_per_s=per_s(len(good)),
        goodput_output_tokens_per_s=per_s(sum(r.num_output_tokens for r in good)),
        errors=dict(Counter(r.error for r in records if r.error is not None)),
        tokens=check_tokens(records),
    )
