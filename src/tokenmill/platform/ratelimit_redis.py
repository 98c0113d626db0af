"""Redis `RateLimiter`: several gateway processes share one limit. Each decision is one Lua script (atomic
on the server); the caller's clock is passed in so tests can move time, and keys carry a hash tag.

Concurrency slots are leases in a zset per bucket, scored by expiry. Each gateway id also has an index of
the leases it holds (a hash: lease id -> bucket), so that a restarted gateway finds and frees the slots its
crashed run left, while its process refreshes the leases it still holds."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

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

# KEYS: leases zset. ARGV: now_ms, new expiry ms, zset ttl ms, lease ids. Pushes back the expiry of those
# leases still live; returns the others (released by any process, or expired), which are not revived.
_REFRESH = """
local now = tonumber(ARGV[1])
local gone = {}
for i = 4, #ARGV do
  local expiry = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if expiry and tonumber(expiry) > now then
    redis.call('ZADD', KEYS[1], 'XX', ARGV[2], ARGV[i])
  else
    gone[#gone + 1] = ARGV[i]
  end
end
if #gone < #ARGV - 3 then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
return gone
"""


def _arg(limit: int | None) -> int:
    return -1 if limit is None else limit


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RedisRateLimiter:
    def __init__(
        self,
        client: redis.Redis,
        *,
        clock: Callable[[], float] = time.time,
        window_s: float = WINDOW_S,
        lease_ttl_s: float = LEASE_TTL_S,
        prefix: str = "tokenmill:rl",
        owner: str = DEFAULT_OWNER,
    ) -> None:
        self._client = client
        self._clock = clock
        self._window_ms = round(window_s * 1000)
        self._lease_ttl_ms = round(lease_ttl_s * 1000)
        self._prefix = prefix
        self._owner = owner
        self._acquire: Any = client.register_script(_ACQUIRE)
        self._release: Any = client.register_script(_RELEASE)
        self._refresh: Any = client.register_script(_REFRESH)
        self._lock = threading.Lock()
        self._held: dict[str, str] = {}
        """lease id -> bucket: the leases this process acquired and has not released (it refreshes them)."""

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> RedisRateLimiter:
        return cls(redis.Redis.from_url(url), **kwargs)

    def _key(self, bucket: str, what: str) -> str:
        # {bucket} is a Redis Cluster hash tag: all keys of one bucket live on one shard, as Lua requires.
        return f"{self._prefix}:{{{bucket}}}:{what}"

    def _owner_key(self, owner: str) -> str:
        # Its own hash tag: the index lives apart from the buckets' shards, so it is written by plain
        # commands next to the bucket's script, never inside it.
        return f"{self._prefix}:owner:{{{owner}}}:leases"

    def acquire(self, bucket: str, limits: RateLimits, num_tokens: int) -> RateLimitDecision:
        check_num_tokens(num_tokens)
        now_ms = round(self._clock() * 1000)
        index = window_index(now_ms, self._window_ms)
        lease = Lease(bucket, secrets.token_hex(8), self._owner, index, num_tokens)
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
        if verdict == "ok":
            self._hold(lease)
        return decide(
            verdict,
            limits,
            num_requests=int(num_requests),
            num_tokens=int(window_tokens),
            asked_tokens=num_tokens,
            now_ms=now_ms,
            window_ms=self._window_ms,
            lease=lease,
        )

    def _hold(self, lease: Lease) -> None:
        """Indexes a new lease under its owner; from then on this process refreshes it. A crash (or a Redis
        error) between the slot and its index leaves a lease no restart finds: its TTL frees it."""
        owner_key = self._owner_key(lease.owner)
        pipe = self._client.pipeline(transaction=False)
        pipe.hset(owner_key, lease.lease_id, lease.bucket)
        pipe.pexpire(owner_key, self._lease_ttl_ms)  # the index of a gateway gone for good goes too
        pipe.execute()
        with self._lock:
            self._held[lease.lease_id] = lease.bucket

    def release(self, lease: Lease, unused_tokens: int = 0) -> None:
        check_num_tokens(unused_tokens)
        with self._lock:
            self._held.pop(lease.lease_id, None)
        self._release(
            keys=[self._key(lease.bucket, "leases"), self._key(lease.bucket, f"tok:{lease.window_index}")],
            args=[lease.lease_id, min(unused_tokens, lease.num_tokens)],
        )
        self._client.hdel(self._owner_key(lease.owner), lease.lease_id)

    def refresh_leases(self) -> int:
        now_ms = round(self._clock() * 1000)
        with self._lock:
            held = dict(self._held)
        by_bucket: dict[str, list[str]] = {}
        for lease_id, bucket in held.items():
            by_bucket.setdefault(bucket, []).append(lease_id)
        owner_key = self._owner_key(self._owner)
        pipe = self._client.pipeline(transaction=False)  # one round trip whatever the number of buckets
        for bucket, lease_ids in by_bucket.items():
            self._refresh(
                keys=[self._key(bucket, "leases")],
                args=[now_ms, now_ms + self._lease_ttl_ms, self._lease_ttl_ms, *lease_ids],
                client=pipe,
            )
        pipe.pexpire(owner_key, self._lease_ttl_ms)
        *gone_per_bucket, _ = pipe.execute()
        gone = [_text(lease_id) for lease_ids in gone_per_bucket for lease_id in lease_ids]
        if gone:
            self._client.hdel(owner_key, *gone)
            with self._lock:
                for lease_id in gone:
                    self._held.pop(lease_id, None)
        return len(held) - len(gone)

    def release_previous_leases(self) -> int:
        owner_key = self._owner_key(self._owner)
        recorded = {_text(k): _text(v) for k, v in self._client.hgetall(owner_key).items()}
        with self._lock:  # (none of this process's own, if it was called late against the contract)
            abandoned = {k: bucket for k, bucket in recorded.items() if k not in self._held}
        if not abandoned:
            return 0
        pipe = self._client.pipeline(transaction=False)
        for lease_id, bucket in abandoned.items():
            pipe.zrem(self._key(bucket, "leases"), lease_id)  # the slot only: its tokens stay counted
        pipe.hdel(owner_key, *abandoned)
        *removed, _ = pipe.execute()
        return sum(removed)  # a lease released meanwhile (its index entry was left) frees nothing

    def close(self) -> None:
        self._client.close()
