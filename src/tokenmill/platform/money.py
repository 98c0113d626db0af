"""Money as people type and read it ("12.50") <-> integer micros, exactly: Decimal parsing, no floats, and a
refusal (not a rounding) when an amount has more precision than one micro."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

from tokenmill.platform.errors import InvalidAmount
from tokenmill.platform.pricing import MICROS_PER_UNIT

_DECIMAL_PLACES = 6
"""One micro = 10^-6 units: the finest amount the ledger stores."""


def parse_units(text: str, field: str, *, allow_zero: bool = False) -> int:
    """ "12.5" -> 12_500_000. Raises `InvalidAmount` naming `field` for anything that is not a plain
    non-negative decimal (signs, exponents, NaN, more than 6 decimals): a typo must not move money."""
    cleaned = text.strip()
    if not cleaned or not all(c.isdigit() or c == "." for c in cleaned) or cleaned.count(".") > 1:
        raise InvalidAmount(f"{field}: {text!r} is not an amount such as 10 or 2.50")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        raise InvalidAmount(f"{field}: {text!r} is not an amount such as 10 or 2.50") from None
    micros = value * MICROS_PER_UNIT
    if micros != micros.to_integral_value():
        raise InvalidAmount(f"{field}: {text!r} has more than {_DECIMAL_PLACES} decimal places")
    if micros == 0 and not allow_zero:
        raise InvalidAmount(f"{field}: must be positive")
    return int(micros)


def format_micros(micros: int) -> str:
    """12_500_000 -> "12.500000": every digit shown, so sums of displayed amounts add up."""
    sign = "-" if micros < 0 else ""
    units, rest = divmod(abs(micros), MICROS_PER_UNIT)
    return f"{sign}{units}.{rest:0{_DECIMAL_PLACES}d}"
