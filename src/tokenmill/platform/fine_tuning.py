"""Fine-tuning jobs as rows: the API creates one (its training reserved at the quoted price), trainer workers
claim queued jobs from the same table, keep them alive with a heartbeat, write events and checkpoints, and
close them (their side: `fine_tuning_runs.py`); the result is an adapter model with a listing of its own
(`fine_tuned_models.py`).

States: queued -> running -> succeeded | failed | cancelled (queued jobs cancel at once; a running one is
asked to stop and its worker closes it). A running job whose heartbeat stopped (its worker crashed or was
killed) is queued again to resume from its last checkpoint, once; the second time it fails with the reason.

Billing: the reservation is opened at creation for the validated tokens times the epochs and closed when
the job ends: the trained tokens are charged on success and on cancellation, nothing on failure. Every
transition that closes a job settles it; a job closed without its settlement (a crash in between) is settled
by the next `claim_next` (`settle_closed_jobs`)."""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Generic, TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from tokenmill.platform.billing import Reservation, UsageStatus, release, reserve, settle
from tokenmill.platform.db import Database
from tokenmill.platform.errors import Conflict, NotFound
from tokenmill.platform.listings import (
    PLATFORM_PROVIDER,
    ListingInfo,
)
from tokenmill.platform.pricing import BPS_PER_UNIT, Price
from tokenmill.platform.principal import KeyPrincipal
from tokenmill.platform.tables import (
    AdapterModel,
    FineTuningCheckpoint,
    FineTuningEvent,
    FineTuningJob,
)
from tokenmill.platform.tables import Reservation as ReservationRow

FINISHED = ("succeeded", "failed", "cancelled")
TRAINING_MODEL_PREFIX = "fine-tuning/"
"""Usage records of training read `fine-tuning/<base model>`, apart from the base model's inference."""
_JOB_ID_RE = re.compile(r"ftjob-[0-9a-f]{24}")
_CHECKPOINT_ID_RE = re.compile(r"ftckpt-[0-9a-f]{24}")


@dataclass(frozen=True, slots=True)
class JobSpec:
    """A job the API has validated: the files are the caller's, the training set parsed, the base model
    fine-tunable, the hyperparameters resolved."""

    model: str
    base_source: str
    max_tokens_per_example: int
    training_file: str
    validation_file: str | None
    suffix: str | None
    hyperparameters: dict[str, Any]
    seed: int
    metadata: dict[str, str] | None
    estimated_tokens: int
    """Training tokens times epochs: what is reserved."""
    price_micros_per_mtok: int
    """The price of 1M trained tokens."""


@dataclass(frozen=True, slots=True)
class JobInfo:
    id: str
    org_id: str
    model: str
    base_source: str
    max_tokens_per_example: int
    training_file: str
    validation_file: str | None
    suffix: str | None
    hyperparameters: dict[str, Any]
    seed: int
    metadata: dict[str, str] | None
    status: str
    error: dict[str, Any] | None
    fine_tuned_model: str | None
    estimated_tokens: int
    trained_tokens: int | None
    cancel_requested: bool
    attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


@dataclass(frozen=True, slots=True)
class EventInfo:
    id: int
    job_id: str
    level: str
    type: str
    message: str
    data: dict[str, Any] | None
    created_at: datetime


@dataclass(frozen=True, slots=True)
class CheckpointInfo:
    id: str
    job_id: str
    step: int
    metrics: dict[str, Any]
    path: str
    created_at: datetime


_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Page(Generic[_T]):
    data: list[_T]
    has_more: bool


# -- the API's side ----------------------------------------------------------------------------------


def create_job(db: Database, principal: KeyPrincipal, spec: JobSpec) -> JobInfo:
    """Reserve the training's worst case and queue the job; `InsufficientQuota` (nothing written) when the
    balance cannot hold it. The caller has checked that the key may use the base model."""
    job_id = f"ftjob-{secrets.token_hex(12)}"
    # The training's own price and usage label; the key's model allow-list was applied to the base model.
    reservation = reserve(
        db,
        replace(principal, allowed_models=None),
        _training_listing(spec, db.now()),
        spec.estimated_tokens,
        0,
        owner=f"fine-tuning:{job_id}",
        fee_bps=BPS_PER_UNIT,
    )
    try:
        with db.write() as session:
            now = db.now()
            row = FineTuningJob(
                id=job_id,
                org_id=principal.org_id,
                key_id=principal.key_id,
                model=spec.model,
                base_source=spec.base_source,
                max_tokens_per_example=spec.max_tokens_per_example,
                training_file=spec.training_file,
                validation_file=spec.validation_file,
                suffix=spec.suffix,
                hyperparameters=spec.hyperparameters,
                seed=spec.seed,
                user_metadata=spec.metadata,
                status="queued",
                error=None,
                fine_tuned_model=None,
                estimated_tokens=spec.estimated_tokens,
                trained_tokens=None,
                reservation_id=reservation.id,
                cancel_requested_at=None,
                worker=None,
                heartbeat_at=None,
                attempts=0,
                created_at=now,
                started_at=None,
                finished_at=None,
            )
            session.add(row)
            session.flush()
            record_event(session, job_id, f"Created fine-tuning job: {job_id}", now)
            record_event(session, job_id, "Validated training file: " + spec.training_file, now)
            record_event(session, job_id, "Fine-tuning job queued", now)
            return job_info(row)
    except BaseException:
        release(db, reservation)
        raise


def get_job(db: Database, org_id: str, job_id: str) -> JobInfo:
    """`NotFound` for a job that does not exist or is another organization's (the same answer)."""
    with db.read() as session:
        return job_info(_own_row(session, org_id, job_id))


def find_foreign_job(db: Database, org_id: str, job_id: str) -> bool:
    """Whether `job_id` exists but belongs to another organization (worth an audit row)."""
    if not _JOB_ID_RE.fullmatch(job_id):
        return False
    with db.read() as session:
        row = session.get(FineTuningJob, job_id)
    return row is not None and row.org_id != org_id


def list_jobs(db: Database, org_id: str, *, after: str | None, limit: int) -> Page[JobInfo]:
    """Newest first; `after` is the last job id of the previous page."""
    query = select(FineTuningJob).where(FineTuningJob.org_id == org_id)
    with db.read() as session:
        if after is not None:
            cursor = _own_row(session, org_id, after)
            query = query.where(
                (FineTuningJob.created_at < cursor.created_at)
                | ((FineTuningJob.created_at == cursor.created_at) & (FineTuningJob.id < cursor.id))
            )
        rows = session.scalars(
            query.order_by(FineTuningJob.created_at.desc(), FineTuningJob.id.desc()).limit(limit + 1)
        ).all()
        return Page([job_info(row) for row in rows[:limit]], len(rows) > limit)


def list_events(db: Database, org_id: str, job_id: str, *, after: int | None, limit: int) -> Page[EventInfo]:
    """Newest first; `after` is the last event id of the previous page."""
    query = select(FineTuningEvent).where(FineTuningEvent.job_id == job_id)
    if after is not None:
        query = query.where(FineTuningEvent.id < after)
    with db.read() as session:
        _own_row(session, org_id, job_id)
        rows = session.scalars(query.order_by(FineTuningEvent.id.desc()).limit(limit + 1)).all()
        return Page([_event_info(row) for row in rows[:limit]], len(rows) > limit)


def list_checkpoints(
    db: Database, org_id: str, job_id: str, *, after: str | None, limit: int
) -> Page[CheckpointInfo]:
    """Newest (highest step) first; `after` is the last checkpoint id of the previous page."""
    query = select(FineTuningCheckpoint).where(FineTuningCheckpoint.job_id == job_id)
    with db.read() as session:
        _own_row(session, org_id, job_id)
        if after is not None:
            cursor = session.get(FineTuningCheckpoint, _id("checkpoint", after, _CHECKPOINT_ID_RE))
            if cursor is None or cursor.job_id != job_id:
                raise NotFound(f"after: no checkpoint {after!r} of this job")
            query = query.where(FineTuningCheckpoint.step < cursor.step)
        rows = session.scalars(query.order_by(FineTuningCheckpoint.step.desc()).limit(limit + 1)).all()
        return Page([checkpoint_info(row) for row in rows[:limit]], len(rows) > limit)


def cancel_job(db: Database, org_id: str, job_id: str) -> JobInfo:
    """A queued job is cancelled now (nothing charged); a running one is asked to stop, and its worker
    closes it within seconds, charging the tokens trained so far. `Conflict` for a finished job."""
    with db.write() as session:
        row = _own_row(session, org_id, job_id, lock=True)
        now = db.now()
        if row.status in FINISHED:
            raise Conflict(f"fine_tuning_job: job {job_id} has already {row.status}; it cannot be cancelled")
        if row.status == "queued":
            row.status, row.finished_at = "cancelled", now
            record_event(session, job_id, "Fine-tuning job cancelled", now)
        elif row.cancel_requested_at is None:
            row.cancel_requested_at = now
            record_event(session, job_id, "Cancellation requested; stopping the training", now)
        info = job_info(row)
    if info.status == "cancelled":
        settle_job(db, job_id)
    return info


def finished_before(db: Database, org_id: str, cutoff: datetime) -> list[tuple[str, str | None]]:
    """The organization's jobs that ended before `cutoff` (their checkpoints are past retention): (job id,
    the path of the adapter it made, None when it made none or the model was deleted)."""
    with db.read() as session:
        rows = session.execute(
            select(FineTuningJob.id, AdapterModel.path)
            .outerjoin(AdapterModel, AdapterModel.job_id == FineTuningJob.id)
            .where(
                FineTuningJob.org_id == org_id,
                FineTuningJob.status.in_(FINISHED),
                FineTuningJob.finished_at < cutoff,
            )
        ).all()
    return [(job_id, path) for job_id, path in rows]


def delete_checkpoints(db: Database, job_id: str) -> list[CheckpointInfo]:
    """Forget a job's checkpoints (the caller deletes their files); returns what they were."""
    with db.write() as session:
        rows = session.scalars(
            select(FineTuningCheckpoint).where(FineTuningCheckpoint.job_id == job_id)
        ).all()
        infos = [checkpoint_info(row) for row in rows]
        for row in rows:
            session.delete(row)
    return infos


# -- shared with the workers' side (settle_job, record_event, job_info, checkpoint_info) and internals ---


def settle_job(db: Database, job_id: str) -> None:
    """Charge a closed job's trained tokens (nothing when it failed) and close its reservation."""
    with db.read() as session:
        job = session.get(FineTuningJob, job_id)
        assert job is not None and job.status in FINISHED
        row = session.get(ReservationRow, job.reservation_id)
        assert row is not None
        if row.state != "open":
            return
        handle = Reservation(
            id=row.id,
            org_id=row.org_id,
            key_id=row.key_id,
            model=row.model,
            prompt_tokens=row.prompt_tokens,
            max_tokens=row.max_tokens,
            price=Price(row.input_micros_per_mtok, row.output_micros_per_mtok),
            reserved_micros=row.reserved_micros,
            provider_org_id=row.provider_org_id,
            platform_fee_bps=row.platform_fee_bps,
        )
        status = UsageStatus.ERROR if job.status == "failed" else UsageStatus.OK
        trained = job.trained_tokens or 0
        elapsed = ((job.finished_at or job.created_at) - (job.started_at or job.created_at)).total_seconds()
    settle(db, handle, trained, 0, status, max(elapsed, 0.0))


def _training_listing(spec: JobSpec, now: datetime) -> ListingInfo:
    """What the reservation quotes: the training price for the tokens read, sold by the platform."""
    return ListingInfo(
        model=TRAINING_MODEL_PREFIX + spec.model,
        provider_org_id=None,
        provider=PLATFORM_PROVIDER,
        display_name=TRAINING_MODEL_PREFIX + spec.model,
        description="",
        task="chat",
        tags=(),
        license="",
        context_length=None,
        status="published",
        visibility="public",
        shared_with=(),
        price=Price(spec.price_micros_per_mtok, 0),
        platform_fee_bps=None,
        created_at=now,
        updated_at=now,
    )


def _id(kind: str, value: str, pattern: re.Pattern[str]) -> str:
    """Any string is a reference to look up; one that could never be an id is simply not found (and never
    reaches the database, which may refuse its characters)."""
    if not pattern.fullmatch(value):
        raise NotFound(f"{kind}: no {kind} {value[:100]!r}")
    return value


def _own_row(session: Session, org_id: str, job_id: str, *, lock: bool = False) -> FineTuningJob:
    row = session.get(FineTuningJob, _id("fine_tuning_job", job_id, _JOB_ID_RE), with_for_update=lock)
    if row is None or row.org_id != org_id:
        raise NotFound(f"fine_tuning_job: no fine-tuning job {job_id!r}")
    return row


def record_event(
    session: Session,
    job_id: str,
    message: str,
    now: datetime,
    *,
    level: str = "info",
    data: dict[str, Any] | None = None,
) -> None:
    session.add(
        FineTuningEvent(
            job_id=job_id,
            level=level,
            type="message" if data is None else "metrics",
            message=message[:2000],
            data=data,
            created_at=now,
        )
    )


def job_info(row: FineTuningJob) -> JobInfo:
    return JobInfo(
        id=row.id,
        org_id=row.org_id,
        model=row.model,
        base_source=row.base_source,
        max_tokens_per_example=row.max_tokens_per_example,
        training_file=row.training_file,
        validation_file=row.validation_file,
        suffix=row.suffix,
        hyperparameters=dict(row.hyperparameters),
        seed=row.seed,
        metadata=row.user_metadata,
        status=row.status,
        error=row.error,
        fine_tuned_model=row.fine_tuned_model,
        estimated_tokens=row.estimated_tokens,
        trained_tokens=row.trained_tokens,
        cancel_requested=row.cancel_requested_at is not None,
        attempts=row.attempts,
        created_at=row.created_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
    )


def _event_info(row: FineTuningEvent) -> EventInfo:
    return EventInfo(row.id, row.job_id, row.level, row.type, row.message, row.data, row.created_at)


def checkpoint_info(row: FineTuningCheckpoint) -> CheckpointInfo:
    return CheckpointInfo(row.id, row.job_id, row.step, dict(row.metrics), row.path, row.created_at)
