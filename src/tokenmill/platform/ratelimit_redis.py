"""Redis `RateLimiter`: several gateway processes share one limit. Each decision is one Lua script (atomic
on the server); the caller's clock is passed in so tests can move time, and keys carry a hash tag."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import Any

import redis

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

# KEYS: requests counter, tokens counter (of the current window), leases zset (member = lease id,
# score = expiry ms). ARGV: now_ms, rpm, tpm, concurrency (-1 = unlimited), tokens asked, lease id,
# lease ttl ms, counter ttl ms. The order of checks mirrors ratelimit_memory.verdict.
_ACQUIRE = """
local now = tonumber(ARGV[1])
local rpm, tpm, conc = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local asked = tonumber(ARGV[5])
local req = tonumber(redis.call('GET', KEYS[1]) or '0')
local tok = tonumber(redis.call('GET', KEYS[2]) or '0')
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
local active = redis.call('ZCARD', KEYS[3])
local verdict = 'ok'
if tpm >= 0 and asked > tpm then verdict = 'request_too_large'
elseif rpm >= 0 and req + 1 > rpm then verdict = 'requests'
elseif tpm >= 0 and tok + asked > tpm then verdict = 'tokens'
elseif conc >= 0 and active >= conc then verdict = 'concurrency'
end
if verdict == 'ok' then
  req = redis.call('INCR', KEYS[1])
  redis.call('PEXPIRE', KEYS[1], ARGV[8])
  tok = redis.call('INCRBY', KEYS[2], asked)
  redis.call('PEXPIRE', KEYS[2], ARGV[8])
  redis.call('ZADD', KEYS[3], now + tonumber(ARGV[7]), ARGV[6])
  redis.call('PEXPIRE', KEYS[3], ARGV[7])
end
return {verdict, req, tok}
"""

# KEYS: leases zset, tokens counter of the lease's window. ARGV: lease id, unused tokens.
_RELEASE = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return 0 end
local unused = tonumber(ARGV[2])
local tok = tonumber(redis.call('GET', KEYS[2]) or '0')
if unused > 0 and tok > 0 then redis.call('DECRBY', KEYS[2], math.min(unused, tok)) end
return 1
"""


def _arg(limit: int | None) -> int:
    return -1 if limit is None else limit


class RedisRateLimiter:
    def __init__(
        self,
        client: redis.Redis,
        *,
        clock: Callable[[], float] = time.time,
        window_s: float = WINDOW_S,
        lease_ttl_s: float = LEASE_TTL_S,
        prefix: str = "tokenmill:rl",
    ) -> None:
        self._client = client
        self._clock = clock
        self._window_ms = round(window_s * 1000)
        self._lease_ttl_ms = round(lease_ttl_s * 1000)
        self._prefix = prefix
        self._acquire: Any = client.register_script(_ACQUIRE)
        self._release: Any = client.register_script(_RELEASE)

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> RedisRateLimiter:
        return cls(redis.Redis.from_url(url), **kwargs)

    def _key(self, bucket: str, what: str) -> str:
        # {bucket} is a Redis Cluster hash tag: all keys of one bucket live on one shard, as Lua requires.
        return f"{self._prefix}:{{{bucket}}}:{what}"

    def acquire(self, bucket: str, limits: RateLimits, num_tokens: int) -> RateLimitDecision:
        check_num_tokens(num_tokens)
        now_ms = round(self._clock() * 1000)
        index = window_index(now_ms, self._window_ms)
        lease = Lease(bucket, secrets.token_hex(8), index, num_tokens)
        outcome, num_requests, window_tokens = self._acquire(
            keys=[
                self._key(bucket, f"req:{index}"),
                self._key(bucket, f"tok:{index}"),
                self._key(bucket, "leases"),
            ],
            args=[
                now_ms,
                _arg(limits.requests_per_minute),
                _arg(limits.tokens_per_minute),
                _arg(limits.max_concurrent_requests),
                num_tokens,
                lease.lease_id,
                self._lease_ttl_ms,
                2 * self._window_ms,
            ],
        )
        verdict = outcome.decode() if isinstance(outcome, bytes) else str(outcome)
        return decide(
            verdict,
            limits,
            num_requests=int(num_requests),
            num_tokens=int(window_tokens),
            now_ms=now_ms,
            window_ms=self._window_ms,
            lease=lease,
        )

    def release(self, lease: Lease, unused_tokens: int = 0) -> None:
        check_num_tokens(unused_tokens)
        self._release(
            keys=[self._key(lease.bucket, "leases"), self._key(lease.bucket, f"tok:{lease.window_index}")],
            args=[lease.lease_id, min(unused_tokens, lease.num_tokens)],
        )

    def close(self) -> None:
        self._client.close()
