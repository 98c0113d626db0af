"""The trainer workers' side of the fine-tuning jobs table (`fine_tuning.py` is the API's side): claim a queued
job, keep it alive with a heartbeat, write its events and checkpoints, and close it (succeeded, failed,
cancelled: each close settles its reservation); requeue a job whose worker went silent, once."""

from __future__ import annotations

import secrets
from datetime import timedelta
from typing import Any

from sqlalchemy import select, update

from tokenmill.platform.db import Database
from tokenmill.platform.errors import Conflict, NotFound
from tokenmill.platform.fine_tuned_models import register
from tokenmill.platform.fine_tuning import (
    FINISHED,
    CheckpointInfo,
    JobInfo,
    checkpoint_info,
    job_info,
    record_event,
    settle_job,
)
from tokenmill.platform.tables import (
    FineTuningCheckpoint,
    FineTuningJob,
)
from tokenmill.platform.tables import Reservation as ReservationRow

MAX_ATTEMPTS = 2
"""Claims of one job: the first run and one resumption after its worker vanished."""


def has_unfinished_jobs(db: Database) -> bool:
    """Whether any job is queued or running (perhaps under a worker that died with its server)."""
    with db.read() as session:
        found = session.scalar(
            select(FineTuningJob.id).where(FineTuningJob.status.in_(("queued", "running"))).limit(1)
        )
    return found is not None


def claim_next(db: Database, worker: str, *, stale_after_s: float) -> JobInfo | None:
    """The oldest queued job, now running on `worker`; None when there is none. First, jobs whose worker
    stopped beating are queued again (or failed, after MAX_ATTEMPTS), and closed jobs left unsettled by a
    crash are settled."""
    recover_stale_jobs(db, stale_after_s=stale_after_s)
    settle_closed_jobs(db)
    while True:
        with db.read() as session:
            job_id = session.scalar(
                select(FineTuningJob.id)
                .where(FineTuningJob.status == "queued")
                .order_by(FineTuningJob.created_at, FineTuningJob.id)
                .limit(1)
            )
        if job_id is None:
            return None
        now = db.now()
        with db.write() as session:
            # Compare-and-set: of several workers racing for this row, exactly one changes it.
            claimed = session.execute(
                update(FineTuningJob)
                .where(FineTuningJob.id == job_id, FineTuningJob.status == "queued")
                .values(
                    status="running",
                    worker=worker,
                    heartbeat_at=now,
                    attempts=FineTuningJob.attempts + 1,
                    started_at=now,
                )
                .execution_options(synchronize_session=False)
            ).rowcount
            if claimed:
                row = session.get(FineTuningJob, job_id)
                assert row is not None
                session.refresh(row)
                record_event(session, job_id, "Fine-tuning job started", now)
                return job_info(row)


def heartbeat(db: Database, job_id: str, worker: str) -> bool:
    """Keep the job claimed; returns whether the worker should stop (cancellation asked, or the job is no
    longer this worker's: it was declared lost and given to another)."""
    with db.write() as session:
        row = session.get(FineTuningJob, job_id, with_for_update=True)
        if row is None or row.status != "running" or row.worker != worker:
            return True
        row.heartbeat_at = db.now()
        return row.cancel_requested_at is not None


def add_event(
    db: Database,
    job_id: str,
    message: str,
    *,
    level: str = "info",
    data: dict[str, Any] | None = None,
) -> None:
    with db.write() as session:
        record_event(session, job_id, message, db.now(), level=level, data=data)


def add_checkpoint(
    db: Database, job_id: str, step: int, metrics: dict[str, Any], path: str
) -> CheckpointInfo:
    with db.write() as session:
        row = FineTuningCheckpoint(
            id=f"ftckpt-{secrets.token_hex(12)}",
            job_id=job_id,
            step=step,
            metrics=metrics,
            path=path,
            created_at=db.now(),
        )
        session.add(row)
        session.flush()
        return checkpoint_info(row)


def latest_checkpoint(db: Database, job_id: str) -> CheckpointInfo | None:
    with db.read() as session:
        row = session.scalars(
            select(FineTuningCheckpoint)
            .where(FineTuningCheckpoint.job_id == job_id)
            .order_by(FineTuningCheckpoint.step.desc())
            .limit(1)
        ).first()
        return None if row is None else checkpoint_info(row)


def succeed(
    db: Database,
    job: JobInfo,
    worker: str,
    *,
    trained_tokens: int,
    adapter_path: str,
    context_length: int | None,
) -> JobInfo:
    """The adapter becomes a model (`fine_tuned_models.register`), then the job closes and the trained
    tokens are charged."""
    model = register(db, job.model, job.org_id, job.id, job.suffix, adapter_path, context_length)
    return _close(
        db,
        job.id,
        worker,
        "succeeded",
        trained_tokens,
        f"The job has successfully completed: {model}",
        fine_tuned_model=model,
    )


def fail(
    db: Database, job_id: str, worker: str, *, code: str, message: str, param: str | None = None
) -> JobInfo:
    return _close(
        db,
        job_id,
        worker,
        "failed",
        None,
        f"The job failed: {message}",
        error={"code": code, "message": message, "param": param},
    )


def cancelled(db: Database, job_id: str, worker: str, *, trained_tokens: int) -> JobInfo:
    return _close(db, job_id, worker, "cancelled", trained_tokens, "Fine-tuning job cancelled")


def requeue(db: Database, job_id: str, worker: str, reason: str) -> bool:
    """Give a running job back to the queue (its worker is stopping); it resumes from its last checkpoint.
    Returns False when the job was no longer this worker's."""
    with db.write() as session:
        row = session.get(FineTuningJob, job_id, with_for_update=True)
        if row is None or row.status != "running" or row.worker != worker:
            return False
        row.status, row.worker, row.heartbeat_at = "queued", None, None
        row.attempts = max(row.attempts - 1, 0)  # a clean stop does not count against the job
        record_event(session, job_id, reason, db.now())
        return True


def recover_stale_jobs(db: Database, *, stale_after_s: float, worker: str | None = None) -> list[str]:
    """Running jobs whose worker stopped beating for `stale_after_s` (or, with `worker`, every running job
    of that worker, known dead): queued again to resume from their last checkpoint, or failed with the
    reason once they have had MAX_ATTEMPTS. Returns the failed jobs' ids."""
    now = db.now()
    query = select(FineTuningJob).where(FineTuningJob.status == "running")
    if worker is not None:
        query = query.where(FineTuningJob.worker == worker)
    else:
        query = query.where(FineTuningJob.heartbeat_at < now - timedelta(seconds=stale_after_s))
    failed = []
    with db.write() as session:
        for row in session.scalars(query.with_for_update()).all():
            lost = f"The worker running this job ({row.worker}) stopped"
            if row.attempts >= MAX_ATTEMPTS:
                row.status, row.finished_at = "failed", now
                message = f"{lost}, for the {row.attempts}th time; the job is not retried."
                row.error = {"code": "worker_lost", "message": message, "param": None}
                record_event(session, row.id, message, now, level="error")
                failed.append(row.id)
            else:
                row.status, row.worker, row.heartbeat_at = "queued", None, None
                record_event(
                    session, row.id, f"{lost}; the job resumes from its last checkpoint.", now, level="warn"
                )
    for job_id in failed:
        settle_job(db, job_id)
    return failed


def settle_closed_jobs(db: Database) -> None:
    """Settle the reservations of jobs that closed without being settled (a crash between the two)."""
    with db.read() as session:
        job_ids = list(
            session.scalars(
                select(FineTuningJob.id)
                .join(ReservationRow, ReservationRow.id == FineTuningJob.reservation_id)
                .where(FineTuningJob.status.in_(FINISHED), ReservationRow.state == "open")
            )
        )
    for job_id in job_ids:
        settle_job(db, job_id)


def _close(
    db: Database,
    job_id: str,
    worker: str,
    status: str,
    trained_tokens: int | None,
    message: str,
    *,
    fine_tuned_model: str | None = None,
    error: dict[str, Any] | None = None,
) -> JobInfo:
    with db.write() as session:
        row = session.get(FineTuningJob, job_id, with_for_update=True)
        if row is None:
            raise NotFound(f"fine_tuning_job: no job {job_id!r}")
        if row.status != "running" or row.worker != worker:
            raise Conflict(f"fine_tuning_job: job {job_id} is no longer run by {worker}")
        now = db.now()
        row.status, row.finished_at, row.heartbeat_at = status, now, None
        row.trained_tokens = trained_tokens
        row.fine_tuned_model = fine_tuned_model
        row.error = error
        record_event(session, job_id, message, now, level="error" if error else "info")
        info = job_info(row)
    settle_job(db, job_id)
    return info
