"""Model prices (integer micro-units per 1M tokens), the one cost formula, `cost_micros`, and the one
split of a sale between its provider and the platform, `revenue_split`.

Rounding rule of the cost: the exact cost is the rational (prompt x input + completion x output) / 1,000,000
micros; a request is charged its ceiling, once, on the total. The platform never undercharges, and never by
more than one micro per request.

Rounding rule of the split: provider_micros = floor(cost x (10000 - fee_bps) / 10000) and
platform_fee_micros = cost - provider_micros. The buyer's charge is the provider's credit plus the
platform's fee exactly; the provider is never paid more than its exact share, and never less by a whole
micro or more."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from tokenmill.platform.db import Database
from tokenmill.platform.errors import InvalidAmount, InvalidArgument, ModelNotPriced
from tokenmill.platform.tables import ModelPrice
from tokenmill.platform.validation import text

MICROS_PER_UNIT = 1_000_000
"""1 currency unit (e.g. 1 USD) = 1,000,000 micros."""
TOKENS_PER_PRICE = 1_000_000
"""Prices are quoted per 1M tokens."""
BPS_PER_UNIT = 10_000
"""Basis points in the whole: a fee of 10,000 bps is all of the sale."""
MAX_PRICE_MICROS_PER_MTOK = 10**12
"""A million currency units per 1M tokens: far above any real price, far below int64 overflow."""


@dataclass(frozen=True, slots=True)
class Price:
    input_micros_per_mtok: int
    output_micros_per_mtok: int

    def __post_init__(self) -> None:
        for field in ("input_micros_per_mtok", "output_micros_per_mtok"):
            value = getattr(self, field)
            if type(value) is not int or not 0 <= value <= MAX_PRICE_MICROS_PER_MTOK:
                raise InvalidAmount(f"{field}: must be an integer in [0, {MAX_PRICE_MICROS_PER_MTOK}]")

    @property
    def is_free(self) -> bool:
        return self.input_micros_per_mtok == 0 and self.output_micros_per_mtok == 0


FREE = Price(0, 0)


def discounted(price: Price, discount_bps: int) -> Price:
    """`price` less `discount_bps` basis points (batch lines, off-peak hours), each rate rounded down: a
    discount never costs the buyer a fraction of a micro more than its exact share."""
    if type(discount_bps) is not int or not 0 <= discount_bps <= BPS_PER_UNIT:
        raise InvalidArgument(f"discount_bps: must be an integer from 0 to {BPS_PER_UNIT}")
    keep = BPS_PER_UNIT - discount_bps
    return Price(
        price.input_micros_per_mtok * keep // BPS_PER_UNIT,
        price.output_micros_per_mtok * keep // BPS_PER_UNIT,
    )


def cost_micros(prompt_tokens: int, completion_tokens: int, price: Price) -> int:
    """ceil((prompt_tokens * input + completion_tokens * output) / 1e6), in integer arithmetic only."""
    for field, value in (("prompt_tokens", prompt_tokens), ("completion_tokens", completion_tokens)):
        if type(value) is not int or value < 0:
            raise InvalidArgument(f"{field}: must be a non-negative integer")
    exact_numerator = (
        prompt_tokens * price.input_micros_per_mtok + completion_tokens * price.output_micros_per_mtok
    )
    return -(-exact_numerator // TOKENS_PER_PRICE)


def revenue_split(cost_micros: int, fee_bps: int) -> tuple[int, int]:
    """(provider_micros, platform_fee_micros) of a sale of `cost_micros`, in integer arithmetic only; the two
    always add up to the cost (see the module's rounding rule)."""
    if type(cost_micros) is not int or cost_micros < 0:
        raise InvalidArgument("cost_micros: must be a non-negative integer")
    if type(fee_bps) is not int or not 0 <= fee_bps <= BPS_PER_UNIT:
        raise InvalidArgument(f"fee_bps: must be an integer from 0 to {BPS_PER_UNIT}")
    provider_micros = cost_micros * (BPS_PER_UNIT - fee_bps) // BPS_PER_UNIT
    return provider_micros, cost_micros - provider_micros


def set_model_price(
    db: Database, model: str, input_micros_per_mtok: int, output_micros_per_mtok: int
) -> Price:
    """Create or replace a model's price. Requests already admitted keep the price they were quoted."""
    model = text("model", model, max_len=200)
    price = Price(input_micros_per_mtok, output_micros_per_mtok)
    with db.write() as session:
        put_price(session, model, price, db.now())
    return price


def put_price(session: Session, model: str, price: Price, now: datetime) -> None:
    """Create or replace the price row inside the caller's transaction (a listing and its price change
    together). `model` must already be validated."""
    row = session.get(ModelPrice, model)
    if row is None:
        session.add(
            ModelPrice(
                model=model,
                input_micros_per_mtok=price.input_micros_per_mtok,
                output_micros_per_mtok=price.output_micros_per_mtok,
                updated_at=now,
            )
        )
    else:
        row.input_micros_per_mtok = price.input_micros_per_mtok
        row.output_micros_per_mtok = price.output_micros_per_mtok
        row.updated_at = now


def get_model_price(db: Database, model: str) -> Price:
    """Raises `ModelNotPriced`: an unpriced model is refused, never served for free by accident."""
    with db.read() as session:
        row = session.get(ModelPrice, model)
    if row is None:
        raise ModelNotPriced(model)
    return Price(row.input_micros_per_mtok, row.output_micros_per_mtok)


def list_model_prices(db: Database) -> dict[str, Price]:
    with db.read() as session:
        rows = session.scalars(select(ModelPrice).order_by(ModelPrice.model)).all()
    return {r.model: Price(r.input_micros_per_mtok, r.output_micros_per_mtok) for r in rows}


def register_free_models(db: Database, models: Iterable[str]) -> list[str]:
    """Gateway startup: each served model that has no price yet becomes free (0/0), so a fresh `tokenmill
    serve` answers at once and those models fall under each tier's free-model rate limits. A price the
    admin set is never touched. Returns the models registered by this call."""
    wanted = sorted({text("model", model, max_len=200) for model in models})
    for _ in range(3):
        try:
            with db.write() as session:
                priced = set(session.scalars(select(ModelPrice.model).where(ModelPrice.model.in_(wanted))))
                missing = [m for m in wanted if m not in priced]
                session.add_all(
                    ModelPrice(
                        model=m, input_micros_per_mtok=0, output_micros_per_mtok=0, updated_at=db.now()
                    )
                    for m in missing
                )
            return missing
        except IntegrityError:
            continue  # another gateway registered one of them between our read and our insert: read again
    raise RuntimeError("register_free_models: kept losing insert races on model_prices")
