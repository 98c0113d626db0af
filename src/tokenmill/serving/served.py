"""What the serving layer knows of each model it answers for before any is loaded, and how such a model is
listed when there is no platform database (--no-auth): as models.yaml declares it, sold by nobody."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from tokenmill.platform.listing_terms import ListingSpec
from tokenmill.platform.listings import PLATFORM_PROVIDER, ListingInfo
from tokenmill.platform.pricing import FREE

if TYPE_CHECKING:
    from tokenmill.engine.lora import LoRARequest  # torch: imported only where engines run


@dataclass(frozen=True, slots=True)
class ServedModel:
    model_id: str
    task: str
    """chat | embedding"""
    context_length: int | None
    """From the engine's plan (or the embedder's config); None when only a started engine can tell."""
    listing: ListingSpec | None = None
    """The models.yaml listing; None: the defaults (public, by the platform, free when new)."""
    source: str | None = None
    """What a chat model's engine loads (a directory, a .gguf file or a built-in name): a trainer's base."""
    base_model: str | None = None
    """An adapter model (a fine-tune or a --lora): the chat model whose engine serves it."""
    lora: LoRARequest | None = None
    """An adapter model's adapter, sent with each of its requests to the base model's engine."""
    owner_org_id: str | None = None
    """A fine-tuned model: the organization it belongs to (never shown to others, not even by /ready)."""


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def local_listing(served: ServedModel) -> ListingInfo:
    spec = served.listing or ListingSpec(model=served.model_id, task=served.task)
    return ListingInfo(
        model=served.model_id,
        provider_org_id=None,
        provider=spec.provider or PLATFORM_PROVIDER,
        display_name=spec.display_name or served.model_id,
        description=spec.description,
        task=served.task,
        tags=tuple(spec.tags),
        license=spec.license,
        context_length=spec.context_length or served.context_length,
        status="published",
        visibility="public",
        shared_with=(),
        price=spec.price or FREE,
        platform_fee_bps=None,
        created_at=_EPOCH,
        updated_at=_EPOCH,
    )
