"""GET /v1/user/info (who the key belongs to, the organization's balance) and GET /v1/usage (per model and
UTC day, as a buyer or as a provider; JSON or CSV). Only the caller's own organization is ever read. Plain
`def` routes: FastAPI runs them in its thread pool, so the database reads never block the event loop."""

from __future__ import annotations

import csv
import io
from datetime import date
from typing import Any, Literal

from fastapi import APIRouter
from fastapi.responses import Response

from tokenmill.platform.data_export import spreadsheet_cell
from tokenmill.platform.gateway import Gateway
from tokenmill.platform.money import format_micros
from tokenmill.platform.principal import KeyPrincipal
from tokenmill.platform.ratelimit import RateLimits
from tokenmill.platform.tiers import effective_limits
from tokenmill.platform.usage import provider_earnings, usage_report, user_info
from tokenmill.serving.account_protocol import (
    ApiKeyRef,
    KeyRateLimits,
    OrganizationRef,
    RateLimitValues,
    UsageEntry,
    UsageList,
    UserInfoData,
    UserInfoResponse,
)
from tokenmill.serving.deps import GatewayDep, PrincipalDep, StateDep
from tokenmill.serving.openapi import ALWAYS, documented
from tokenmill.serving.routes.common import json_response

router = APIRouter()

DEFAULT_USAGE_DAYS = 30

_UNLIMITED = RateLimitValues(requests_per_minute=None, tokens_per_minute=None, max_concurrent_requests=None)


def _values(limits: RateLimits) -> RateLimitValues:
    return RateLimitValues(
        requests_per_minute=limits.requests_per_minute,
        tokens_per_minute=limits.tokens_per_minute,
        max_concurrent_requests=limits.max_concurrent_requests,
    )


def _local_info(principal: KeyPrincipal) -> UserInfoData:
    """--no-auth: the built-in principal, with nothing billed."""
    return UserInfoData(
        id=principal.user_id,
        name="local",
        email="local@localhost",
        organization=OrganizationRef(id=principal.org_id, name="local", tier=principal.tier),
        api_key=ApiKeyRef(
            id=principal.key_id, prefix=principal.key_prefix, spend_limit_micros=None, committed_micros=0
        ),
        balance=format_micros(0),
        available_balance=format_micros(0),
        balance_micros=0,
        held_micros=0,
        available_micros=0,
        billing_enabled=False,
        rate_limits=KeyRateLimits(tier="unlimited", paid_models=_UNLIMITED, free_models=_UNLIMITED),
    )


@router.get("/v1/user/info", response_model=None, responses=documented(UserInfoResponse, *ALWAYS))
def get_user_info(principal: PrincipalDep, state: StateDep) -> Response:
    if state.gateway is None:
        return json_response(UserInfoResponse(data=_local_info(principal)))
    info = user_info(state.gateway.db, principal)
    limits = effective_limits(state.gateway.db, principal)
    data = UserInfoData(
        id=info.user_id,
        name=info.user_name,
        email=info.user_email,
        organization=OrganizationRef(id=info.org_id, name=info.org_name, tier=info.tier),
        api_key=ApiKeyRef(
            id=info.key_id,
            prefix=info.key_prefix,
            spend_limit_micros=info.key_spend_limit_micros,
            committed_micros=info.key_committed_micros,
        ),
        balance=format_micros(info.balance_micros),
        available_balance=format_micros(info.available_micros),
        balance_micros=info.balance_micros,
        held_micros=info.held_micros,
        available_micros=info.available_micros,
        billing_enabled=True,
        rate_limits=KeyRateLimits(
            tier=limits.paid.tier,
            paid_models=_values(limits.paid.limits),
            free_models=_values(limits.free.limits),
        ),
    )
    return json_response(UserInfoResponse(data=data))


def _responses_with_csv(body: type[UsageList], *statuses: int) -> dict[int | str, dict[str, Any]]:
    """The JSON body as documented, and the same report as CSV when `format=csv`."""
    responses = documented(body, *statuses)
    responses[200]["content"] = {"text/csv": {"schema": {"type": "string"}}}
    responses[200]["description"] = "The report: JSON, or CSV (one row per day and model) with format=csv."
    return responses


def date_range(gateway: Gateway, start: date | None, end: date | None) -> tuple[date, date]:
    """Both inclusive; by default the last 30 UTC days up to today (or up to `end`). Order is checked by
    the platform, which refuses start > end."""
    end = end or gateway.db.now().date()
    # Counted on ordinals: `end - 29 days` overflows for a date near year 1.
    start = start or date.fromordinal(max(1, end.toordinal() - DEFAULT_USAGE_DAYS + 1))
    return start, end


@router.get("/v1/usage", response_model=None, responses=_responses_with_csv(UsageList, *ALWAYS))
def get_usage(
    principal: PrincipalDep,
    gateway: GatewayDep,
    start_date: date | None = None,
    end_date: date | None = None,
    role: Literal["buyer", "provider"] = "buyer",
    format: Literal["json", "csv"] = "json",
) -> Response:
    """Both dates inclusive; by default the last 30 UTC days. Only the caller's organization is reported:
    what it bought (role=buyer), or what it sold as a provider and earned (role=provider). `format=csv`
    answers the same rows as a CSV download."""
    start, end = date_range(gateway, start_date, end_date)
    if role == "provider":
        report = _earnings(gateway, principal.org_id, start, end)
    else:
        report = _purchases(gateway, principal.org_id, start, end)
    if format == "csv":
        return _csv_response(report)
    return json_response(report)


def _purchases(gateway: Gateway, org_id: str, start: date, end: date) -> UsageList:
    rows = usage_report(gateway.db, org_id, start, end)
    entries = [
        UsageEntry(
            date=row.day.isoformat(),
            model=row.model,
            num_requests=row.num_requests,
            prompt_tokens=row.prompt_tokens,
            completion_tokens=row.completion_tokens,
            total_tokens=row.prompt_tokens + row.completion_tokens,
            cost_micros=row.cost_micros,
            cost=format_micros(row.cost_micros),
        )
        for row in rows
    ]
    total = sum(row.cost_micros for row in rows)
    return UsageList(
        start_date=start.isoformat(),
        end_date=end.isoformat(),
        data=entries,
        total_cost_micros=total,
        total_cost=format_micros(total),
    )


def _earnings(gateway: Gateway, org_id: str, start: date, end: date) -> UsageList:
    rows = provider_earnings(gateway.db, org_id, start, end)
    entries = [
        UsageEntry(
            date=row.day.isoformat(),
            model=row.model,
            num_requests=row.num_requests,
            prompt_tokens=row.prompt_tokens,
            completion_tokens=row.completion_tokens,
            total_tokens=row.prompt_tokens + row.completion_tokens,
            cost_micros=row.sales_micros,
            cost=format_micros(row.sales_micros),
            earnings_micros=row.earnings_micros,
            earnings=format_micros(row.earnings_micros),
            platform_fee_micros=row.platform_fee_micros,
        )
        for row in rows
    ]
    sales = sum(row.sales_micros for row in rows)
    return UsageList(
        role="provider",
        start_date=start.isoformat(),
        end_date=end.isoformat(),
        data=entries,
        total_cost_micros=sales,
        total_cost=format_micros(sales),
        total_earnings_micros=sum(row.earnings_micros for row in rows),
    )


CSV_COLUMNS = ("date", "model", "num_requests", "prompt_tokens", "completion_tokens", "total_tokens")
CSV_MONEY = {
    "buyer": ("cost", "cost_micros"),
    "provider": ("cost", "cost_micros", "earnings", "earnings_micros", "platform_fee_micros"),
}


def _csv_response(report: UsageList) -> Response:
    """One row per day and model, with no total row: summing a column gives the report's total."""
    columns = (*CSV_COLUMNS, *CSV_MONEY[report.role])
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(columns)
    for entry in report.data:
        values = entry.model_dump()
        writer.writerow([spreadsheet_cell(values[column]) for column in columns])
    name = f"tokenmill-usage-{report.role}-{report.start_date}-{report.end_date}.csv"
    return Response(
        content=out.getvalue(),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )
