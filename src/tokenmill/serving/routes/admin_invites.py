"""/v1/admin/invites: the operator's invite codes over HTTP, as `tokenmill admin create-invite` makes them on
the command line. Changes go through `platform.admin_ops`, so each writes its audit-log row."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from tokenmill.platform import admin_ops, invites
from tokenmill.platform.invites import InviteInfo
from tokenmill.serving.auth_protocol import CreateInviteRequest, InviteList, InviteObject
from tokenmill.serving.deps import AdminDep, GatewayDep
from tokenmill.serving.openapi import documented
from tokenmill.serving.routes.admin import READ, WRITE, actor
from tokenmill.serving.routes.common import json_response
from tokenmill.serving.routes.keys import seconds_or_none

router = APIRouter(prefix="/v1/admin")


def _invite(info: InviteInfo) -> InviteObject:
    return InviteObject(
        id=info.id,
        code=info.code,
        note=info.note,
        max_uses=info.max_uses,
        uses=info.uses,
        expires_at=seconds_or_none(info.expires_at),
        revoked_at=seconds_or_none(info.revoked_at),
        created_at=int(info.created_at.timestamp()),
    )


@router.get("/invites", response_model=None, responses=documented(InviteList, *READ))
def list_invites(gateway: GatewayDep) -> Response:
    """Newest first, with how many sign-ups each has admitted."""
    return json_response(InviteList(data=[_invite(i) for i in invites.list_invites(gateway.db)]))


@router.post(
    "/invites",
    status_code=201,
    response_model=None,
    responses=documented(InviteObject, *WRITE, success=201),
)
def create_invite(body: CreateInviteRequest, admin: AdminDep, gateway: GatewayDep) -> Response:
    """A code for `max_uses` sign-ups, valid for `expires_in_days` days or until revoked."""
    invite = admin_ops.create_invite(
        gateway.db,
        actor(admin),
        note=body.note,
        max_uses=body.max_uses,
        expires_in_days=body.expires_in_days,
    )
    return json_response(_invite(invite), status_code=201)


@router.post(
    "/invites/{invite_id}/revoke", response_model=None, responses=documented(InviteObject, *READ, 404)
)
def revoke_invite(invite_id: str, admin: AdminDep, gateway: GatewayDep) -> Response:
    """No sign-up with it from now on; accounts made with it stay. Revoking twice is harmless."""
    return json_response(_invite(admin_ops.revoke_invite(gateway.db, actor(admin), invite_id)))
