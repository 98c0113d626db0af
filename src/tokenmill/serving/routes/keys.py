"""/v1/keys: list, create (the secret is in that one response) and revoke the API keys of the caller's
organization. A new key can never do more than the key that created it (see `create_key_for_caller`);
a key of another organization is "not found"."""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi import APIRouter
from fastapi.responses import Response

from tokenmill.platform.keys import KeyInfo, create_key_for_caller, last_used, list_keys, revoke_key
from tokenmill.serving.account_protocol import ApiKeyList, ApiKeyObject, CreatedApiKey, CreateKeyRequest
from tokenmill.serving.deps import GatewayDep, PrincipalDep
from tokenmill.serving.openapi import ALWAYS, documented
from tokenmill.serving.routes.common import json_response

router = APIRouter()


def seconds_or_none(moment: datetime | None) -> int | None:
    return None if moment is None else int(moment.timestamp())


def key_object(info: KeyInfo, last_used_at: datetime | None = None) -> ApiKeyObject:
    return ApiKeyObject(
        id=info.id,
        name=info.name,
        prefix=info.prefix,
        user_id=info.user_id,
        allowed_models=list(info.allowed_models) if info.allowed_models is not None else None,
        spend_limit_micros=info.spend_limit_micros,
        created_at=int(info.created_at.timestamp()),
        expires_at=seconds_or_none(info.expires_at),
        revoked_at=seconds_or_none(info.revoked_at),
        last_used_at=seconds_or_none(last_used_at),
        requests_per_minute=info.requests_per_minute,
        tokens_per_minute=info.tokens_per_minute,
        max_concurrent_requests=info.max_concurrent_requests,
    )


@router.get("/v1/keys", response_model=None, responses=documented(ApiKeyList, *ALWAYS))
def get_keys(principal: PrincipalDep, gateway: GatewayDep) -> Response:
    """The organization's keys, without the console's sign-in sessions, each with when it was last used."""
    infos = list_keys(gateway.db, principal.org_id)
    used = last_used(gateway.db, [info.id for info in infos])
    return json_response(ApiKeyList(data=[key_object(info, used.get(info.id)) for info in infos]))


@router.post("/v1/keys", response_model=None, responses=documented(CreatedApiKey, *ALWAYS, 403, 404, 413))
def create_api_key(body: CreateKeyRequest, principal: PrincipalDep, gateway: GatewayDep) -> Response:
    expires_at = None if body.expires_at is None else datetime.fromtimestamp(body.expires_at, UTC)
    created = create_key_for_caller(
        gateway.db,
        principal,
        name=body.name,
        allowed_models=body.allowed_models,
        spend_limit_micros=body.spend_limit_micros,
        expires_at=expires_at,
    )
    return json_response(CreatedApiKey(**key_object(created.info).model_dump(), key=created.key))


@router.delete("/v1/keys/{key_id}", response_model=None, responses=documented(ApiKeyObject, *ALWAYS, 404))
def revoke_api_key(key_id: str, principal: PrincipalDep, gateway: GatewayDep) -> Response:
    """Takes effect on the next request made with that key. Revoking twice is harmless."""
    return json_response(key_object(revoke_key(gateway.db, key_id, org_id=principal.org_id)))
