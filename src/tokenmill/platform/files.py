"""An organization's files (the OpenAI Files API): their rows here, their bytes in a `FileStore`.

Every read names the organization asking: a file of another organization is answered exactly like a file that
does not exist (`FileNotFound`), and the attempt is written to the audit log. An upload is streamed into the
store while its size is counted against the per-file limit and the organization's quota, so a refused upload
stops at the limit with nothing kept; the quota is checked again, under the organization's lock, when the row
is written, so two uploads racing for the last bytes of a quota cannot both win. Deleting removes the bytes
first and the row second: a crash in between leaves a row whose content reads as missing (and which the
next delete or sweep removes), never bytes nobody knows about.

File ids are `file-` + the creation time in hex microseconds + random hex, so listing in id order is listing
in creation order and a page cursor (`after`, the last id of the previous page) keeps working when that file
is deleted meanwhile."""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import BinaryIO

from sqlalchemy import delete, func, or_, select
from sqlalchemy.orm import Session

from tokenmill.platform import audit
from tokenmill.platform.db import Database
from tokenmill.platform.errors import (
    FileContentMissing,
    FileNotFound,
    FileTooLarge,
    InvalidArgument,
    StorageQuotaExceeded,
)
from tokenmill.platform.file_store import FileStore
from tokenmill.platform.ledger import lock_organization
from tokenmill.platform.principal import KeyPrincipal
from tokenmill.platform.tables import FILE_PURPOSES, StoredFile
from tokenmill.platform.validation import text

logger = logging.getLogger(__name__)

MiB = 1 << 20
GiB = 1 << 30
USER_PURPOSES = ("fine-tune", "batch", "assistants", "vision", "user_data", "evals")
"""What a user may upload."""
SYSTEM_PURPOSES = tuple(purpose for purpose in FILE_PURPOSES if purpose not in USER_PURPOSES)
"""What only the platform's jobs write (`store_result_file`): fine-tune-results, batch_output."""
MIN_EXPIRES_AFTER_S = 3600
MAX_EXPIRES_AFTER_S = 30 * 24 * 3600
"""OpenAI's bounds of `expires_after[seconds]`: one hour to 30 days."""
BATCH_DEFAULT_EXPIRES_AFTER_S = MAX_EXPIRES_AFTER_S
"""As OpenAI: batch input files expire after 30 days unless the upload says otherwise."""
MAX_FILENAME_CHARS = 512
MAX_PAGE = 10_000
FILE_KIND = "file"
"""The `kind` of this module's foreign-access audit rows."""
_ID_RE = re.compile(r"^file-[0-9a-f]{14}[0-9a-f]{12}$")
_MAX_CURSOR_CHARS = 64
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class FileLimits:
    max_file_bytes: int = 512 * MiB
    max_org_bytes: int = 10 * GiB
    """All of an organization's files together, result files of its jobs included."""

    def __post_init__(self) -> None:
        for name in ("max_file_bytes", "max_org_bytes"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise InvalidArgument(f"{name}: must be a positive integer")


@dataclass(frozen=True, slots=True)
class FileInfo:
    id: str
    org_id: str
    filename: str
    purpose: str
    bytes: int
    sha256: str
    storage_key: str
    created_at: datetime
    expires_at: datetime | None


@dataclass(frozen=True, slots=True)
class FilePage:
    files: list[FileInfo]
    has_more: bool


@dataclass(frozen=True, slots=True)
class UploadSpec:
    """What an upload says about itself, checked (`check_upload`) before a byte of it is stored."""

    filename: str
    purpose: str
    expires_after_s: int | None


@dataclass(frozen=True, slots=True)
class Received:
    """Bytes in the store under a fresh id, with no row yet: `commit` makes it a file, `discard` drops it."""

    file_id: str
    storage_key: str
    bytes: int
    sha256: str
    created_at: datetime


def check_upload(
    filename: object, purpose: object, expires_after_s: object = None, *, system: bool = False
) -> UploadSpec:
    """`purpose` must be one of `USER_PURPOSES` (or, for `system` writers, `SYSTEM_PURPOSES` too);
    `expires_after_s` from one hour to 30 days, None for the default (30 days for batch, else never)."""
    filename = text("file", filename, max_len=MAX_FILENAME_CHARS)
    allowed = FILE_PURPOSES if system else USER_PURPOSES
    if not isinstance(purpose, str) or purpose not in allowed:
        raise InvalidArgument(f"purpose: must be one of {', '.join(allowed)}")
    if expires_after_s is not None and (
        type(expires_after_s) is not int or not MIN_EXPIRES_AFTER_S <= expires_after_s <= MAX_EXPIRES_AFTER_S
    ):
        raise InvalidArgument(
            f"expires_after.seconds: must be an integer from {MIN_EXPIRES_AFTER_S} to {MAX_EXPIRES_AFTER_S}"
        )
    if expires_after_s is None and purpose == "batch":
        expires_after_s = BATCH_DEFAULT_EXPIRES_AFTER_S
    return UploadSpec(filename=filename, purpose=purpose, expires_after_s=expires_after_s)


def storage_key(org_id: str, file_id: str) -> str:
    """Every blob of an organization lives under the prefix `org_id` (see `FileStore.delete_prefix`)."""
    return f"{org_id}/{file_id}"


def used_bytes(db: Database, org_id: str) -> int:
    """The organization's files, in bytes, as the quota counts them."""
    with db.read() as session:
        return _used(session, org_id)


def receive(
    db: Database, store: FileStore, org_id: str, chunks: Iterable[bytes], limits: FileLimits | None
) -> Received:
    """Stream `chunks` into the store under a new file id, refusing (`FileTooLarge`,
    `StorageQuotaExceeded`) as soon as they pass a limit; a refusal leaves nothing stored. `limits=None`:
    no limit (the platform's own result files). Writes no row: `commit` does."""
    now = db.now()
    file_id = _new_file_id(now)
    key = storage_key(org_id, file_id)
    if limits is not None:
        chunks = _limited(chunks, limits, used_bytes(db, org_id))
    blob = store.put(key, chunks)
    return Received(file_id=file_id, storage_key=key, bytes=blob.size, sha256=blob.sha256, created_at=now)


def commit(
    db: Database,
    store: FileStore,
    org_id: str,
    received: Received,
    spec: UploadSpec,
    limits: FileLimits | None,
) -> FileInfo:
    """The row of a received upload. The quota is checked again under the organization's lock (another
    upload may have finished meanwhile); any refusal deletes the received bytes."""
    try:
        with db.write() as session:
            lock_organization(session, org_id)
            if limits is not None:
                used = _used(session, org_id)
                if used + received.bytes > limits.max_org_bytes:
                    raise StorageQuotaExceeded(limits.max_org_bytes, used)
            expires_at = (
                None
                if spec.expires_after_s is None
                else received.created_at + timedelta(seconds=spec.expires_after_s)
            )
            row = StoredFile(
                id=received.file_id,
                org_id=org_id,
                filename=spec.filename,
                purpose=spec.purpose,
                bytes=received.bytes,
                sha256=received.sha256,
                storage_key=received.storage_key,
                created_at=received.created_at,
                expires_at=expires_at,
            )
            session.add(row)
            session.flush()
            return file_info(row)
    except BaseException:
        discard(store, received)
        raise


def discard(store: FileStore, received: Received) -> None:
    store.delete(received.storage_key)


def create_file(
    db: Database,
    store: FileStore,
    org_id: str,
    chunks: Iterable[bytes],
    spec: UploadSpec,
    limits: FileLimits | None,
) -> FileInfo:
    """`receive` then `commit`: a file from bytes whose description is known before they are read."""
    return commit(db, store, org_id, receive(db, store, org_id, chunks, limits), spec, limits)


def store_result_file(
    db: Database,
    store: FileStore,
    org_id: str,
    *,
    filename: str,
    purpose: str,
    content: bytes | BinaryIO | Iterable[bytes],
    expires_after_s: int | None = None,
) -> FileInfo:
    """For the platform's jobs (fine-tuning, batches): store a result file of `org_id` (any purpose,
    `fine-tune-results` and `batch_output` included). No size limit or quota: the work that produced it is
    done and paid for; the file still counts towards the quota of later uploads."""
    spec = check_upload(filename, purpose, expires_after_s, system=True)
    return create_file(db, store, org_id, _chunks_of(content), spec, None)


def get_file(db: Database, org_id: str, file_id: str, *, key_id: str | None = None) -> FileInfo:
    """The organization's file `file_id`; `FileNotFound` if it has none (another organization's file is
    audited as a foreign access and answered the same)."""
    file_id = _file_ref(file_id)
    now = db.now()
    with db.read() as session:
        row = session.get(StoredFile, file_id)
        info = None if row is None else file_info(row)
    if info is None:
        raise FileNotFound(file_id)
    if info.org_id != org_id:
        audit.record_foreign_access(db, org_id, FILE_KIND, file_id, key_id=key_id, owner_org_id=info.org_id)
        raise FileNotFound(file_id)
    if info.expires_at is not None and info.expires_at <= now:  # expired, not yet swept: gone already
        raise FileNotFound(file_id)
    return info


def list_files(
    db: Database,
    org_id: str,
    *,
    purpose: str | None = None,
    limit: int = MAX_PAGE,
    after: str | None = None,
    order: str = "desc",
) -> FilePage:
    """The organization's files in creation order (`desc`: newest first), `limit` at a time; the next page
    is `after=` the last id of this one."""
    if type(limit) is not int or not 1 <= limit <= MAX_PAGE:
        raise InvalidArgument(f"limit: must be an integer from 1 to {MAX_PAGE}")
    if order not in ("asc", "desc"):
        raise InvalidArgument("order: must be asc or desc")
    if purpose is not None and purpose not in FILE_PURPOSES:
        raise InvalidArgument(f"purpose: must be one of {', '.join(FILE_PURPOSES)}")
    now = db.now()
    query = select(StoredFile).where(
        StoredFile.org_id == org_id, or_(StoredFile.expires_at.is_(None), StoredFile.expires_at > now)
    )
    if purpose is not None:
        query = query.where(StoredFile.purpose == purpose)
    if after is not None:
        after = text("after", after, max_len=_MAX_CURSOR_CHARS)
        query = query.where(StoredFile.id < after if order == "desc" else StoredFile.id > after)
    query = query.order_by(StoredFile.id.desc() if order == "desc" else StoredFile.id.asc()).limit(limit + 1)
    with db.read() as session:
        rows = [file_info(row) for row in session.scalars(query)]
    return FilePage(files=rows[:limit], has_more=len(rows) > limit)


def open_content(
    db: Database, store: FileStore, org_id: str, file_id: str, *, key_id: str | None = None
) -> tuple[FileInfo, BinaryIO]:
    """The file and its bytes, open for reading (the caller closes it). `FileContentMissing` when the
    bytes are not in the store, or not as many as were stored."""
    info = get_file(db, org_id, file_id, key_id=key_id)
    if store.size(info.storage_key) != info.bytes:
        logger.error("file %s of %s: its bytes are missing or truncated in the store", info.id, org_id)
        raise FileContentMissing(info.id)
    try:
        return info, store.open(info.storage_key)
    except FileNotFoundError:
        raise FileContentMissing(info.id) from None


def open_for(db: Database, store: FileStore, org_id: str, file_id: str) -> BinaryIO:
    """For jobs (a fine-tuning job reading its training file): the bytes of `org_id`'s file, open for
    reading; `FileNotFound` / `FileContentMissing` as for the API."""
    return open_content(db, store, org_id, file_id)[1]


def read_file_bytes(
    db: Database,
    store: FileStore,
    org_id: str,
    file_id: str,
    *,
    principal: KeyPrincipal | None = None,
) -> bytes:
    """All of `org_id`'s file in memory (at most the per-file limit), for code that parses it whole (a
    training file). `principal`: the request's, when a caller asks (its key is named in a foreign-access
    row)."""
    key_id = None if principal is None else principal.key_id
    info, stream = open_content(db, store, org_id, file_id, key_id=key_id)
    with stream:
        data = stream.read()
    if len(data) != info.bytes or hashlib.sha256(data).hexdigest() != info.sha256:
        logger.error("file %s of %s: its bytes no longer match their sha256", info.id, org_id)
        raise FileContentMissing(info.id)
    return data


def local_path_for(db: Database, store: FileStore, org_id: str, file_id: str) -> Path:
    """For a trainer that wants a path: where `org_id`'s file lies on this machine. A store without local
    files (object storage) has none: copy from `open_for` instead."""
    info, stream = open_content(db, store, org_id, file_id)
    stream.close()
    path = store.path_of(info.storage_key)
    if path is None:
        raise InvalidArgument("file_id: this file store keeps no local files; read it with open_for")
    return path


def delete_file(
    db: Database, store: FileStore, org_id: str, file_id: str, *, key_id: str | None = None
) -> FileInfo:
    """Bytes first, then the row (see the module's docstring)."""
    info = get_file(db, org_id, file_id, key_id=key_id)
    delete_stored(db, store, [info])
    return info


def delete_stored(db: Database, store: FileStore, infos: Iterable[FileInfo]) -> int:
    """Delete these files, bytes then rows; returns how many rows were deleted (a file deleted meanwhile
    by someone else is not counted). Bytes that are still there afterwards are an error, never ignored."""
    infos = list(infos)
    for info in infos:
        store.delete(info.storage_key)
        if store.exists(info.storage_key):
            raise OSError(f"file {info.id}: its bytes are still in the store after deletion")
    if not infos:
        return 0
    with db.write() as session:
        result = session.execute(delete(StoredFile).where(StoredFile.id.in_([i.id for i in infos])))
        return int(result.rowcount or 0)  # type: ignore[attr-defined]


def org_files(db: Database, org_id: str, *, page_size: int = 500) -> Iterator[FileInfo]:
    """Every file of the organization (expired ones too), oldest first, read a page at a time."""
    after = ""
    while True:
        query = (
            select(StoredFile)
            .where(StoredFile.org_id == org_id, StoredFile.id > after)
            .order_by(StoredFile.id)
            .limit(page_size)
        )
        with db.read() as session:
            rows = [file_info(row) for row in session.scalars(query)]
        yield from rows
        if len(rows) < page_size:
            return
        after = rows[-1].id


def _used(session: Session, org_id: str) -> int:
    total = session.scalar(
        select(func.coalesce(func.sum(StoredFile.bytes), 0)).where(StoredFile.org_id == org_id)
    )
    return int(total or 0)


def _limited(chunks: Iterable[bytes], limits: FileLimits, used: int) -> Iterator[bytes]:
    size = 0
    for chunk in chunks:
        size += len(chunk)
        if size > limits.max_file_bytes:
            raise FileTooLarge(limits.max_file_bytes)
        if used + size > limits.max_org_bytes:
            raise StorageQuotaExceeded(limits.max_org_bytes, used)
        if chunk:
            yield chunk


def _chunks_of(content: bytes | BinaryIO | Iterable[bytes], chunk_size: int = 1 << 16) -> Iterable[bytes]:
    if isinstance(content, bytes | bytearray | memoryview):
        return [bytes(content)]
    read = getattr(content, "read", None)
    if read is not None:
        return iter(lambda: read(chunk_size), b"")
    return content  # type: ignore[return-value]


def _new_file_id(now: datetime) -> str:
    micros = max(0, (now - _EPOCH) // timedelta(microseconds=1))
    return f"file-{micros:014x}{secrets.token_hex(6)}"


def _file_ref(file_id: object) -> str:
    """Any string is a reference to look up; one that could never be an id is simply not found."""
    if not isinstance(file_id, str) or not _ID_RE.match(file_id):
        raise FileNotFound((file_id if isinstance(file_id, str) else repr(file_id))[:100])
    return file_id


def file_info(row: StoredFile) -> FileInfo:
    return FileInfo(
        id=row.id,
        org_id=row.org_id,
        filename=row.filename,
        purpose=row.purpose,
        bytes=row.bytes,
        sha256=row.sha256,
        storage_key=row.storage_key,
        created_at=row.created_at,
        expires_at=row.expires_at,
    )
