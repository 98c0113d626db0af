"""The fine-tuning job queue in the platform database, on SQLite and PostgreSQL, without training: a job's
reservation, its claim by a worker, the model a success makes (private to its organization), a lost worker's
job queued again then failed, and the job artifacts under retention and "delete all my data"."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from tests.platform.helpers import make_account, priced_model
from tokenmill.platform import fine_tuning as jobs
from tokenmill.platform import fine_tuning_runs as runs
from tokenmill.platform.data_controls import delete_all_data, set_data_controls, sweep
from tokenmill.platform.db import Database
from tokenmill.platform.errors import InsufficientQuota, ListingRetired, ModelNotFound
from tokenmill.platform.file_store import local_store
from tokenmill.platform.fine_tuned_models import find_adapter_models, fine_tuned_model_id
from tokenmill.platform.fine_tuning_data import artifacts_dir, fine_tuning_owner
from tokenmill.platform.ledger import balance_micros
from tokenmill.platform.listings import resolve_listing

PRICE = 2_000_000  # per 1M trained tokens
TOKENS = 500_000  # estimated: costs 1.000000


def spec(base: str, **changes) -> jobs.JobSpec:
    values = dict(
        model=base,
        base_source="/models/base",
        max_tokens_per_example=2048,
        training_file="file-abc",
        validation_file=None,
        suffix="moon",
        hyperparameters={"n_epochs": 2},
        seed=1,
        metadata=None,
        estimated_tokens=TOKENS,
        price_micros_per_mtok=PRICE,
    )
    return jobs.JobSpec(**{**values, **changes})


def trained(db: Database, data_dir: Path, org_id: str, job: jobs.JobInfo, worker: str) -> Path:
    """What a worker leaves on disk for `job`: two checkpoints and the adapter."""
    out = artifacts_dir(data_dir, org_id, job.id)
    for step in (3, 6):
        path = out / "checkpoints" / f"step-{step}"
        path.mkdir(parents=True)
        (path / "adapter_model.safetensors").write_bytes(b"w" * 64)
        runs.add_checkpoint(db, job.id, step, {"train_loss": 1.0}, str(path))
    adapter = out / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"a" * 64)
    return adapter


def test_a_job_is_reserved_claimed_and_becomes_a_private_model(db: Database, tmp_path: Path) -> None:
    buyer, stranger = make_account(db, 5_000_000), make_account(db, 5_000_000)
    base = priced_model(db, 100_000, 300_000)
    job = jobs.create_job(db, buyer.principal, spec(base))
    assert job.status == "queued" and balance_micros(db, buyer.org.id) == 5_000_000
    with pytest.raises(InsufficientQuota):
        jobs.create_job(db, make_account(db, 999_999).principal, spec(base))

    claimed = runs.claim_next(db, "w1", stale_after_s=60)
    while claimed is not None and claimed.id != job.id:  # jobs other tests on this database left queued
        claimed = runs.claim_next(db, "w1", stale_after_s=60)
    assert claimed is not None and claimed.status == "running"
    adapter = trained(db, tmp_path, buyer.org.id, claimed, "w1")
    done = runs.succeed(
        db, claimed, "w1", trained_tokens=400_000, adapter_path=str(adapter), context_length=None
    )

    assert done.status == "succeeded" and done.trained_tokens == 400_000
    assert done.fine_tuned_model == fine_tuned_model_id(base, buyer.org.name, "moon", job.id)
    assert balance_micros(db, buyer.org.id) == 5_000_000 - 800_000  # what was trained, not the estimate
    listing = resolve_listing(db, buyer.org.id, done.fine_tuned_model)
    assert (
        listing.provider_org_id == buyer.org.id
        and listing.price == resolve_listing(db, buyer.org.id, base).price
    )
    with pytest.raises(ModelNotFound):
        resolve_listing(db, stranger.org.id, done.fine_tuned_model)
    with pytest.raises(jobs.NotFound):
        jobs.get_job(db, stranger.org.id, job.id)
    assert jobs.find_foreign_job(db, stranger.org.id, job.id)


def test_a_lost_workers_job_is_queued_again_then_failed(db: Database) -> None:
    account = make_account(db, 5_000_000)
    job = jobs.create_job(db, account.principal, spec(priced_model(db, 0, 0)))
    for attempt in (1, 2):
        claimed = runs.claim_next(db, f"w{attempt}", stale_after_s=60)
        while claimed is not None and claimed.id != job.id:
            claimed = runs.claim_next(db, f"w{attempt}", stale_after_s=60)
        assert claimed is not None and claimed.attempts == attempt
        failed = runs.recover_stale_jobs(db, stale_after_s=60, worker=f"w{attempt}")
    assert failed == [job.id]
    lost = jobs.get_job(db, account.org.id, job.id)
    assert lost.status == "failed" and lost.error["code"] == "worker_lost"
    assert balance_micros(db, account.org.id) == 5_000_000  # a failed job costs nothing


def test_retention_deletes_checkpoints_and_delete_all_leaves_nothing(db: Database, tmp_path: Path) -> None:
    account = make_account(db, 5_000_000)
    base = priced_model(db, 0, 0)
    job = jobs.create_job(db, account.principal, spec(base))
    claimed = runs.claim_next(db, "w", stale_after_s=60)
    while claimed is not None and claimed.id != job.id:
        claimed = runs.claim_next(db, "w", stale_after_s=60)
    assert claimed is not None
    adapter = trained(db, tmp_path, account.org.id, claimed, "w")
    done = runs.succeed(db, claimed, "w", trained_tokens=10, adapter_path=str(adapter), context_length=None)
    owner = fine_tuning_owner(db, tmp_path)
    store = local_store(tmp_path)
    job_dir = artifacts_dir(tmp_path, account.org.id, job.id)

    set_data_controls(db, account.org.id, file_retention_days=1, actor="test")
    sweep(db, store, now=db.now() + timedelta(hours=23), owners=(owner,))
    assert (job_dir / "checkpoints").is_dir()  # not yet a day old
    sweep(db, store, now=db.now() + timedelta(days=2), owners=(owner,))
    assert sorted(p.name for p in job_dir.iterdir()) == ["adapter"]  # the model stays
    assert jobs.list_checkpoints(db, account.org.id, job.id, after=None, limit=10).data == []

    delete_all_data(db, store, account.org.id, confirm=account.org.name, actor="test", owners=(owner,))
    assert not (tmp_path / "fine_tuning" / account.org.id).exists()
    assert find_adapter_models(db, [done.fine_tuned_model]) == {}
    with pytest.raises(ListingRetired):  # to its organization: gone (410); to anyone else: unknown (404)
        resolve_listing(db, account.org.id, done.fine_tuned_model)
