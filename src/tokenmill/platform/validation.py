"""The rules every value a platform function writes is held to, in one place: text is valid Unicode without NUL
of bounded length (a row that a driver cannot encode, or that no response could carry, must never be written) and
integers fit the BIGINT columns with room for sums. Failures are `InvalidArgument`s naming the field; they are
raised before the transaction opens, so a refused call writes nothing."""

from __future__ import annotations

from tokenmill.platform.errors import InvalidArgument
from tokenmill.text import invalid_text_reason

MAX_COUNT = 2**31 - 1
"""Bound of per-key counts (requests or tokens per minute, concurrent requests)."""


def text(field: str, value: object, *, max_len: int, allow_empty: bool = False) -> str:
    """`value` stripped of surrounding whitespace, if it is a string of valid Unicode of at most `max_len`
    characters (and not empty, unless allowed)."""
    if not isinstance(value, str):
        raise InvalidArgument(f"{field}: must be a string")
    reason = invalid_text_reason(value)
    if reason is not None:
        raise InvalidArgument(f"{field}: {reason}")
    if "\x00" in value:  # PostgreSQL text cannot hold it
        raise InvalidArgument(f"{field}: must not contain NUL characters")
    value = value.strip()
    if not value and not allow_empty:
        raise InvalidArgument(f"{field}: must not be empty")
    if len(value) > max_len:
        raise InvalidArgument(f"{field}: at most {max_len} characters")
    return value


def optional_int(field: str, value: object, *, minimum: int, maximum: int) -> int | None:
    if value is None:
        return None
    if type(value) is not int or not minimum <= value <= maximum:
        raise InvalidArgument(f"{field}: must be an integer from {minimum} to {maximum}, or None")
    return value
