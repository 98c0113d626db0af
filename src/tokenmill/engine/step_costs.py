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
        `1 + max_slowdown` of the step alone; none while the step alone was never measured."""
        alone = self.estimate(live_tokens)
        if alone is None:
            return 0
        return self.most_within(live_tokens, alone * (1.0 + max_slowdown), limit)

    def most_within(self, base_tokens: int, seconds: float, limit: int) -> int:
        """How many tokens (at most `limit`) may join a step of `base_tokens` keeping its estimated cost
        within `seconds`. Sizes past the largest one measured have no estimate: the answer goes at most one
        size further (that step measures it), so it grows only as far as measurements allow. A binary
        search, as a step asks this for up to a whole token budget: costs grow with the tokens."""
        if limit <= 0 or not self._seconds:
            return 0
        low, high = 0, min(limit, max(self._seconds) - base_tokens + 1)
        while low < high:  # `low` tokens fit; more than `high` do not (or are unmeasured beyond the probe)
            middle = (low + high + 1) // 2
            cost = self.estimate(base_tokens + middle)
            if cost is None or cost <= seconds:  # None: the one size past the measured ones, a probe
                low = middle
            else:
                high = middle - 1
        return low


class TpotPacer:
    """Keeps decoding streams at a target time per output token on average, while prompts take the rest.

    A step cannot be interrupted, so every stream waits for the prompt tokens computed beside it. Prompt
    tokens cost far less each in large chunks than in small ones (on a CPU a 128-token chunk runs through
    the compute-bound GEMM at a third of the per-token cost of 16 tokens beside a few decodes), so rather
    than holding each step to the target, the pacer banks what cheap decode-only steps leave below it and
    lets a prompt chunk spend it: the streams' average stays at the target (their TPOT, as a user measures
    it), a single step may take up to CREDIT_STEPS targets longer. Where the decodes alone take the target,
    nothing is banked and prompts get MIN_PREFILL_TOKENS a step, so they still advance."""

    CREDIT_STEPS = 4
    MIN_PREFILL_TOKENS = 16

    def __init__(self, target_s: float, costs: StepCosts) -> None:
        self.target_s = target_s
        self.costs = costs
        self.credit_s = 0.0
        """Time banked below the target by earlier steps (negative: overspent), within +-CREDIT_STEPS targets."""

    def allowance(self, decodes: int, limit: int) -> int:
        """Prompt tokens (at most `limit`) the next step may add to its `decodes` decoding streams."""
        if not decodes:
            self.credit_s = 0.0  # no stream to keep at speed: the step takes what it likes, nothing is owed
            return limit
        alone = self.costs.estimate(decodes)
        tokens = self.costs.most_within(decodes, self.target_s + self.credit_s, limit)
        if alone is None or alone >= self.target_s:
            tokens = max(tokens, min(limit, self.MIN_PREFILL_TOKENS))
        return tokens

    def spent(self, decodes: int, prompt_tokens: int) -> None:
        """Settle a step of `decodes` streams and `prompt_tokens` beside them against the target."""
        if not decodes:
            return
        cost = self.costs.estimate(decodes + prompt_tokens)
        bound = self.CREDIT_STEPS * self.target_s
        banked = self.credit_s + self.target_s - (self.target_s if cost is None else cost)
        self.credit_s = max(-bound, min(bound, banked))
