"""Typed dependency aliases: routes declare what they need (`state: StateDep`, `principal: PrincipalDep`)
instead of reaching into `request.app`. Authentication lives here, once, for every /v1 route."""

from __future__ import annotations

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


async def get_principal(request: Request) -> KeyPrincipal:
    """A key seen since the database last changed is answered from memory on the loop; any other is
    looked up in the thread pool, so the loop never waits on the database. Raises the platform's
    AuthenticationError family, which errors.py turns into one identical 401."""
    gateway = state_of(request).gateway
    if gateway is None:
        return LOCAL_PRINCIPAL
    raw_key = bearer_key(request.headers.get("authorization"))
    remembered = gateway.remembered_principal(raw_key)
    return remembered or await run_in_threadpool(gateway.authenticate, raw_key)


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
    raw_key = bearer_key(request.headers.get("authorization"))
    try:
        return authenticate_admin(gateway.db, raw_key)
    except UnknownKey:
        gateway.authenticate(raw_key)  # not a user key either: its AuthenticationError becomes the 401
    raise APIError(403, "This endpoint requires an admin key.", code="permission_denied")


AdminDep = Annotated[AdminPrincipal, Depends(get_admin)]
