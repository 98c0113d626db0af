"""Tidal use of capacity: batch work fills what live traffic leaves, priced lower for it, and may take more
of the machine during an optional off-peak window (say 00:00-08:00 in the operator's time zone), when live
traffic may be discounted too. One place decides, from the clock, what each of those is right now."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, time
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from tokenmill.config import BatchBudget, ConfigError
from tokenmill.platform.pricing import BPS_PER_UNIT

_WINDOW_RE = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)$")


@dataclass(frozen=True, slots=True)
class TidalSettings:
    batch_discount_bps: int = 5_000
    """Batch lines pay the model's prices less this many basis points (5,000: half price)."""
    batch_lines_in_flight: int = 8
    """Lines of batches a model's replicas work on at once outside the off-peak window: enough to fill the
    steps live traffic leaves free, few enough that the engine's queue stays short (the scheduler gives
    batch work only the tokens left after live work, so more lines would only wait)."""
    batch_budget: BatchBudget = field(default_factory=BatchBudget)
    """How much of each engine step batch work may take (set on every engine by the batch dispatcher)."""
    off_peak: str | None = None
    """`HH:MM-HH:MM` in `timezone` (may wrap past midnight); None: no off-peak window."""
    timezone: str = "UTC"
    off_peak_batch_lines_in_flight: int = 32
    off_peak_batch_budget: BatchBudget = field(
        default_factory=lambda: BatchBudget(max_slowdown=0.5, fill_tokens=64, idle_tokens=512)
    )
    """Off peak, batch work may take more of each step: more batch progress for some live latency."""
    off_peak_live_discount_bps: int = 0
    """Off peak, live requests pay the model's prices less this many basis points."""

    def __post_init__(self) -> None:
        for name in ("batch_discount_bps", "off_peak_live_discount_bps"):
            value = getattr(self, name)
            if type(value) is not int or not 0 <= value <= BPS_PER_UNIT:
                raise ConfigError(f"{name}: must be an integer from 0 to {BPS_PER_UNIT}")
        for name in ("batch_lines_in_flight", "off_peak_batch_lines_in_flight"):
            if not 1 <= getattr(self, name) <= 4096:
                raise ConfigError(f"{name}: must be from 1 to 4096")
        if self.off_peak is not None and not _WINDOW_RE.match(self.off_peak):
            raise ConfigError(f"off_peak: {self.off_peak!r} must be HH:MM-HH:MM, e.g. 00:00-08:00")
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ConfigError(
                f"timezone: unknown time zone {self.timezone!r} (an IANA name, e.g. Asia/Shanghai)"
            ) from None


@dataclass(frozen=True, slots=True)
class Tide:
    """What the policy is at one moment."""

    off_peak: bool
    batch_lines_in_flight: int
    batch_budget: BatchBudget
    live_discount_bps: int


class TidalSchedule:
    def __init__(self, settings: TidalSettings) -> None:
        self.settings = settings
        self._zone = ZoneInfo(settings.timezone)
        self._window: tuple[time, time] | None = None
        if settings.off_peak is not None:
            start, end = settings.off_peak.split("-")
            self._window = (time.fromisoformat(start), time.fromisoformat(end))

    def is_off_peak(self, now: datetime | None = None) -> bool:
        if self._window is None:
            return False
        local = (now or datetime.now(UTC)).astimezone(self._zone).time()
        start, end = self._window
        if start <= end:
            return start <= local < end
        return local >= start or local < end  # wraps past midnight

    def at(self, now: datetime | None = None) -> Tide:
        s = self.settings
        if self.is_off_peak(now):
            return Tide(
                True,
                s.off_peak_batch_lines_in_flight,
                s.off_peak_batch_budget,
                s.off_peak_live_discount_bps,
            )
        return Tide(False, s.batch_lines_in_flight, s.batch_budget, 0)
