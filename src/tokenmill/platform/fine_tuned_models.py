"""The result of a fine-tuning job is a model: `ft:{base}:{org}:{suffix}:{job}`, a row naming its base model
and adapter directory (what a gateway needs to serve it on the base model's engine) and a listing its
organization provides: private, at the base model's price, which the organization may change and publish
to the marketplace. Deleting it retires the listing (the id is never reused) and forgets the row."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import select

from tokenmill.platform.db import Database
from tokenmill.platform.errors import NotFound
from tokenmill.platform.listing_terms import ListingSpec, model_ref
from tokenmill.platform.listings import apply_listing, get_listing, set_listing_status
from tokenmill.platform.tables import AdapterModel, Organization

_SLUG_RE = re.compile(r"[^a-z0-9-]+")


def register(
    db: Database,
    base_model: str,
    org_id: str,
    job_id: str,
    suffix: str | None,
    adapter_path: str,
    context_length: int | None,
) -> str:
    """Make the adapter a model of `org_id` (idempotent: a job closed twice makes one model); its id."""
    base = get_listing(db, base_model)
    with db.read() as session:
        org = session.get(Organization, org_id)
        assert org is not None
        model = fine_tuned_model_id(base_model, org.name, suffix, job_id)
    apply_listing(
        db,
        ListingSpec(
            model=model,
            task="chat",
            provider=org_id,
            display_name=model,
            description=f"{base_model} fine-tuned by job {job_id}.",
            tags=("fine-tuned",),
            license=base.license,
            context_length=context_length,
            status="published",
            visibility="private",
            price=base.price,
        ),
    )
    with db.write() as session:
        if session.get(AdapterModel, model) is None:
            session.add(
                AdapterModel(
                    model=model,
                    base_model=base_model,
                    org_id=org_id,
                    job_id=job_id,
                    path=adapter_path,
                    created_at=db.now(),
                )
            )
    return model


def fine_tuned_model_id(base: str, org_name: str, suffix: str | None, job_id: str) -> str:
    """OpenAI's shape: ft:{base}:{organization}:{suffix}:{id}."""
    org = _SLUG_RE.sub("-", org_name.lower()).strip("-") or "org"
    return f"ft:{base}:{org}:{suffix or ''}:{job_id.removeprefix('ftjob-')[:12]}"


@dataclass(frozen=True, slots=True)
class AdapterInfo:
    model: str
    base_model: str
    org_id: str
    job_id: str
    path: str


def find_adapter_models(db: Database, models: Iterable[str]) -> dict[str, AdapterInfo]:
    """The fine-tuned models among `models`, by id: what a gateway needs to serve them on their base."""
    models = [model_ref(model) for model in models]
    if not models:
        return {}
    with db.read() as session:
        rows = session.scalars(select(AdapterModel).where(AdapterModel.model.in_(models))).all()
        return {
            row.model: AdapterInfo(row.model, row.base_model, row.org_id, row.job_id, row.path)
            for row in rows
        }


def delete_fine_tuned_model(db: Database, org_id: str, model: str) -> AdapterInfo:
    """The organization's fine-tuned model stops being a model: its row goes and its listing is retired
    (its id is never reused). The caller deletes the adapter's files. `NotFound` unless it is `org_id`'s."""
    with db.write() as session:
        row = session.get(AdapterModel, model_ref(model), with_for_update=True)
        if row is None or row.org_id != org_id:
            raise NotFound(f"model: no fine-tuned model {model!r}")
        info = AdapterInfo(row.model, row.base_model, row.org_id, row.job_id, row.path)
        session.delete(row)
    if get_listing(db, model).status != "retired":
        set_listing_status(db, model, "retired")
    return info


def delete_org_models(db: Database, org_id: str) -> list[AdapterInfo]:
    """Every fine-tuned model of the organization, as `delete_fine_tuned_model` (deleting all its data)."""
    with db.read() as session:
        models = list(session.scalars(select(AdapterModel.model).where(AdapterModel.org_id == org_id)))
    return [delete_fine_tuned_model(db, org_id, model) for model in models]
