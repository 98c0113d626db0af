"""Where a generation request comes from, and so how it is scheduled and billed: a live API call
(interactive priority, the key's rate limits, the listing's price, less any off-peak discount) or a line of
a batch (batch priority, no rate limits, the batch's discount, and an answer the dispatcher writes in the
same transaction that charges it)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request

from tokenmill.engine.sampling_params import Priority
from tokenmill.platform.listings import ListingInfo
from tokenmill.platform.pricing import discounted
from tokenmill.serving.deps import state_of

if TYPE_CHECKING:
    from tokenmill.serving.metering import Meter


@dataclass(frozen=True, slots=True)
class Origin:
    priority: Priority = Priority.INTERACTIVE
    discount_bps: int = 0
    """Taken off the listing's prices for this request (quoted on its reservation)."""
    rate_limited: bool = True
    on_admitted: Callable[[Meter], None] | None = None
    """Set for a batch line: receives the request's meter, which then does not settle by itself when the
    request succeeds; its owner settles it together with the line's answer (`Meter.settle_answered`)."""

    @property
    def is_live(self) -> bool:
        return self.priority is Priority.INTERACTIVE

    def priced(self, listing: ListingInfo) -> ListingInfo:
        if not self.discount_bps:
            return listing
        return dataclasses.replace(listing, price=discounted(listing.price, self.discount_bps))


LIVE = Origin()


async def live_origin(request: Request) -> Origin:
    """An API call: interactive, at the off-peak discount when the window is open."""
    discount = state_of(request).tidal.at().live_discount_bps
    return Origin(discount_bps=discount) if discount else LIVE


OriginDep = Annotated[Origin, Depends(live_origin)]
