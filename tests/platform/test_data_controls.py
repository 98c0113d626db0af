"""Data controls on SQLite and PostgreSQL with a real file store: retention is a setting that is audited; the
sweeper deletes (rows and bytes, verified on disk) files past their expiry and files older than their
organization's retention, and job artifacts kept as directories likewise, while younger ones stay; "delete all
my data" refuses a wrong confirmation and otherwise leaves nothing of the organization on disk and nothing
of anyone else touched; the export zip holds what its manifest says."""

from __future__ import annotations

import csv
import io
import json
import os
import zipfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.platform.helpers import FakeDateTime, make_account, priced_model, reopen, reserve_model
from tokenmill.platform import data_controls, data_export, files
from tokenmill.platform.audit import list_audit
from tokenmill.platform.billing import settle
from tokenmill.platform.db import Database, open_database
from tokenmill.platform.errors import ConfirmationMismatch, FileNotFound, InvalidArgument
from tokenmill.platform.file_store import LocalFileStore
from tokenmill.platform.files import FileLimits, check_upload
from tokenmill.platform.keys import list_keys
from tokenmill.platform.ledger import balance_micros

LIMITS = FileLimits(max_file_bytes=1 << 20, max_org_bytes=1 << 22)


@pytest.fixture
def clock() -> FakeDateTime:
    return FakeDateTime()


@pytest.fixture
def timed(db: Database, clock: FakeDateTime):
    handle = reopen(db, clock)
    yield handle
    handle.close()


@pytest.fixture
def store(tmp_path: Path) -> LocalFileStore:
    return LocalFileStore(tmp_path / "files")


def put(db: Database, store: LocalFileStore, org_id: str, data: bytes, **spec) -> files.FileInfo:
    return files.create_file(
        db,
        store,
        org_id,
        [data],
        check_upload(spec.pop("filename", "data.jsonl"), spec.pop("purpose", "user_data"), **spec),
        LIMITS,
    )


def on_disk(store: LocalFileStore, org_id: str) -> list[str]:
    root = store.root / org_id
    return sorted(p.name for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_retention_is_a_setting_and_each_change_is_audited(db: Database) -> None:
    account = make_account(db)
    assert data_controls.get_data_controls(db, account.org.id).file_retention_days is None
    actor = f"org:{account.org.id}/key:{account.key.info.id}"
    info = data_controls.set_data_controls(db, account.org.id, file_retention_days=30, actor=actor)
    assert (
        info.file_retention_days
        == 30
        == data_controls.get_data_controls(db, account.org.id).file_retention_days
    )
    data_controls.set_data_controls(db, account.org.id, file_retention_days=30, actor=actor)  # no change
    data_controls.set_data_controls(db, account.org.id, file_retention_days=None, actor=actor)
    rows = list_audit(db, action="set_data_controls", target=account.org.id)
    assert [(r.before, r.after) for r in reversed(rows)] == [
        ({"file_retention_days": None}, {"file_retention_days": 30}),
        ({"file_retention_days": 30}, {"file_retention_days": None}),
    ]
    for bad in (0, -1, 36_501, "7", 1.5):
        with pytest.raises(InvalidArgument, match="file_retention_days"):
            data_controls.set_data_controls(db, account.org.id, file_retention_days=bad, actor=actor)


def test_the_sweeper_deletes_expired_and_retained_files_rows_and_bytes(
    timed: Database, store: LocalFileStore, clock: FakeDateTime, tmp_path: Path
) -> None:
    keeper, forgetter = make_account(timed), make_account(timed)
    data_controls.set_data_controls(timed, forgetter.org.id, file_retention_days=7, actor="test")
    expiring = put(timed, store, keeper.org.id, b"one hour\n", expires_after_s=3600)
    kept = put(timed, store, keeper.org.id, b"kept: no retention set\n")
    old = put(timed, store, forgetter.org.id, b"past retention\n")
    owner = data_controls.directory_owner("fine_tuning", tmp_path / "fine_tuning")
    old_job = tmp_path / "fine_tuning" / forgetter.org.id / "ftjob-old"
    (old_job / "adapter").mkdir(parents=True)
    (old_job / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    stamp = clock.now.timestamp()
    for path in (old_job / "adapter" / "adapter_model.safetensors", old_job / "adapter", old_job):
        os.utime(path, (stamp, stamp))

    assert data_controls.sweep(timed, store, now=clock.now + timedelta(minutes=59)).total == 0
    first = data_controls.sweep(timed, store, now=clock.now + timedelta(hours=1))
    assert (first.expired_files, first.retained_files) == (1, 0)
    assert not store.path_of(expiring.storage_key).exists()
    with pytest.raises(FileNotFound):
        files.get_file(timed, keeper.org.id, expiring.id)

    clock.advance(days=6)
    young = put(timed, store, forgetter.org.id, b"young\n")
    young_job = tmp_path / "fine_tuning" / forgetter.org.id / "ftjob-young"
    young_job.mkdir()
    (young_job / "checkpoint").write_bytes(b"step 1")
    later = clock.now + timedelta(days=1, seconds=1)  # 7 days and a second after `old`, 1 day after `young`
    for path in (young_job / "checkpoint", young_job):
        os.utime(path, (clock.now.timestamp(), clock.now.timestamp()))
    second = data_controls.sweep(timed, store, now=later, owners=[owner])
    assert (second.expired_files, second.retained_files, second.owners) == (0, 1, {"fine_tuning": 1})
    assert not store.path_of(old.storage_key).exists() and not old_job.exists()
    assert [f.id for f in files.list_files(timed, forgetter.org.id).files] == [young.id]
    assert on_disk(store, forgetter.org.id) == [young.id] and young_job.exists()
    assert [f.id for f in files.list_files(timed, keeper.org.id).files] == [kept.id]  # no retention: kept
    assert store.path_of(kept.storage_key).read_bytes() == b"kept: no retention set\n"
    assert data_controls.sweep(timed, store, now=later, owners=[owner]).total == 0  # idempotent


def test_delete_all_my_data_needs_the_name_and_leaves_nothing_of_the_org(
    db: Database, store: LocalFileStore, tmp_path: Path
) -> None:
    mine, theirs = make_account(db, 1_000_000), make_account(db)
    for index in range(3):
        put(db, store, mine.org.id, f"mine {index}\n".encode())
    store.put(f"{mine.org.id}/file-stray", [b"bytes whose row was never written"])
    other = put(db, store, theirs.org.id, b"theirs\n")
    owner = data_controls.directory_owner("fine_tuning", tmp_path / "fine_tuning")
    job = tmp_path / "fine_tuning" / mine.org.id / "ftjob-1" / "checkpoint-10"
    job.mkdir(parents=True)
    (job / "adapter_model.safetensors").write_bytes(b"w")
    their_job = tmp_path / "fine_tuning" / theirs.org.id / "ftjob-2"
    their_job.mkdir(parents=True)
    (their_job / "adapter_model.safetensors").write_bytes(b"w")

    for wrong in ("", mine.org.name.upper(), theirs.org.name, None):
        with pytest.raises(ConfirmationMismatch, match="nothing was deleted"):
            data_controls.delete_all_data(db, store, mine.org.id, confirm=wrong, actor="t", owners=[owner])
    assert len(on_disk(store, mine.org.id)) == 4 and job.exists()

    report = data_controls.delete_all_data(
        db, store, mine.org.id, confirm=mine.org.name, actor="org:test", owners=[owner]
    )
    assert (report.files, report.owners) == (3, {"fine_tuning": 1})
    assert not (store.root / mine.org.id).exists() and not (tmp_path / "fine_tuning" / mine.org.id).exists()
    assert files.list_files(db, mine.org.id).files == []
    assert store.path_of(other.storage_key).read_bytes() == b"theirs\n" and their_job.exists()
    assert [k.id for k in list_keys(db, mine.org.id)] == [mine.key.info.id]  # the account stays
    assert balance_micros(db, mine.org.id) == 1_000_000
    (row,) = list_audit(db, action="delete_all_data", target=mine.org.id)
    assert row.actor == "org:test" and row.after["files"] == 3


def test_the_export_holds_usage_requests_ledger_and_every_file(
    db: Database, store: LocalFileStore, tmp_path: Path
) -> None:
    account = make_account(db, 5_000_000)
    model = priced_model(db, 1_000_000, 2_000_000)
    held = reserve_model(db, account.principal, model, prompt_tokens=10, max_tokens=20)
    settle(db, held, prompt_tokens=10, completion_tokens=5, status="ok", latency_s=0.1)
    first = put(db, store, account.org.id, b'{"a": 1}\n', filename="../../evil.jsonl")
    second = put(db, store, account.org.id, bytes(range(256)) * 300, filename="blob.bin", purpose="vision")
    owner = data_controls.directory_owner("fine_tuning", tmp_path / "fine_tuning")
    adapter = tmp_path / "fine_tuning" / account.org.id / "ftjob-1" / "adapter_config.json"
    adapter.parent.mkdir(parents=True)
    adapter.write_text("{}")
    out = io.BytesIO()
    names = data_export.write_export(db, store, account.org.id, out, owners=[owner])

    archive = zipfile.ZipFile(io.BytesIO(out.getvalue()))
    assert sorted(archive.namelist()) == sorted(names)
    manifest = json.loads(archive.read("manifest.json"))
    assert manifest["organization"]["id"] == account.org.id and sorted(manifest["contents"]) == sorted(names)
    assert manifest["facts"]["stores_request_content"] is False

    def rows(name: str) -> list[dict[str, str]]:
        return list(csv.DictReader(io.StringIO(archive.read(name).decode())))

    (usage,) = rows("usage.csv")
    assert (usage["model"], usage["prompt_tokens"], usage["completion_tokens"], usage["cost_micros"]) == (
        model,
        "10",
        "5",
        "20",
    )
    (request,) = rows("requests.csv")
    assert request["model"] == model and request["key_prefix"] == account.key.info.prefix
    assert sorted(e["kind"] for e in rows("ledger.csv")) == ["charge", "topup"]
    described = {entry["id"]: entry for entry in json.loads(archive.read("files.json"))}
    assert set(described) == {first.id, second.id}
    for info, data in ((first, b'{"a": 1}\n'), (second, bytes(range(256)) * 300)):
        member = described[info.id]["content"]
        assert member.startswith(f"files/{info.id}/") and ".." not in member
        assert archive.read(member) == data and described[info.id]["sha256"] == info.sha256
    assert archive.read("fine_tuning/ftjob-1/adapter_config.json") == b"{}"


def test_admin_sweep_data_deletes_what_is_past_its_expiry(tmp_path: Path) -> None:
    from contextlib import redirect_stdout

    from tokenmill import cli
    from tokenmill.platform.db import sqlite_url
    from tokenmill.platform.file_store import local_store
    from tokenmill.platform.migrate import upgrade

    data_dir = tmp_path / "data"
    upgrade(sqlite_url(data_dir))
    clock = FakeDateTime(datetime.now(UTC) - timedelta(hours=2))  # uploaded two hours ago, for one hour
    db = reopen_url(sqlite_url(data_dir), clock)
    try:
        account = make_account(db)
        store = local_store(data_dir)
        gone = put(db, store, account.org.id, b"expired\n", expires_after_s=3600)
        kept = put(db, store, account.org.id, b"kept\n")
    finally:
        db.close()
    out = io.StringIO()
    with redirect_stdout(out):
        assert cli.main(["admin", "sweep-data", "--data-dir", str(data_dir)]) == 0
    assert "deleted 1 expired file(s)" in out.getvalue()
    assert not store.path_of(gone.storage_key).exists() and store.path_of(kept.storage_key).exists()


def reopen_url(url: str, clock: FakeDateTime) -> Database:
    return open_database(url, clock=clock)
