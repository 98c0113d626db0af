"""Typed dependency aliases: routes declare what they need (`state: StateDep`, `principal: PrincipalDep`)
instead of reaching into `request.app`. Authentication lives here, once, for every /v1 route.

A request carries its key in `Authorization: Bearer` (scripts, SDKs) or, when it has no such header, in the
`tm_session` cookie (the web console; `routes/auth.py` sets it). A browser sends that cookie with requests
other sites make it send, so a cookie-authenticated request that changes something must also prove it
comes from the console: its `X-CSRF-Token` header holds `csrf_token(key)`, which only a page that read the
session answer (same origin) knows."""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, Request
from starlette.concurrency import run_in_threadpool

from tokenmill.platform.auth import authenticate_admin
from tokenmill.platform.errors import MalformedKey, UnknownKey
from tokenmill.platform.gateway import Gateway
from tokenmill.platform.principal import AdminPrincipal, KeyPrincipal
from tokenmill.serving.errors import APIError
from tokenmill.serving.state import ServingState
from tokenmill.text import first_invalid_in_json, may_hold_surrogates

LOCAL_PRINCIPAL = KeyPrincipal(
    key_id="local",
    key_prefix="local",
    org_id="local",
    user_id="local",
    tier="unlimited",
    allowed_models=None,
    spend_limit_micros=None,
    requests_per_minute=None,
    tokens_per_minute=None,
    max_concurrent_requests=None,
    expires_at=None,
)
"""Who every request is under --no-auth: one local user of one local organization, allowed every model,
never rate-limited or billed. It exists in no database (there is none in that mode)."""
SESSION_COOKIE = "tm_session"
CSRF_HEADER = "x-csrf-token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
"""Methods that change nothing: a cookie alone authenticates them."""


# The dependencies that do no I/O are `async def` with nothing to await: FastAPI runs a plain `def`
# dependency in its thread pool, a hand-off between threads per request for a dictionary lookup.


def state_of(request: Request) -> ServingState:
    return request.app.state.tokenmill


async def get_state(request: Request) -> ServingState:
    return state_of(request)


async def get_request_id(request: Request) -> str:
    return request.state.request_id


def bearer_key(authorization: str | None) -> str | None:
    """`Authorization: Bearer sk-...` -> the key; any other scheme is malformed, no header is missing."""
    if authorization is None:
        return None
    scheme, _, key = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        raise MalformedKey("the Authorization header is not of the form 'Bearer <key>'")
    return key.strip()


def request_key(request: Request) -> tuple[str | None, bool]:
    """The request's key and whether it came from the session cookie: the bearer key when there is an
    Authorization header (a malformed one is an error, never a fall back to the cookie), else the cookie's."""
    authorization = request.headers.get("authorization")
    if authorization is not None:
        return bearer_key(authorization), False
    cookie = request.cookies.get(SESSION_COOKIE)
    return (cookie, True) if cookie else (None, False)


def csrf_token(raw_key: str) -> str:
    """Derived from the key, so the server stores nothing per session and a new key means a new token."""
    return hashlib.sha256(b"tokenmill-csrf:" + raw_key.encode("utf-8")).hexdigest()[:32]


def check_csrf(request: Request, raw_key: str) -> None:
    """For a cookie-authenticated request: one that changes something must carry the key's CSRF token."""
    if request.method in SAFE_METHODS:
        return
    sent = request.headers.get(CSRF_HEADER, "").strip().encode("utf-8")
    if not hmac.compare_digest(sent, csrf_token(raw_key).encode("utf-8")):
        raise APIError(
            403,
            "This request is authenticated by the session cookie but lacks its X-CSRF-Token header (the "
            "csrf_token of GET /v1/auth/session).",
            code="csrf_failed",
        )


async def get_principal(request: Request) -> KeyPrincipal:
    """A key seen since the database last changed is answered from memory on the loop; any other is
    looked up in the thread pool, so the loop never waits on the database. Raises the platform's
    AuthenticationError family, which errors.py turns into one identical 401; a cookie-authenticated
    request without its CSRF token is a 403 (after the key is known good, so a stale cookie is a 401)."""
    gateway = state_of(request).gateway
    if gateway is None:
        return LOCAL_PRINCIPAL
    raw_key, from_cookie = request_key(request)
    remembered = gateway.remembered_principal(raw_key)
    principal = remembered or await run_in_threadpool(gateway.authenticate, raw_key)
    if from_cookie:
        check_csrf(request, raw_key or "")  # authenticated: it is a key
    return principal


async def require_valid_text(request: Request) -> None:
    """Invalid Unicode anywhere in a JSON body (a lone surrogate, which JSON's \\u escapes allow) is a 400
    naming the field, before any route, tokenizer or database sees it. FastAPI has already read and parsed
    the body and Starlette caches both: most bodies cost one scan of their bytes, a suspect one a walk."""
    if not may_hold_surrogates(await request.body()):
        return
    try:
        body = await request.json()
    except ValueError:  # not JSON: the route's own validation answers that
        return
    found = first_invalid_in_json(body)
    if found is not None:
        param, reason = found
        raise APIError(
            400,
            f"Invalid value for '{param or 'body'}': {reason}.",
            param=param or None,
            code="invalid_unicode",
        )


def gateway_of(request: Request) -> Gateway:
    """For the account routes (keys, usage), which have nothing to show without a database."""
    gateway = state_of(request).gateway
    if gateway is None:
        raise APIError(
            400,
            "Accounts, keys and usage are not available: this server runs with --no-auth.",
            code="auth_disabled",
        )
    return gateway


async def get_gateway(request: Request) -> Gateway:
    return gateway_of(request)


StateDep = Annotated[ServingState, Depends(get_state)]
RequestIdDep = Annotated[str, Depends(get_request_id)]
PrincipalDep = Annotated[KeyPrincipal, Depends(get_principal)]
GatewayDep = Annotated[Gateway, Depends(get_gateway)]


def get_admin(request: Request) -> AdminPrincipal:
    """For the operator's /v1/admin routes; a plain `def`, so FastAPI runs its database reads in the thread
    pool. No key or a bad one is the same 401 as everywhere; a valid user key is a 403, so an operator who
    pasted the wrong key learns why."""
    gateway = gateway_of(request)
    raw_key, from_cookie = request_key(request)
    try:
        admin = authenticate_admin(gateway.db, raw_key)
    except UnknownKey:
        gateway.authenticate(raw_key)  # not a user key either: its AuthenticationError becomes the 401
        raise APIError(403, "This endpoint requires an admin key.", code="permission_denied") from None
    if from_cookie:
        check_csrf(request, raw_key or "")  # authenticated: it is a key
    return admin


AdminDep = Annotated[AdminPrincipal, Depends(get_admin)]
