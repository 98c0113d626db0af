"""The terms of a listing as a caller writes them (`ListingSpec` whole, `ListingChanges` in part) and the rules
they must meet, checked before any transaction opens, so a refused write changes nothing."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from tokenmill.platform.errors import InvalidArgument
from tokenmill.platform.pricing import BPS_PER_UNIT, Price
from tokenmill.platform.tables import LISTING_STATUSES, LISTING_TASKS, LISTING_VISIBILITIES
from tokenmill.platform.validation import MAX_COUNT, optional_int, text
from tokenmill.text import invalid_text_reason

MAX_MODEL_CHARS = 200
MAX_DISPLAY_NAME_CHARS = 200
MAX_DESCRIPTION_CHARS = 4000
MAX_TAGS = 32
MAX_TAG_CHARS = 50
MAX_SHARED_WITH = 1000


@dataclass(frozen=True, slots=True)
class ListingSpec:
    """A whole listing as models.yaml or the operator declares it."""

    model: str
    task: str = "chat"
    display_name: str | None = None
    """None: the model id."""
    description: str = ""
    provider: str | None = None
    """An organization id or name; None: the platform itself."""
    tags: tuple[str, ...] = ()
    license: str = ""
    context_length: int | None = None
    price: Price | None = None
    """None: keep the current price (free when the model has none yet)."""
    visibility: str = "public"
    shared_with: tuple[str, ...] = ()
    """Organization ids or names; only (and then at least one) with visibility `shared`."""
    status: str = "published"
    platform_fee_bps: int | None = None
    """None: the server's default fee."""


@dataclass(frozen=True, slots=True)
class ListingChanges:
    """What a provider may change about its own listing (and the operator about any); None: unchanged.
    Changing the visibility away from `shared` drops `shared_with`."""

    description: str | None = None
    price: Price | None = None
    visibility: str | None = None
    shared_with: tuple[str, ...] | None = None
    """Organization ids or names."""
    display_name: str | None = None
    tags: tuple[str, ...] | None = None
    """The whole new list (the same rules as a `ListingSpec`'s tags); () removes every tag."""
    status: str | None = None
    """The operator may set any status; a provider only publishes its draft or retires its published
    listing (`listings.update_own_listing`)."""


def checked_spec(spec: ListingSpec) -> ListingSpec:
    if not isinstance(spec, ListingSpec):
        raise InvalidArgument("spec: must be a ListingSpec")
    visibility = choice("visibility", spec.visibility, LISTING_VISIBILITIES)
    shared_with = _refs("shared_with", spec.shared_with)
    check_sharing(visibility, shared_with)
    display_name = spec.display_name
    return replace(
        spec,
        model=text("model", spec.model, max_len=MAX_MODEL_CHARS),
        task=choice("task", spec.task, LISTING_TASKS),
        display_name=None
        if display_name is None
        else text("display_name", display_name, max_len=MAX_DISPLAY_NAME_CHARS),
        description=text("description", spec.description, max_len=MAX_DESCRIPTION_CHARS, allow_empty=True),
        provider=None if spec.provider is None else text("provider", spec.provider, max_len=200),
        tags=_tags(spec.tags),
        license=text("license", spec.license, max_len=100, allow_empty=True),
        context_length=optional_int("context_length", spec.context_length, minimum=1, maximum=MAX_COUNT),
        price=_price(spec.price),
        visibility=visibility,
        shared_with=shared_with,
        status=choice("status", spec.status, LISTING_STATUSES),
        platform_fee_bps=_fee(spec.platform_fee_bps),
    )


def checked_changes(changes: ListingChanges) -> ListingChanges:
    if not isinstance(changes, ListingChanges):
        raise InvalidArgument("changes: must be a ListingChanges")
    description = changes.description
    if description is not None:
        description = text("description", description, max_len=MAX_DESCRIPTION_CHARS, allow_empty=True)
    visibility = changes.visibility
    if visibility is not None:
        visibility = choice("visibility", visibility, LISTING_VISIBILITIES)
    shared_with = changes.shared_with
    if shared_with is not None:
        shared_with = _refs("shared_with", shared_with)
    display_name = changes.display_name
    if display_name is not None:
        display_name = text("display_name", display_name, max_len=MAX_DISPLAY_NAME_CHARS)
    return ListingChanges(
        description=description,
        price=_price(changes.price),
        visibility=visibility,
        shared_with=shared_with,
        display_name=display_name,
        tags=None if changes.tags is None else _tags(changes.tags),
        status=None if changes.status is None else choice("status", changes.status, LISTING_STATUSES),
    )


def model_ref(model: object) -> str:
    """A model id as a caller sends it, unstripped: it must match a listing exactly."""
    if not isinstance(model, str):
        raise InvalidArgument("model: must be a string")
    reason = invalid_text_reason(model)
    if reason is not None:
        raise InvalidArgument(f"model: {reason}")
    if "\x00" in model:
        raise InvalidArgument("model: must not contain NUL characters")
    return model


def choice(field: str, value: object, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise InvalidArgument(f"{field}: must be one of {', '.join(choices)}")
    return value


def _strings(field: str, value: object, max_items: int) -> list[object]:
    if isinstance(value, str) or not isinstance(value, (tuple, list)):
        raise InvalidArgument(f"{field}: must be a list of strings")
    if len(value) > max_items:
        raise InvalidArgument(f"{field}: at most {max_items} items")
    return list(value)


def _tags(value: object) -> tuple[str, ...]:
    tags = (text("tags", tag, max_len=MAX_TAG_CHARS) for tag in _strings("tags", value, MAX_TAGS))
    return tuple(dict.fromkeys(tags))


def _refs(field: str, value: object) -> tuple[str, ...]:
    refs = (text(field, ref, max_len=200) for ref in _strings(field, value, MAX_SHARED_WITH))
    return tuple(dict.fromkeys(refs))


def check_sharing(visibility: str, shared_with: Sequence[str]) -> None:
    if visibility == "shared" and not shared_with:
        raise InvalidArgument("shared_with: must name at least one organization when visibility is shared")
    if visibility != "shared" and shared_with:
        raise InvalidArgument(f"shared_with: only with visibility shared (visibility is {visibility})")


def _price(value: object) -> Price | None:
    if value is None or isinstance(value, Price):
        return value
    raise InvalidArgument("price: must be a Price")


def _fee(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= BPS_PER_UNIT:
        return value
    raise InvalidArgument(f"platform_fee_bps: must be an integer from 0 to {BPS_PER_UNIT}")
