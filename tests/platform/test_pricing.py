"""The one cost formula against worked examples, and the admin-set price table."""

from __future__ import annotations

import pytest

from tests.platform.helpers import unique
from tokenmill.platform.db import Database
from tokenmill.platform.errors import InvalidAmount, InvalidArgument, ModelNotPriced
from tokenmill.platform.pricing import (
    FREE,
    Price,
    cost_micros,
    get_model_price,
    list_model_prices,
    set_model_price,
)

# $0.15 / 1M input tokens, $0.60 / 1M output tokens.
SMALL = Price(input_micros_per_mtok=150_000, output_micros_per_mtok=600_000)


@pytest.mark.parametrize(
    ("prompt_tokens", "completion_tokens", "price", "expected_micros"),
    [
        (1_000, 500, SMALL, 450),  # 150 + 300, exact
        (1_000_000, 1_000_000, SMALL, 750_000),  # exactly the list prices
        (7, 3, SMALL, 3),  # 1.05 + 1.80 = 2.85 -> 3: the ceiling, once, on the total
        (1, 0, SMALL, 1),  # 0.15 -> 1: never zero for a paid token
        (3, 3, Price(333_333, 1), 2),  # 999_999 + 3 = 1_000_002 -> 1.000002 -> 2
        (0, 0, SMALL, 0),
        (123_456, 7_890, FREE, 0),  # a free model costs nothing
        (2_000, 1_000, Price(2_000_000, 6_000_000), 10_000),  # 2 and 6 micros per token
        (10**9, 10**9, Price(10**12, 10**12), 2 * 10**15),  # large counts stay exact (no float)
    ],
)
def test_cost_is_the_ceiling_of_the_exact_rational(
    prompt_tokens: int, completion_tokens: int, price: Price, expected_micros: int
) -> None:
    assert cost_micros(prompt_tokens, completion_tokens, price) == expected_micros


def test_summing_per_request_costs_never_undercharges_and_overcharges_under_one_micro_each() -> None:
    requests = [(p, c) for p in range(0, 60, 7) for c in range(0, 40, 3)]
    exact_numerator = sum(
        p * SMALL.input_micros_per_mtok + c * SMALL.output_micros_per_mtok for p, c in requests
    )
    charged = sum(cost_micros(p, c, SMALL) for p, c in requests)
    assert exact_numerator <= charged * 1_000_000 < exact_numerator + len(requests) * 1_000_000


@pytest.mark.parametrize("bad", [-1, 1.5, "100", True, None])
def test_prices_and_token_counts_must_be_non_negative_integers(bad: object) -> None:
    with pytest.raises(InvalidAmount):
        Price(bad, 0)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        cost_micros(bad, 0, SMALL)  # type: ignore[arg-type]


def test_admin_sets_and_replaces_prices_and_unpriced_models_are_refused(db: Database) -> None:
    model = unique("model")
    with pytest.raises(ModelNotPriced):
        get_model_price(db, model)
    set_model_price(db, model, 150_000, 600_000)
    assert get_model_price(db, model) == SMALL
    set_model_price(db, model, 0, 0)
    assert get_model_price(db, model).is_free
    assert list_model_prices(db)[model] == FREE
    with pytest.raises(InvalidAmount):
        set_model_price(db, model, -5, 0)
    assert get_model_price(db, model) == FREE  # the refused change wrote nothing
