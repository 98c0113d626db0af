"""Amounts typed by people -> exact micros: decimals parse exactly, anything ambiguous is refused."""

from __future__ import annotations

import pytest

from tokenmill.platform.errors import InvalidAmount
from tokenmill.platform.money import format_micros, parse_units


@pytest.mark.parametrize(
    ("text", "micros"),
    [
        ("10", 10_000_000),
        ("2.5", 2_500_000),
        ("0.000001", 1),
        (" 0.10 ", 100_000),
        ("123456.789012", 123456789012),
    ],
)
def test_decimal_amounts_parse_exactly(text: str, micros: int) -> None:
    assert parse_units(text, "amount") == micros


@pytest.mark.parametrize(
    "text", ["", "-5", "+5", "1e3", "nan", "inf", "1.2.3", "0.0000001", "five", "1,5", "0"]
)
def test_ambiguous_amounts_are_refused_naming_the_field(text: str) -> None:
    with pytest.raises(InvalidAmount, match=r"^amount: "):
        parse_units(text, "amount")


def test_zero_only_where_allowed() -> None:
    assert parse_units("0", "input", allow_zero=True) == 0


@pytest.mark.parametrize(
    ("micros", "text"), [(0, "0.000000"), (1, "0.000001"), (12_500_000, "12.500000"), (-7, "-0.000007")]
)
def test_formatting_shows_every_micro(micros: int, text: str) -> None:
    assert format_micros(micros) == text
    if micros >= 0:
        assert parse_units(text, "x", allow_zero=True) == micros
