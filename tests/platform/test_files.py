"""An organization's files on SQLite and PostgreSQL, with bytes in a real `LocalFileStore`: uploads stream
through the per-file limit and the organization's quota (refused while read, nothing kept), reads verify the
bytes, another organization's file is the same "not found" as a missing one and each attempt is audited,
lists page in creation order, and deleting removes the bytes from disk before the row."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from tests.platform.helpers import Account, FakeDateTime, make_account, reopen
from tokenmill.platform import files
from tokenmill.platform.audit import FOREIGN_ACCESS, list_audit
from tokenmill.platform.db import Database
from tokenmill.platform.errors import (
    FileContentMissing,
    FileNotFound,
    FileTooLarge,
    InvalidArgument,
    StorageQuotaExceeded,
)
from tokenmill.platform.file_store import LocalFileStore
from tokenmill.platform.files import FileLimits, check_upload

LIMITS = FileLimits(max_file_bytes=4096, max_org_bytes=10_000)


@pytest.fixture
def store(tmp_path: Path) -> LocalFileStore:
    return LocalFileStore(tmp_path / "files")


def blobs(store: LocalFileStore, org_id: str | None = None) -> list[Path]:
    """Every file on disk under the store (or under one organization's prefix), temporary ones included."""
    root = store.root if org_id is None else store.root / org_id
    return sorted(path for path in root.rglob("*") if path.is_file()) if root.exists() else []


def upload(
    db: Database, store: LocalFileStore, account: Account, data: bytes, *, purpose: str = "fine-tune", **kw
) -> files.FileInfo:
    spec = check_upload("train.jsonl", purpose, kw.pop("expires_after_s", None))
    chunks = [data[i : i + 1000] for i in range(0, len(data), 1000)] or [b""]
    return files.create_file(db, store, account.org.id, chunks, spec, kw.pop("limits", LIMITS))


def test_an_upload_is_stored_checksummed_and_read_back_exactly(db: Database, store: LocalFileStore) -> None:
    account = make_account(db)
    data = b'{"messages": []}\n' * 100
    info = upload(db, store, account, data)
    assert info.id.startswith("file-") and info.bytes == len(data) and info.org_id == account.org.id
    assert info.sha256 == hashlib.sha256(data).hexdigest() and info.expires_at is None
    assert store.path_of(info.storage_key).read_bytes() == data
    assert files.get_file(db, account.org.id, info.id) == info
    got, stream = files.open_content(db, store, account.org.id, info.id)
    with stream:
        assert got == info and stream.read() == data
    assert files.read_file_bytes(db, store, account.org.id, info.id) == data
    with files.open_for(db, store, account.org.id, info.id) as stream:
        assert stream.read() == data
    assert files.local_path_for(db, store, account.org.id, info.id).read_bytes() == data
    assert files.used_bytes(db, account.org.id) == len(data)


def counted(chunks: int, size: int, seen: list[int]) -> Iterator[bytes]:
    for index in range(chunks):
        seen.append(index)
        yield b"x" * size


def test_a_file_over_the_limit_is_refused_while_read_and_nothing_is_kept(
    db: Database, store: LocalFileStore
) -> None:
    account = make_account(db)
    seen: list[int] = []
    spec = check_upload("big.jsonl", "fine-tune")
    with pytest.raises(FileTooLarge) as refused:
        files.create_file(db, store, account.org.id, counted(1000, 1024, seen), spec, LIMITS)
    assert refused.value.limit_bytes == 4096 and "4096 bytes" in str(refused.value)
    assert len(seen) == 5  # stopped at the first chunk past the limit, not at the end of the upload
    assert blobs(store) == [] and files.list_files(db, account.org.id).files == []
    assert files.used_bytes(db, account.org.id) == 0


def test_the_quota_counts_every_file_of_the_organization(db: Database, store: LocalFileStore) -> None:
    account, other = make_account(db), make_account(db)
    for _ in range(2):
        upload(db, store, account, b"a" * 4000)
    upload(db, store, other, b"b" * 4000)  # another organization's files count against its own quota only
    kept = blobs(store)
    with pytest.raises(StorageQuotaExceeded) as refused:
        upload(db, store, account, b"c" * 2001)
    assert refused.value.used_bytes == 8000 and "10000 bytes" in str(refused.value)
    assert blobs(store) == kept and len(files.list_files(db, account.org.id).files) == 2
    assert upload(db, store, account, b"c" * 2000).bytes == 2000  # exactly up to the quota fits


def test_two_uploads_racing_for_the_last_bytes_of_the_quota_cannot_both_win(
    db: Database, store: LocalFileStore
) -> None:
    account = make_account(db)
    spec = check_upload("half.jsonl", "batch")
    first = files.receive(db, store, account.org.id, [b"a" * 4000], LIMITS)
    second = files.receive(db, store, account.org.id, [b"b" * 4000], LIMITS)
    third = files.receive(db, store, account.org.id, [b"c" * 4000], LIMITS)  # each fit when it started
    files.commit(db, store, account.org.id, first, spec, LIMITS)
    files.commit(db, store, account.org.id, second, spec, LIMITS)
    with pytest.raises(StorageQuotaExceeded):
        files.commit(db, store, account.org.id, third, spec, LIMITS)
    assert not store.exists(third.storage_key) and len(blobs(store, account.org.id)) == 2


def test_another_organizations_file_is_not_found_and_each_attempt_is_audited(
    db: Database, store: LocalFileStore
) -> None:
    owner, stranger = make_account(db), make_account(db)
    info = upload(db, store, owner, b"secret\n")
    missing = "file-" + "0" * 26
    attempts = [
        lambda: files.get_file(db, stranger.org.id, info.id, key_id=stranger.key.info.id),
        lambda: files.open_content(db, store, stranger.org.id, info.id, key_id=stranger.key.info.id),
        lambda: files.delete_file(db, store, stranger.org.id, info.id, key_id=stranger.key.info.id),
        lambda: files.read_file_bytes(db, store, stranger.org.id, info.id, principal=stranger.principal),
    ]
    for attempt in attempts:
        with pytest.raises(FileNotFound) as foreign:
            attempt()
        with pytest.raises(FileNotFound) as absent:
            files.get_file(db, stranger.org.id, missing)
        assert str(foreign.value).replace(info.id, "?") == str(absent.value).replace(missing, "?")
    rows = list_audit(db, action=FOREIGN_ACCESS, target=info.id)
    assert len(rows) == 4
    assert {row.actor for row in rows} == {f"org:{stranger.org.id}/key:{stranger.key.info.id}"}
    assert rows[0].after == {"kind": "file", "owner_org_id": owner.org.id}
    assert list_audit(db, action=FOREIGN_ACCESS, target=missing) == []  # a missing file is no one's
    assert files.list_files(db, stranger.org.id).files == []
    assert files.read_file_bytes(db, store, owner.org.id, info.id) == b"secret\n"  # untouched


def test_lists_page_in_creation_order_and_a_deleted_cursor_still_works(
    db: Database, store: LocalFileStore
) -> None:
    account = make_account(db)
    made = [
        upload(db, store, account, f"{i}\n".encode(), purpose="batch" if i % 2 else "fine-tune")
        for i in range(5)
    ]
    newest_first = [info.id for info in reversed(made)]
    pages, after = [], None
    while True:
        page = files.list_files(db, account.org.id, limit=2, after=after)
        pages.append([info.id for info in page.files])
        if not page.has_more:
            break
        after = page.files[-1].id
    assert pages == [newest_first[0:2], newest_first[2:4], newest_first[4:]]
    oldest_first = files.list_files(db, account.org.id, order="asc")
    assert [info.id for info in oldest_first.files] == [info.id for info in made]
    assert [i.id for i in files.list_files(db, account.org.id, purpose="batch").files] == [
        made[3].id,
        made[1].id,
    ]
    files.delete_file(db, store, account.org.id, made[3].id)
    after_deleted = files.list_files(db, account.org.id, limit=2, after=made[3].id)
    assert [info.id for info in after_deleted.files] == [made[2].id, made[1].id]
    with pytest.raises(InvalidArgument, match="limit"):
        files.list_files(db, account.org.id, limit=0)


def test_deleting_removes_the_bytes_then_the_row(db: Database, store: LocalFileStore) -> None:
    account = make_account(db)
    info = upload(db, store, account, b"bye\n")
    path = store.path_of(info.storage_key)
    assert path.is_file()
    assert files.delete_file(db, store, account.org.id, info.id) == info
    assert not path.exists() and blobs(store, account.org.id) == []
    with pytest.raises(FileNotFound):
        files.get_file(db, account.org.id, info.id)
    with pytest.raises(FileNotFound):
        files.delete_file(db, store, account.org.id, info.id)


def test_missing_or_altered_bytes_are_reported_never_served(db: Database, store: LocalFileStore) -> None:
    account = make_account(db)
    info = upload(db, store, account, b"data\n")
    store.path_of(info.storage_key).write_bytes(b"DATA\n")  # same size, other bytes
    with pytest.raises(FileContentMissing):
        files.read_file_bytes(db, store, account.org.id, info.id)
    store.delete(info.storage_key)
    with pytest.raises(FileContentMissing, match=info.id):
        files.open_content(db, store, account.org.id, info.id)
    files.delete_file(db, store, account.org.id, info.id)  # a file without bytes can still be deleted
    assert files.list_files(db, account.org.id).files == []


def test_purposes_users_may_upload_and_result_files_the_platform_writes(
    db: Database, store: LocalFileStore
) -> None:
    for purpose in ("fine-tune-results", "batch_output", "fine-tuning", ""):
        with pytest.raises(InvalidArgument, match="purpose"):
            check_upload("a.jsonl", purpose)
    for seconds in (3599, 30 * 24 * 3600 + 1, True):
        with pytest.raises(InvalidArgument, match="expires_after"):
            check_upload("a.jsonl", "user_data", seconds)
    with pytest.raises(InvalidArgument, match="file"):
        check_upload("", "user_data")
    assert check_upload("b.jsonl", "batch").expires_after_s == 30 * 24 * 3600  # OpenAI's batch default
    account = make_account(db)
    result = files.store_result_file(
        db, store, account.org.id, filename="step_10.csv", purpose="fine-tune-results", content=b"step,loss\n"
    )
    assert result.purpose == "fine-tune-results" and result.bytes == 10
    assert files.read_file_bytes(db, store, account.org.id, result.id) == b"step,loss\n"
    with pytest.raises(InvalidArgument, match="purpose"):
        files.store_result_file(db, store, account.org.id, filename="x", purpose="nope", content=b"")


def test_an_expired_file_is_gone_for_readers_before_the_sweeper_deletes_it(
    db: Database, store: LocalFileStore
) -> None:
    clock = FakeDateTime()
    timed = reopen(db, clock)
    try:
        account = make_account(timed)
        info = upload(timed, store, account, b"soon gone\n", expires_after_s=3600)
        assert info.expires_at == clock.now + timedelta(hours=1)
        clock.advance(minutes=59)
        assert files.get_file(timed, account.org.id, info.id) == info
        clock.advance(minutes=1)
        with pytest.raises(FileNotFound):
            files.get_file(timed, account.org.id, info.id)
        assert files.list_files(timed, account.org.id).files == []
    finally:
        timed.close()
