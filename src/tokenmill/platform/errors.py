"""Typed errors of the platform layer. `serving/` maps each family to one HTTP status and OpenAI error body;
the classes carry what that mapping needs and nothing that would leak whether a key exists."""

from __future__ import annotations


class PlatformError(ValueError):
    """Base of every error the platform raises on purpose."""


# --- authentication: all map to one 401 with the same message ------------------------------------


class AuthenticationError(PlatformError):
    """The request carries no usable key. Subclasses exist for logs and tests; clients see one 401."""

    public_message = "Incorrect API key provided."


class MissingKey(AuthenticationError):
    pass


class MalformedKey(AuthenticationError):
    pass


class UnknownKey(AuthenticationError):
    pass


class RevokedKey(AuthenticationError):
    pass


class ExpiredKey(AuthenticationError):
    pass


# --- people signing in and up (`people.py`) -------------------------------------------------------


class InvalidCredentials(PlatformError):
    """A wrong password or an email nobody has: one message for both, so sign-in tells no one which
    emails have accounts."""

    public_message = "Incorrect email or password."


class LoginThrottled(PlatformError):
    """Too many failed sign-ins for this email: the next try is allowed `retry_after_s` seconds from now,
    whatever the password."""

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"Too many failed sign-in attempts; try again in {retry_after_s} seconds.")
        self.retry_after_s = retry_after_s


class SignupClosed(PlatformError):
    """The server takes no sign-ups (`tokenmill serve --signup closed`)."""


class InviteInvalid(PlatformError):
    """Sign-up is by invitation, and the code given is missing, unknown, revoked, expired or used up (one
    message for all: codes cannot be probed)."""


# --- authorization: 403 ---------------------------------------------------------------------------


class PermissionDenied(PlatformError):
    """An authenticated key asks for something outside its grant."""


class ModelNotAllowed(PermissionDenied):
    def __init__(self, model: str) -> None:
        super().__init__(f"model: this API key may not use {model!r}")
        self.model = model


# --- quota: 429 insufficient_quota ----------------------------------------------------------------


class InsufficientQuota(PlatformError):
    """The worst-case cost of a request does not fit the account balance or the key's spend limit."""

    def __init__(self, reason: str, needed_micros: int, available_micros: int) -> None:
        what = "account balance" if reason == "balance" else "API key spend limit"
        super().__init__(
            f"You exceeded your current quota: the request may cost up to {needed_micros} micros and the "
            f"{what} has {available_micros} micros available."
        )
        self.reason = reason
        """"balance" or "key_spend_limit"."""
        self.needed_micros = needed_micros
        self.available_micros = available_micros


# --- bad input and missing things: 400 / 404 / 409 ------------------------------------------------


class InvalidAmount(PlatformError):
    """A money amount that is not a positive integer of micros (or out of range)."""


class InvalidArgument(PlatformError):
    """Any other malformed argument; the message names the field."""


class NotFound(PlatformError):
    """A referenced row does not exist (or, for keys, is not visible to the caller's organization)."""


class UnknownOrganization(NotFound):
    pass


class UnknownUser(NotFound):
    pass


class KeyNotFound(NotFound):
    pass


class UnknownTier(NotFound):
    pass


class InviteNotFound(NotFound):
    pass


class ModelNotPriced(NotFound):
    """Requests for a model without a price are refused rather than served for free by accident."""

    def __init__(self, model: str) -> None:
        super().__init__(f"model: {model!r} has no price; set one with `tokenmill admin set-price`")
        self.model = model


class ModelNotFound(NotFound):
    """404 model_not_found for a caller. One message whether the model does not exist, is retired, is
    another organization's private or draft listing, or is shared with others only: a caller cannot learn
    which models exist beyond those it may call."""

    def __init__(self, model: str) -> None:
        super().__init__(f"The model `{model}` does not exist or you do not have access to it.")
        self.model = model


class ListingNotFound(NotFound):
    """The operator's view: no listing of that model, in any status."""

    def __init__(self, model: str) -> None:
        super().__init__(f"model: no listing of {model!r}")
        self.model = model


class ListingRetired(PlatformError):
    """410: the caller's own organization provides this model and retired it. Only the provider learns
    this; everybody else gets `ModelNotFound`."""

    def __init__(self, model: str) -> None:
        super().__init__(f"The model `{model}` was retired by its provider and no longer accepts requests.")
        self.model = model


class Conflict(PlatformError):
    """The write contradicts an existing row (duplicate name, reused idempotency key, closed reservation)."""


class DuplicateName(Conflict):
    pass


class EmailTaken(Conflict):
    pass


class OrganizationTaken(Conflict):
    pass


class IdempotencyConflict(Conflict):
    """An idempotency key was reused for a different top-up."""


class ReservationClosed(Conflict):
    """settle/release on a reservation that is no longer open: nothing is charged twice."""


# --- files and data controls (`files.py`, `data_controls.py`) ---------------------------------------


class FileNotFound(NotFound):
    """404 for a file id that does not exist or belongs to another organization: one message for both, so
    nobody can learn which file ids exist elsewhere (the attempt on another's file is audited instead)."""

    def __init__(self, file_id: str) -> None:
        super().__init__(f"file_id: No such File object: {file_id}")
        self.file_id = file_id


class UploadTooLarge(PlatformError):
    """413: an upload went past a limit while it was read; nothing of it was kept. `limit` names which
    (`file`: the per-file size limit, `organization`: the organization's storage quota)."""

    def __init__(self, message: str, *, limit: str, limit_bytes: int) -> None:
        super().__init__(message)
        self.limit = limit
        self.limit_bytes = limit_bytes


class FileTooLarge(UploadTooLarge):
    def __init__(self, limit_bytes: int) -> None:
        super().__init__(
            f"file: the file is larger than this server's limit of {limit_bytes} bytes per file.",
            limit="file",
            limit_bytes=limit_bytes,
        )


class StorageQuotaExceeded(UploadTooLarge):
    def __init__(self, limit_bytes: int, used_bytes: int) -> None:
        super().__init__(
            f"file: storing this file would take the organization's files past its storage quota of "
            f"{limit_bytes} bytes ({used_bytes} bytes are in use); delete files to make room.",
            limit="organization",
            limit_bytes=limit_bytes,
        )
        self.used_bytes = used_bytes


class FileContentMissing(PlatformError):
    """410: the file's row exists but its bytes are gone from the store (or are not what was stored)."""

    def __init__(self, file_id: str) -> None:
        super().__init__(
            f"file_id: the content of {file_id} is no longer available (its bytes are missing from "
            "storage); delete the file and upload it again."
        )
        self.file_id = file_id


class ConfirmationMismatch(InvalidArgument):
    """A destructive action whose confirmation text is missing or wrong: nothing was done."""
