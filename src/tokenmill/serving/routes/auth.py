"""/v1/auth: how the web console gets a principal. Signing in with email and password makes a session key
(`platform/people.py`) and puts it in the HttpOnly `tm_session` cookie; signing in with a key puts that key
there. From then on the browser calls the same /v1 API as any script, authenticated by the cookie (see
`deps.py`, which also holds the CSRF rule). These routes carry no router-level principal: they are where one
comes from."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Request
from fastapi.responses import Response

from tokenmill.platform import people
from tokenmill.platform.auth import ADMIN_KEY_PREFIX, authenticate_admin
from tokenmill.platform.errors import AuthenticationError, UnknownKey
from tokenmill.platform.gateway import Gateway
from tokenmill.serving.auth_protocol import (
    AuthConfig,
    LoginRequest,
    PasswordChangeRequest,
    SessionDeleted,
    SessionObject,
    SessionOrganization,
    SessionUser,
    SignedOut,
    SignupRequest,
)
from tokenmill.serving.deps import (
    SESSION_COOKIE,
    GatewayDep,
    PrincipalDep,
    StateDep,
    check_csrf,
    csrf_token,
    request_key,
)
from tokenmill.serving.errors import APIError
from tokenmill.serving.openapi import ALWAYS, BEARER, KEY_SECURITY, SESSION_COOKIE_SCHEME, documented
from tokenmill.serving.routes.common import json_response

router = APIRouter(prefix="/v1/auth")

NO_KEY = {"security": []}
"""Asked before anyone is signed in."""
ANY_KEY = {"security": [{}, {BEARER: []}, {SESSION_COOKIE_SCHEME: []}]}
"""Signing out works signed in or not."""
WITH_KEY = {"security": KEY_SECURITY}


def _seconds(moment: datetime | None) -> int | None:
    return None if moment is None else int(moment.timestamp())


def _session_object(info: people.SessionInfo, raw_key: str) -> SessionObject:
    return SessionObject(
        kind="password" if info.kind == "password" else "api_key",
        user=SessionUser(id=info.user.id, email=info.user.email, name=info.user.name),
        organization=SessionOrganization(id=info.org.id, name=info.org.name, tier=info.org.tier),
        is_admin=False,
        csrf_token=csrf_token(raw_key),
        expires_at=_seconds(info.expires_at),
    )


def identify(gateway: Gateway, raw_key: str | None) -> SessionObject:
    """Who `raw_key` signs in as: the admin key, or a user's key (a sign-in's session key or any other).
    The platform's AuthenticationError (one 401) when it is no one's, or revoked, or expired."""
    raw_key = None if raw_key is None else raw_key.strip()
    if raw_key is not None and raw_key.startswith(ADMIN_KEY_PREFIX):
        try:
            authenticate_admin(gateway.db, raw_key)
        except UnknownKey:
            pass  # perhaps a user key that happens to start so: asked below
        else:
            return SessionObject(
                kind="admin_key",
                user=None,
                organization=None,
                is_admin=True,
                csrf_token=csrf_token(raw_key),
                expires_at=None,
            )
    principal = gateway.authenticate(raw_key)
    return _session_object(people.session_of_key(gateway.db, principal.key_id), raw_key or "")


def _with_cookie(response: Response, request: Request, raw_key: str, *, persistent: bool) -> Response:
    """HttpOnly: no script can read the key. SameSite=Lax: other sites' requests do not carry it, but for
    top-level navigations. A key brought at sign-in lives as long as the browser session, never longer."""
    max_age = int(people.SESSION_LIFETIME.total_seconds()) if persistent else None
    response.set_cookie(
        SESSION_COOKIE,
        raw_key,
        max_age=max_age,
        path="/",
        secure=request.url.scheme == "https",
        httponly=True,
        samesite="lax",
    )
    return response


def _signed_in(request: Request, signed: people.SignedIn, status_code: int = 200) -> Response:
    body = _session_object(signed.session, signed.key)
    return _with_cookie(json_response(body, status_code=status_code), request, signed.key, persistent=True)


@router.get("/config", response_model=None, responses=documented(AuthConfig, *ALWAYS), openapi_extra=NO_KEY)
async def auth_config(state: StateDep) -> Response:
    enabled = state.gateway is not None
    signup = state.settings.signup if enabled else "closed"
    return json_response(AuthConfig(signup=signup, auth_enabled=enabled))  # type: ignore[arg-type]


@router.post(
    "/signup",
    status_code=201,
    response_model=None,
    responses=documented(SessionObject, *ALWAYS, 403, 409, 413, success=201),
    openapi_extra=NO_KEY,
)
def sign_up(body: SignupRequest, request: Request, state: StateDep, gateway: GatewayDep) -> Response:
    """403 `signup_closed` or `invite_invalid`; 409 `email_taken` or `organization_taken`."""
    signed = people.sign_up(
        gateway.db,
        body.email,
        body.password,
        name=body.name,
        organization=body.organization,
        invite_code=body.invite_code,
        mode=state.settings.signup,
    )
    return _signed_in(request, signed, status_code=201)


@router.post(
    "/login",
    response_model=None,
    responses=documented(SessionObject, *ALWAYS, 413, 429),
    openapi_extra=NO_KEY,
)
def log_in(body: LoginRequest, request: Request, gateway: GatewayDep) -> Response:
    """401 `invalid_credentials` for a wrong email or password (the same answer for both), 429
    `too_many_login_attempts` with Retry-After after repeated failures, even with the right password."""
    if body.api_key is not None:
        if body.email is not None or body.password is not None:
            raise APIError(400, "Give either an email and a password, or an api_key, not both.", "api_key")
        session = identify(gateway, body.api_key)
        return _with_cookie(json_response(session), request, body.api_key.strip(), persistent=False)
    if body.email is None or body.password is None:
        missing = "email" if body.email is None else "password"
        raise APIError(400, f"Missing required parameter: '{missing}' (or give an api_key).", missing)
    return _signed_in(request, people.sign_in(gateway.db, body.email, body.password))


@router.get(
    "/session",
    response_model=None,
    responses=documented(SessionObject | SignedOut, *ALWAYS),
    openapi_extra=ANY_KEY,
)
def get_session(request: Request, gateway: GatewayDep) -> Response:
    """The console asks this when it opens. No cookie, or a cookie that signs no one in any more (expired,
    revoked, signed out elsewhere), is `signed_in: false` and clears the cookie; a bad bearer key is a 401
    as everywhere."""
    raw_key, from_cookie = request_key(request)
    if raw_key is None:
        return json_response(SignedOut())
    try:
        return json_response(identify(gateway, raw_key))
    except AuthenticationError:
        if not from_cookie:
            raise
    return _without_cookie(json_response(SignedOut()), request)


@router.post(
    "/logout", response_model=None, responses=documented(SessionDeleted, *ALWAYS, 403), openapi_extra=ANY_KEY
)
def log_out(request: Request, state: StateDep) -> Response:
    """Revokes a password sign-in's session key; a key brought at sign-in stays valid. The cookie is cleared
    whatever it held, so a stale one never traps a browser."""
    if state.gateway is not None:
        _end_session(request, state.gateway)
    return _without_cookie(json_response(SessionDeleted()), request)


def _without_cookie(response: Response, request: Request) -> Response:
    secure = request.url.scheme == "https"
    response.delete_cookie(SESSION_COOKIE, path="/", secure=secure, httponly=True, samesite="lax")
    return response


def _end_session(request: Request, gateway: Gateway) -> None:
    try:
        raw_key, from_cookie = request_key(request)
        if raw_key is None:
            return
        identify(gateway, raw_key)
    except AuthenticationError:
        return  # no valid session: nothing to revoke
    if from_cookie:
        check_csrf(request, raw_key)
    people.sign_out(gateway.db, raw_key.strip())


@router.post(
    "/password",
    response_model=None,
    responses=documented(SessionObject, *ALWAYS, 403, 413),
    openapi_extra=WITH_KEY,
)
def change_password(
    body: PasswordChangeRequest, request: Request, principal: PrincipalDep, gateway: GatewayDep
) -> Response:
    """Signs every other browser of the user out (their session keys are revoked); this one stays. 401
    `invalid_credentials` when `current_password` is wrong."""
    people.change_password(
        gateway.db, principal.user_id, body.current_password, body.new_password, principal.key_id
    )
    raw_key, _ = request_key(request)
    return json_response(identify(gateway, raw_key))
