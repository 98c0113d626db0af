"""What an engine step costs, by the number of tokens in it, measured as the engine runs. The scheduler asks
how many batch tokens it can add to a step of live work before that step gets more than a given share
slower: on a CPU a few extra rows are nearly free while the step is bound by reading the weights, and cost
nearly their share once it is bound by arithmetic, and where that turns depends on the machine (and on the
day, on a shared one). Measured, not assumed. Pure Python, no torch."""

from __future__ import annotations

EXACT_UP_TO = 32
"""Step sizes up to this are kept one by one (where live decode steps are); larger ones by powers of two, as a
cost per token: a step that large is bound by arithmetic, so its cost grows with its tokens."""
SMOOTHING = 0.2
"""Weight of a new measurement in the running average: recent steps count, one outlier does not rule."""


def _bucket(num_tokens: int) -> int:
    if num_tokens <= EXACT_UP_TO:
        return num_tokens
    return 1 << (num_tokens - 1).bit_length()


class StepCosts:
    def __init__(self) -> None:
        self._seconds: dict[int, float] = {}
        """Step size (or power-of-two bucket) -> running average seconds (per token, for buckets)."""

    def observe(self, num_tokens: int, seconds: float) -> None:
        if num_tokens < 1 or not seconds > 0:
            return
        key = _bucket(num_tokens)
        value = seconds if key <= EXACT_UP_TO else seconds / num_tokens
        old = self._seconds.get(key)
        self._seconds[key] = value if old is None else old + SMOOTHING * (value - old)

    def estimate(self, num_tokens: int) -> float | None:
        """The running average of steps of this size, else a straight line between the nearest measured
        sizes around it, else None (nothing measured at or above it)."""
        key = _bucket(num_tokens)
        if key > EXACT_UP_TO and key in self._seconds:
            return self._seconds[key] * num_tokens
        if key in self._seconds:
            return self._seconds[key]
        below = max((k for k in self._seconds if k < key), default=None)
        above = min((k for k in self._seconds if k > key), default=None)
        if above is None:
            return None
        high = self._size_cost(above)
        if below is None:
            return high
        low = self._size_cost(below)
        return low + (high - low) * (num_tokens - below) / (above - below)

    def _size_cost(self, key: int) -> float:
        return self._seconds[key] * key if key > EXACT_UP_TO else self._seconds[key]

    def affordable(self, live_tokens: int, max_slowdown: float, limit: int) -> int:
        """How many tokens (at most `limit`) may join a step of `live_tokens` keeping it within
        `1 + max_slowdown` of the step alone. Where nothing larger was measured yet, one size further than
        what was: that step measures it, so the answer grows only as far as measurements allow."""
        if limit <= 0:
            return 0
        alone = self.estimate(live_tokens)
        if alone is None:
            return 0  # the live step itself has not been measured yet: take nothing until it has
        bound = alone * (1.0 + max_slowdown)
        for candidate in range(1, limit + 1):
            cost = self.estimate(live_tokens + candidate)
            if cost is None:
                return candidate  # not measured yet: this step measures it
            if cost > bound:
                return candidate - 1
        return limit
