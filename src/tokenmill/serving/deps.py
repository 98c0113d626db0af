"""Typed dependency aliases: routes declare what they need (`state: StateDep`) instead of reaching into
`request.app`."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from tokenmill.serving.state import ServingState


def get_state(request: Request) -> ServingState:
    return request.app.state.tokenmill


def get_request_id(request: Request) -> str:
    return request.state.request_id


StateDep = Annotated[ServingState, Depends(get_state)]
RequestIdDep = Annotated[str, Depends(get_request_id)]
