"""GET /v1/usage/requests (each request as billed) and GET /v1/ledger (every entry of the balance): an
organization's history line by line, newest first, paged by id so new lines never shift a page. Only the
caller's own organization is ever read; plain `def` routes, run in FastAPI's thread pool."""

from __future__ import annotations

from datetime import date
from typing import Annotated, Literal

from fastapi import APIRouter, Query
from fastapi.responses import Response

from tokenmill.platform.money import format_micros
from tokenmill.platform.statements import MAX_ID, MAX_MODEL_CHARS, MAX_PAGE, ledger_page, recent_requests
from tokenmill.platform.tables import LEDGER_KINDS
from tokenmill.serving.account_protocol import LedgerEntryObject, LedgerList, RequestList, RequestRecord
from tokenmill.serving.deps import GatewayDep, PrincipalDep
from tokenmill.serving.openapi import ALWAYS, documented
from tokenmill.serving.routes.account import date_range
from tokenmill.serving.routes.common import json_response

router = APIRouter()


@router.get("/v1/usage/requests", response_model=None, responses=documented(RequestList, *ALWAYS))
def get_usage_requests(
    principal: PrincipalDep,
    gateway: GatewayDep,
    start_date: date | None = None,
    end_date: date | None = None,
    model: Annotated[str | None, Query(min_length=1, max_length=MAX_MODEL_CHARS)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
    after: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
) -> Response:
    """The organization's requests, newest first, each as billed (one usage record per request), over the
    same UTC days as GET /v1/usage. For the next page pass `last_id` as `after`."""
    start, end = date_range(gateway, start_date, end_date)
    page = recent_requests(gateway.db, principal.org_id, start, end, model=model, limit=limit, after=after)
    records = [
        RequestRecord(
            id=line.id,
            created_at=int(line.created_at.timestamp()),
            model=line.model,
            key_id=line.key_id,
            key_prefix=line.key_prefix,
            key_name=line.key_name,
            prompt_tokens=line.prompt_tokens,
            completion_tokens=line.completion_tokens,
            total_tokens=line.prompt_tokens + line.completion_tokens,
            cost_micros=line.cost_micros,
            cost=format_micros(line.cost_micros),
            latency_ms=line.latency_ms,
            status=line.status,
        )
        for line in page.lines
    ]
    return json_response(
        RequestList(
            start_date=start.isoformat(),
            end_date=end.isoformat(),
            data=records,
            has_more=page.has_more,
            last_id=records[-1].id if records else None,
        )
    )


@router.get("/v1/ledger", response_model=None, responses=documented(LedgerList, *ALWAYS))
def get_ledger(
    principal: PrincipalDep,
    gateway: GatewayDep,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
    after: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
    kind: Literal[LEDGER_KINDS] | None = None,
) -> Response:
    """The organization's ledger, newest first: top-ups, one charge per billed request, refunds,
    adjustments and, for a provider, earnings; and the balance they add up to. For the next page pass
    `last_id` as `after`."""
    page = ledger_page(gateway.db, principal.org_id, limit=limit, after=after, kind=kind)
    entries = [
        LedgerEntryObject(
            id=line.id,
            created_at=int(line.created_at.timestamp()),
            kind=line.kind,
            amount_micros=line.amount_micros,
            amount=format_micros(line.amount_micros),
            note=line.note,
            request_id=line.request_id,
            model=line.model,
        )
        for line in page.lines
    ]
    return json_response(
        LedgerList(
            data=entries,
            has_more=page.has_more,
            last_id=entries[-1].id if entries else None,
            balance_micros=page.balance_micros,
            balance=format_micros(page.balance_micros),
        )
    )
