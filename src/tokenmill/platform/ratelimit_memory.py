"""In-process `RateLimiter`: the default for a single gateway process. One lock, O(1) state per bucket.
Its leases live and die with the process, so a restart has nothing of an earlier run to release."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tokenmill.platform.billing import DEFAULT_OWNER
from tokenmill.platform.ratelimit import (
    LEASE_TTL_S,
    WINDOW_S,
    Lease,
    RateLimitDecision,
    RateLimits,
    check_num_tokens,
    decide,
    window_index,
)


@dataclass(slots=True)
class _Bucket:
    window_index: int = -1
    num_requests: int = 0
    num_tokens: int = 0
    leases: dict[str, int] = field(default_factory=dict)
    """lease id -> expiry (ms)."""


def verdict(
    limits: RateLimits, num_requests: int, num_tokens: int, num_active: int, asked_tokens: int
) -> str:
    """The order of checks both backends follow (the Redis Lua script mirrors it)."""
    rpm, tpm, conc = limits.requests_per_minute, limits.tokens_per_minute, limits.max_concurrent_requests
    if tpm is not None and asked_tokens > tpm:
        return "request_too_large"
    if rpm is not None and num_requests + 1 > rpm:
        return "requests"
    if tpm is not None and num_tokens + asked_tokens > tpm:
        return "tokens"
    if conc is not None and num_active >= conc:
        return "concurrency"
    return "ok"


class InMemoryRateLimiter:
    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        window_s: float = WINDOW_S,
        lease_ttl_s: float = LEASE_TTL_S,
        owner: str = DEFAULT_OWNER,
    ) -> None:
        self._clock = clock
        self._owner = owner
        self._window_ms = round(window_s * 1000)
        self._lease_ttl_ms = round(lease_ttl_s * 1000)
        self._lock = threading.Lock()
        self._buckets: dict[str, _Bucket] = {}

    def acquire(self, bucket: str, limits: RateLimits, num_tokens: int) -> RateLimitDecision:
        check_num_tokens(num_tokens)
        now_ms = round(self._clock() * 1000)
        index = window_index(now_ms, self._window_ms)
        with self._lock:
            state = self._buckets.setdefault(bucket, _Bucket())
            if state.window_index != index:
                state.window_index, state.num_requests, state.num_tokens = index, 0, 0
            for lease_id in [k for k, expiry in state.leases.items() if expiry <= now_ms]:
                del state.leases[lease_id]
            outcome = verdict(limits, state.num_requests, state.num_tokens, len(state.leases), num_tokens)
            lease = None
            if outcome == "ok":
                state.num_requests += 1
                state.num_tokens += num_tokens
                lease = Lease(bucket, secrets.token_hex(8), self._owner, index, num_tokens)
                state.leases[lease.lease_id] = now_ms + self._lease_ttl_ms
            return decide(
                outcome,
                limits,
                num_requests=state.num_requests,
                num_tokens=state.num_tokens,
                asked_tokens=num_tokens,
                now_ms=now_ms,
                window_ms=self._window_ms,
                lease=lease,
            )

    def release(self, lease: Lease, unused_tokens: int = 0) -> None:
        check_num_tokens(unused_tokens)
        with self._lock:
            state = self._buckets.get(lease.bucket)
            if state is None or state.leases.pop(lease.lease_id, None) is None:
                return  # already released or expired: releasing twice gives nothing back twice
            if state.window_index == lease.window_index:
                state.num_tokens -= min(unused_tokens, lease.num_tokens, state.num_tokens)

    def refresh_leases(self) -> int:
        now_ms = round(self._clock() * 1000)
        num_held = 0
        with self._lock:
            for state in self._buckets.values():
                for lease_id, expiry in list(state.leases.items()):
                    if expiry <= now_ms:
                        del state.leases[lease_id]  # expired already: its slot may have been taken again
                    else:
                        state.leases[lease_id] = now_ms + self._lease_ttl_ms
                        num_held += 1
        return num_held

    def release_previous_leases(self) -> int:
        return 0  # an earlier process's leases died with it
