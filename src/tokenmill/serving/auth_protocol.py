"""Bodies of the sign-in API (/v1/auth/...) and of the operator's invites (/v1/admin/invites). Requests are
strict and refuse unknown fields: a misspelt `invite_code` must be an error, not a sign-up without one."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tokenmill.platform.admin_ops import MAX_INVITE_DAYS
from tokenmill.platform.invites import MAX_CODE_CHARS, MAX_USES
from tokenmill.platform.people import MAX_EMAIL_CHARS, MAX_PASSWORD_CHARS, MIN_PASSWORD_CHARS

SignupMode = Literal["open", "invite", "closed"]


class AuthConfig(BaseModel):
    """What the console's sign-in page offers, asked before anyone is signed in."""

    object: Literal["auth.config"] = "auth.config"
    signup: SignupMode
    auth_enabled: bool
    """False under --no-auth: there is nothing to sign in to, every request is the local user."""


class SignupRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    email: str = Field(min_length=1, max_length=MAX_EMAIL_CHARS)
    password: str = Field(min_length=MIN_PASSWORD_CHARS, max_length=MAX_PASSWORD_CHARS)
    name: str = Field("", max_length=200)
    """Default: the email."""
    organization: str | None = Field(None, min_length=1, max_length=200)
    """The new organization's name; default: the email's local part and a short random suffix."""
    invite_code: str | None = Field(None, min_length=1, max_length=MAX_CODE_CHARS)
    """Required while sign-up is by invitation."""


class LoginRequest(BaseModel):
    """Either `email` and `password` (a new seven-day session), or `api_key`: a user's key or the admin key,
    which then is the session itself, until the browser closes."""

    model_config = ConfigDict(extra="forbid", strict=True)

    email: str | None = Field(None, min_length=1, max_length=MAX_EMAIL_CHARS)
    password: str | None = Field(None, min_length=1, max_length=MAX_PASSWORD_CHARS)
    api_key: str | None = Field(None, min_length=1, max_length=300)


class PasswordChangeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    current_password: str = Field(min_length=1, max_length=MAX_PASSWORD_CHARS)
    new_password: str = Field(min_length=MIN_PASSWORD_CHARS, max_length=MAX_PASSWORD_CHARS)


class SessionUser(BaseModel):
    id: str
    email: str
    name: str


class SessionOrganization(BaseModel):
    id: str
    name: str
    tier: str


class SessionObject(BaseModel):
    """Who the session cookie (or bearer key) signs in as."""

    object: Literal["session"] = "session"
    signed_in: Literal[True] = True
    kind: Literal["password", "api_key", "admin_key"]
    """password: a sign-in with email and password; api_key / admin_key: a key pasted at sign-in."""
    user: SessionUser | None
    """None for the admin key, which belongs to no user."""
    organization: SessionOrganization | None
    is_admin: bool
    csrf_token: str
    """Send it as the X-CSRF-Token header with every cookie-authenticated request but GET, HEAD, OPTIONS."""
    expires_at: int | None
    """Unix seconds; None: the key does not expire (the cookie lasts until the browser closes)."""


class SignedOut(BaseModel):
    """GET /v1/auth/session with no session cookie, or one that no longer signs anyone in: an answer, not an
    error, so a console opening signed out logs no failed request."""

    object: Literal["session"] = "session"
    signed_in: Literal[False] = False


class SessionDeleted(BaseModel):
    object: Literal["session.deleted"] = "session.deleted"
    deleted: bool = True


class CreateInviteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    note: str = Field("", max_length=200)
    max_uses: int = Field(1, ge=1, le=MAX_USES)
    expires_in_days: int | None = Field(None, ge=1, le=MAX_INVITE_DAYS)
    """Default: valid until revoked."""


class InviteObject(BaseModel):
    object: Literal["invite"] = "invite"
    id: str
    code: str
    """What a person types at sign-up."""
    note: str
    max_uses: int
    uses: int
    expires_at: int | None
    revoked_at: int | None
    created_at: int


class InviteList(BaseModel):
    object: Literal["list"] = "list"
    data: list[InviteObject]
