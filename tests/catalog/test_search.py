"""The model square's search as a buyer uses it: filters exclude, words match anywhere, sorts are stable
across pages, and a quoted cost is what billing would charge."""

from __future__ import annotations

from dataclasses import replace

import pytest

from tokenmill.catalog.live import LiveFigures
from tokenmill.catalog.search import (
    CatalogEntry,
    CatalogQuery,
    InvalidCatalogQuery,
    request_cost_micros,
    search,
)
from tokenmill.platform.errors import InvalidArgument

QUIET = LiveFigures(900, 0, 0, 0, None, None, None, None, None)


def live(tokens_per_s: float) -> LiveFigures:
    return LiveFigures(900, 10, 0, 0, tokens_per_s, 0.2, 0.4, 0.0, 1.0)


def entry(model: str, **changes: object) -> CatalogEntry:
    base = CatalogEntry(
        model=model,
        display_name=model,
        description="",
        provider="platform",
        task="chat",
        tags=(),
        license="apache-2.0",
        context_length=8192,
        input_micros_per_mtok=0,
        output_micros_per_mtok=0,
        state="loaded",
        live=QUIET,
    )
    return replace(base, **changes)


CATALOG = [
    entry("smollm2", display_name="SmolLM2 135M Instruct", tags=("chat", "small"), live=live(45.0)),
    entry(
        "qwen2.5-7b",
        display_name="Qwen2.5 7B Instruct",
        description="Multilingual chat and coding",
        provider="acme",
        tags=("chat", "code"),
        context_length=32768,
        input_micros_per_mtok=100_000,
        output_micros_per_mtok=300_000,
        live=live(12.0),
    ),
    entry(
        "llama-3-8b",
        display_name="Llama 3 8B",
        provider="Acme",
        context_length=None,
        input_micros_per_mtok=200_000,
        output_micros_per_mtok=300_000,
        state="unloaded",
    ),
    entry(
        "minilm", display_name="all-MiniLM-L6-v2", task="embedding", tags=("embedding",), context_length=256
    ),
]


def ids(query: CatalogQuery, entries: list[CatalogEntry] = CATALOG) -> list[str]:
    page, _ = search(entries, query)
    return [e.model for e in page]


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        (CatalogQuery(), ["minilm", "llama-3-8b", "qwen2.5-7b", "smollm2"]),  # by display name
        (CatalogQuery(task="embedding"), ["minilm"]),
        (CatalogQuery(tag="CODE"), ["qwen2.5-7b"]),
        (CatalogQuery(provider="acme"), ["llama-3-8b", "qwen2.5-7b"]),
        (CatalogQuery(free=True), ["minilm", "smollm2"]),
        (CatalogQuery(free=False), ["llama-3-8b", "qwen2.5-7b"]),
        (CatalogQuery(max_output_price_micros=299_999), ["minilm", "smollm2"]),
        (CatalogQuery(max_output_price_micros=300_000), ["minilm", "llama-3-8b", "qwen2.5-7b", "smollm2"]),
        (CatalogQuery(min_context=8192), ["qwen2.5-7b", "smollm2"]),  # unknown context never matches
        (CatalogQuery(q="instruct"), ["qwen2.5-7b", "smollm2"]),
        (CatalogQuery(q="acme CODING"), ["qwen2.5-7b"]),  # every word, each in any field
        (CatalogQuery(q="small qwen"), []),
        (CatalogQuery(q="embedding"), ["minilm"]),  # a tag
        (CatalogQuery(q="   "), ["minilm", "llama-3-8b", "qwen2.5-7b", "smollm2"]),
        (CatalogQuery(task="chat", free=True, q="smol"), ["smollm2"]),
    ],
)
def test_filters_exclude(query, expected):
    assert ids(query) == expected


@pytest.mark.parametrize(
    ("sort", "expected"),
    [
        ("price", ["minilm", "smollm2", "qwen2.5-7b", "llama-3-8b"]),  # output, then input, then id
        ("-price", ["llama-3-8b", "qwen2.5-7b", "minilm", "smollm2"]),
        ("speed", ["smollm2", "qwen2.5-7b", "llama-3-8b", "minilm"]),  # no recent traffic last
        ("context", ["qwen2.5-7b", "smollm2", "minilm", "llama-3-8b"]),  # unknown last
    ],
)
def test_sorts(sort, expected):
    assert ids(CatalogQuery(sort=sort)) == expected


def test_pages_of_equal_prices_neither_repeat_nor_skip():
    free_models = [entry(f"m{i:02d}") for i in range(25)]
    shuffled = free_models[7:] + free_models[:7]
    pages = [ids(CatalogQuery(sort="price", limit=10, offset=offset), shuffled) for offset in (0, 10, 20)]
    assert [len(p) for p in pages] == [10, 10, 5]
    assert sum(pages, []) == [e.model for e in free_models]
    page, total = search(shuffled, CatalogQuery(sort="price", limit=10, offset=20))
    assert total == 25
    assert search(shuffled, CatalogQuery(limit=10, offset=30)) == ([], 25)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"sort": "popular"}, "sort: must be one of name, price, -price, speed, context, not 'popular'"),
        ({"limit": 0}, "limit: must be an integer from 1 to 100"),
        ({"limit": 101}, "limit: must be an integer from 1 to 100"),
        ({"offset": -1}, "offset: must be an integer >= 0"),
        ({"max_output_price_micros": -5}, "max_output_price_micros: must be an integer >= 0"),
        ({"min_context": -1}, "min_context: must be an integer >= 0"),
    ],
)
def test_a_bad_query_names_the_field(changes, message):
    with pytest.raises(InvalidCatalogQuery) as caught:
        CatalogQuery(**changes)
    assert str(caught.value) == message
    assert isinstance(caught.value, InvalidArgument)  # answered 400 like every bad argument


def test_request_cost_is_the_billing_formula_rounded_up():
    qwen = CATALOG[1]  # 0.10 in, 0.30 out per 1M tokens
    assert request_cost_micros(qwen, 1_000_000, 1_000_000) == 400_000
    assert request_cost_micros(qwen, 1, 0) == 1  # 0.1 micro, charged as 1: never undercharged
    assert request_cost_micros(qwen, 10, 20) == 7  # (10 * 100_000 + 20 * 300_000) / 1e6 = 7
    assert request_cost_micros(CATALOG[0], 50_000, 50_000) == 0  # free
    with pytest.raises(InvalidArgument, match="prompt_tokens"):
        request_cost_micros(qwen, -1, 0)


def test_an_unknown_state_is_refused():
    with pytest.raises(ValueError, match="state: must be one of loaded, loading"):
        entry("m", state="warming")
