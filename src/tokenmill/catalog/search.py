"""Finding a model in the model square: filter, search, sort and page over catalog entries the caller may
see, and what one request would cost on each. Pure functions over plain values: the listing tables, the
router and the live figures assemble the entries; the HTTP route only translates its query string."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from tokenmill.catalog.live import LiveFigures
from tokenmill.platform.errors import InvalidArgument
from tokenmill.platform.pricing import Price, cost_micros

STATES = ("loaded", "loading", "unloaded", "draining", "stopped", "failed")
"""Where a model's replicas are; "unloaded" still answers (it loads on demand), only slower at first."""
SORTS = ("name", "price", "-price", "speed", "context")
MAX_LIMIT = 100


class InvalidCatalogQuery(InvalidArgument):
    """A query the catalog cannot answer; the message names the field (the HTTP layer answers 400)."""


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    model: str
    """The id clients send."""
    display_name: str
    description: str
    provider: str
    task: str
    tags: tuple[str, ...]
    license: str
    context_length: int | None
    """None: not known until the model is loaded."""
    input_micros_per_mtok: int
    output_micros_per_mtok: int
    state: str
    live: LiveFigures

    def __post_init__(self) -> None:
        if self.state not in STATES:
            raise ValueError(f"state: must be one of {', '.join(STATES)}, not {self.state!r}")

    @property
    def is_free(self) -> bool:
        return self.input_micros_per_mtok == 0 and self.output_micros_per_mtok == 0

    @property
    def price(self) -> Price:
        return Price(self.input_micros_per_mtok, self.output_micros_per_mtok)


@dataclass(frozen=True, slots=True)
class CatalogQuery:
    """Every filter set must hold (AND). Text filters ignore case, so "Qwen" finds "qwen"."""

    task: str | None = None
    tag: str | None = None
    provider: str | None = None
    free: bool | None = None
    max_output_price_micros: int | None = None
    """Per 1M output tokens, inclusive."""
    min_context: int | None = None
    """Models whose context length is unknown never match."""
    q: str | None = None
    """Words, each of which must appear in the id, display name, description, provider or a tag."""
    sort: str = "name"
    """name (display name A-Z) | price (cheapest output, then input) | -price | speed (fastest median
    stream first, models without recent traffic last) | context (longest first, unknown last)."""
    limit: int = 20
    offset: int = 0

    def __post_init__(self) -> None:
        if self.sort not in SORTS:
            raise InvalidCatalogQuery(f"sort: must be one of {', '.join(SORTS)}, not {self.sort!r}")
        if type(self.limit) is not int or not 1 <= self.limit <= MAX_LIMIT:
            raise InvalidCatalogQuery(f"limit: must be an integer from 1 to {MAX_LIMIT}")
        for name in ("offset", "max_output_price_micros", "min_context"):
            value = getattr(self, name)
            if value is not None and (type(value) is not int or value < 0):
                raise InvalidCatalogQuery(f"{name}: must be an integer >= 0")
        if self.free is not None and type(self.free) is not bool:
            raise InvalidCatalogQuery("free: must be true or false")
        for name in ("task", "tag", "provider", "q"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise InvalidCatalogQuery(f"{name}: must be a string")


def search(entries: Iterable[CatalogEntry], query: CatalogQuery) -> tuple[list[CatalogEntry], int]:
    """(one page of matches, how many match in all). Every sort ends with the model id, so equal keys
    always come in the same order and consecutive pages neither repeat nor skip a model."""
    matches = [entry for entry in entries if _matches(entry, query)]
    matches.sort(key=_SORT_KEYS[query.sort])
    return matches[query.offset : query.offset + query.limit], len(matches)


def request_cost_micros(entry: CatalogEntry, input_tokens: int, output_tokens: int) -> int:
    """What such a request would be charged on this model: the billing formula itself, so a comparison
    never disagrees with the invoice."""
    return cost_micros(input_tokens, output_tokens, entry.price)


def _matches(entry: CatalogEntry, query: CatalogQuery) -> bool:
    if query.task is not None and entry.task.casefold() != query.task.casefold():
        return False
    if query.tag is not None and query.tag.casefold() not in {t.casefold() for t in entry.tags}:
        return False
    if query.provider is not None and entry.provider.casefold() != query.provider.casefold():
        return False
    if query.free is not None and entry.is_free != query.free:
        return False
    if (
        query.max_output_price_micros is not None
        and entry.output_micros_per_mtok > query.max_output_price_micros
    ):
        return False
    if query.min_context is not None and (
        entry.context_length is None or entry.context_length < query.min_context
    ):
        return False
    if query.q:
        fields = (entry.model, entry.display_name, entry.description, entry.provider, *entry.tags)
        haystack = "\n".join(fields).casefold()  # a newline: words never match across two fields
        return all(word in haystack for word in query.q.casefold().split())
    return True


_SORT_KEYS: dict[str, Callable[[CatalogEntry], tuple[object, ...]]] = {
    "name": lambda e: (e.display_name.casefold(), e.model),
    "price": lambda e: (e.output_micros_per_mtok, e.input_micros_per_mtok, e.model),
    "-price": lambda e: (-e.output_micros_per_mtok, -e.input_micros_per_mtok, e.model),
    "speed": lambda e: (
        e.live.output_tokens_per_s_p50 is None,
        -(e.live.output_tokens_per_s_p50 or 0.0),
        e.model,
    ),
    "context": lambda e: (e.context_length is None, -(e.context_length or 0), e.model),
}
