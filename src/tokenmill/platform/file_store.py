"""Where the bytes of uploaded and result files live, behind a small `FileStore` protocol: a local directory
now (`LocalFileStore`), object storage later. The database holds what a file is (`platform/files.py`); the
store holds only bytes, under keys the platform chooses (`<org_id>/<file_id>`), so every byte of an
organization sits under one prefix that "delete all my data" can remove whole.

A blob appears whole or not at all: `put` streams into a temporary file beside its destination, counting
and hashing as it goes, and renames it into place only once the last chunk is written; a refusal half-way
(a limit the caller's chunk iterator enforces by raising) leaves nothing behind."""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

FILES_DIRNAME = "files"
"""The store's directory inside the server's data dir."""
_SEGMENT = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,199}$")
_TEMP_PREFIX = ".upload-"


class InvalidKey(ValueError):
    """A key that is not `segment/segment...` of safe characters: never a path that could leave the root."""


@dataclass(frozen=True, slots=True)
class StoredBlob:
    size: int
    sha256: str
    """Hex digest of the bytes as written."""


class FileStore(Protocol):
    def put(self, key: str, chunks: Iterable[bytes]) -> StoredBlob:
        """Write the chunks as the blob `key` (replacing any), atomically; an exception raised by the
        iterator leaves no blob and no temporary file, and propagates."""
        ...

    def open(self, key: str) -> BinaryIO:
        """The blob for reading; FileNotFoundError when it is missing."""
        ...

    def size(self, key: str) -> int | None:
        """Its size in bytes, None when it is missing."""
        ...

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> bool:
        """True if it existed. Deleting a missing blob is not an error."""
        ...

    def delete_prefix(self, prefix: str) -> int:
        """Delete every blob under `prefix/` (and any unfinished upload there); returns how many."""
        ...

    def path_of(self, key: str) -> Path | None:
        """A local path to the blob for code that needs one (a trainer reading a dataset), or None for a
        store without local files."""
        ...


def check_key(key: str) -> list[str]:
    """The key's segments, each a safe file name (no `..`, no leading dot, no separators)."""
    if not isinstance(key, str) or not key:
        raise InvalidKey("key: must be a non-empty string")
    segments = key.split("/")
    for segment in segments:
        if not _SEGMENT.match(segment):
            raise InvalidKey(f"key: {key!r} has an unsafe segment {segment!r}")
    return segments


class LocalFileStore:
    """Blobs as plain files under `root`; `<root>/<org_id>/<file_id>` for the platform's keys."""

    CHUNK = 1 << 16

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*check_key(key))

    def put(self, key: str, chunks: Iterable[bytes]) -> StoredBlob:
        destination = self._path(key)
        destination.parent.mkdir(parents=True, exist_ok=True)
        temp = destination.parent / f"{_TEMP_PREFIX}{secrets.token_hex(8)}"
        digest = hashlib.sha256()
        size = 0
        try:
            with temp.open("xb") as out:
                for chunk in chunks:
                    out.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temp, destination)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        return StoredBlob(size=size, sha256=digest.hexdigest())

    def open(self, key: str) -> BinaryIO:
        return self._path(key).open("rb")

    def size(self, key: str) -> int | None:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            return None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> bool:
        path = self._path(key)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        return True

    def delete_prefix(self, prefix: str) -> int:
        directory = self._path(prefix)
        if not directory.is_dir():
            return 0
        count = sum(1 for path in directory.rglob("*") if path.is_file())
        shutil.rmtree(directory, ignore_errors=False)
        return count

    def path_of(self, key: str) -> Path | None:
        return self._path(key)


def local_store(data_dir: str | Path) -> LocalFileStore:
    """The embedded default: `<data_dir>/files`."""
    return LocalFileStore(Path(data_dir).expanduser() / FILES_DIRNAME)


def file_sha256(stream: BinaryIO, chunk_size: int = LocalFileStore.CHUNK) -> str:
    """The hex sha256 of what is left to read in `stream` (read a chunk at a time)."""
    digest = hashlib.sha256()
    while chunk := stream.read(chunk_size):
        digest.update(chunk)
    return digest.hexdigest()
