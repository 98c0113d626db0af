"""Batch jobs in the database (SQLite and PostgreSQL): a line is answered exactly once, and the answer
commits with its charge or not at all; cancel, expiry and finalizing close a batch with the right files;
the data controls reach batch lines."""

from __future__ import annotations

import io
import json
import zipfile

import pytest
from sqlalchemy import func, select

from tests.platform.helpers import FakeDateTime, make_account, priced_model, reopen, reserve_model
from tokenmill.platform import batch_results, batches
from tokenmill.platform.batch_data import batches_owner
from tokenmill.platform.billing import settle
from tokenmill.platform.db import Database
from tokenmill.platform.errors import Conflict
from tokenmill.platform.file_store import LocalFileStore
from tokenmill.platform.files import read_file_bytes
from tokenmill.platform.tables import BatchLine, UsageRecord


def _lines(model: str, count: int) -> list[batches.LineSpec]:
    return [
        batches.LineSpec(
            n, f"id-{n}", model, body={"model": model, "messages": [{"role": "user", "content": "hi"}]}
        )
        for n in range(1, count + 1)
    ]


def _spec() -> batches.BatchSpec:
    return batches.BatchSpec("/v1/chat/completions", "file-x", "24h", discount_bps=5_000, owner="gw")


def _answer(db: Database, model: str, account, batch_id: str, line: int) -> None:
    reservation = reserve_model(db, account.principal, model, 10, 10)

    def write(session) -> None:  # noqa: ANN001
        batches.record_answer(
            session, batch_id, line, status_code=200, request_id=f"r{line}", result={"ok": line}, now=db.now()
        )

    settle(db, reservation, 5, 5, "ok", 0.1, also=write)


def test_a_line_is_answered_and_charged_once(db: Database) -> None:
    model = priced_model(db, 1_000_000, 1_000_000)
    account = make_account(db, 1_000_000)
    batch = batches.create_batch(db, account.principal, _spec(), _lines(model, 3))
    assert batch.status == "in_progress" and batch.request_counts.total == 3
    _answer(db, model, account, batch.id, 1)
    with pytest.raises(batches.LineAlreadyAnswered):
        _answer(db, model, account, batch.id, 1)  # a second attempt: its charge rolls back with it
    with db.read() as session:
        charged = session.scalar(select(func.count()).where(UsageRecord.org_id == account.org.id))
    assert charged == 1
    pending = batches.pending_lines(db, batch.id, after_line=0, limit=10)
    assert [p.line for p in pending] == [2, 3]


def test_cancel_expire_and_finalize(db: Database, tmp_path) -> None:
    model = priced_model(db, 0, 0)
    account = make_account(db)
    store = LocalFileStore(tmp_path / "files")
    batch = batches.create_batch(db, account.principal, _spec(), _lines(model, 3))
    _answer(db, model, account, batch.id, 2)
    cancelling = batches.cancel_batch(db, account.org.id, batch.id)
    assert cancelling.status == "cancelling"
    assert batches.cancel_batch(db, account.org.id, batch.id).status == "cancelling"  # harmless again
    closed = batch_results.finalize(db, store, batch.id)
    assert closed.status == "cancelled" and closed.error_file_id is None
    output = read_file_bytes(db, store, account.org.id, closed.output_file_id).decode().splitlines()
    assert [json.loads(line)["custom_id"] for line in output] == ["id-2"]
    with pytest.raises(Conflict):
        batches.cancel_batch(db, account.org.id, batch.id)

    late = batches.create_batch(db, account.principal, _spec(), _lines(model, 2))
    assert batch_results.expire_pending(db, late.id) == 2
    expired = batch_results.finalize(db, store, late.id)
    assert expired.status == "expired" and expired.output_file_id is None
    errors = [
        json.loads(line)
        for line in read_file_bytes(db, store, account.org.id, expired.error_file_id).splitlines()
    ]
    assert {e["error"]["code"] for e in errors} == {batch_results.EXPIRED_CODE} and errors[0][
        "response"
    ] is None


def test_a_refused_file_makes_a_failed_batch_without_lines(db: Database) -> None:
    account = make_account(db)
    errors = [{"code": "duplicate_custom_id", "message": "repeats", "param": "custom_id", "line": 3}]
    batch = batches.create_batch(db, account.principal, _spec(), [], errors)
    assert batch.status == "failed" and batch.errors == errors and batch.request_counts.total == 0
    assert batches.open_batches(db, "gw") == [] or all(
        b.id != batch.id for b in batches.open_batches(db, "gw")
    )


def test_data_controls_reach_batch_lines(db: Database) -> None:
    model = priced_model(db, 0, 0)
    account = make_account(db)
    owner = batches_owner(db)
    batch = batches.create_batch(db, account.principal, _spec(), _lines(model, 2))
    archive_bytes = io.BytesIO()
    with zipfile.ZipFile(archive_bytes, "w") as archive:
        owner.export(account.org.id, archive)
    with zipfile.ZipFile(archive_bytes) as archive:
        exported = archive.read(f"batches/{batch.id}.jsonl").decode().splitlines()
    assert [json.loads(line)["custom_id"] for line in exported] == ["id-1", "id-2"]
    assert owner.delete_org(account.org.id) == 2
    assert batches.get_batch(db, account.org.id, batch.id).status == "cancelled"
    with db.read() as session:
        assert session.scalar(select(func.count()).where(BatchLine.batch_id == batch.id)) == 0


def test_retention_deletes_the_lines_of_batches_closed_long_enough_ago(db: Database, tmp_path) -> None:
    clock = FakeDateTime()
    timed = reopen(db, clock)
    try:
        model = priced_model(timed, 0, 0)
        account = make_account(timed)
        store = LocalFileStore(tmp_path / "files")
        old = batches.create_batch(timed, account.principal, _spec(), _lines(model, 2))
        batches.cancel_batch(timed, account.org.id, old.id)
        batch_results.finalize(timed, store, old.id)
        clock.advance(days=10)
        running = batches.create_batch(timed, account.principal, _spec(), _lines(model, 2))
        assert batches_owner(timed).sweep(clock.now, {account.org.id: 7}) == 2
        with timed.read() as session:
            left = session.scalars(select(BatchLine.batch_id).distinct()).all()
        assert running.id in left and old.id not in left
    finally:
        timed.close()
