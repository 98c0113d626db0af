"""The autoscaler's decision for one model: how many replicas its demand wants, and when to move there.

Demand is the requests in flight (running or waiting for a seat); a model wants ceil(demand / target)
replicas within [min_replicas, max_replicas]. The count moves only after the want has held for the delay in
its direction, so a burst shorter than the scale-up delay adds nothing and a lull shorter than the
scale-down delay removes nothing. It goes up to the wanted count in one move (a burst needs capacity now)
and down one replica per delay (capacity returns slowly, in case the lull ends). Zero is reached only when
nothing is in flight: the model is then unloaded and its next request loads it again."""

from __future__ import annotations

import math

from tokenmill.catalog.fleet_model import Autoscaling


def wanted_replicas(policy: Autoscaling, in_flight: int) -> int:
    wanted = math.ceil(in_flight / policy.target_in_flight)
    return min(policy.max_replicas, max(policy.min_replicas, wanted))


class Scaler:
    """Remembers since when a model has wanted more, or fewer, replicas than it has."""

    def __init__(self, policy: Autoscaling) -> None:
        self.policy = policy
        self._up_since: float | None = None
        self._down_since: float | None = None

    def decide(self, replicas: int, in_flight: int, now_s: float) -> int:
        """The replica count to move to now; `replicas` when nothing should change yet."""
        wanted = wanted_replicas(self.policy, in_flight)
        if wanted > replicas:
            self._down_since = None
            self._up_since = now_s if self._up_since is None else self._up_since
            if now_s - self._up_since >= self.policy.scale_up_delay_s:
                self._up_since = None
                return wanted
        elif wanted < replicas:
            self._up_since = None
            self._down_since = now_s if self._down_since is None else self._down_since
            if now_s - self._down_since >= self.policy.scale_down_delay_s:
                self._down_since = now_s  # the next step down waits a whole delay from this one
                return replicas - 1
        else:
            self._up_since = self._down_since = None
        return replicas
