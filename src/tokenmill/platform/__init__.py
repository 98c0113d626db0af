"""Accounts, keys, pricing, ledger, reservations, usage, rate limits and their tiers over SQLAlchemy.
No HTTP here: `serving/` and `cli.py` call these functions and map the typed errors of `errors.py`."""

from tokenmill.platform.accounts import (
    OrgInfo,
    UserInfo,
    create_organization,
    create_user,
    get_organization,
    get_user,
    list_organizations,
    list_users,
    set_organization_tier,
)
from tokenmill.platform.admin_key import admin_key_path, ensure_admin_key, rotate_admin_key
from tokenmill.platform.admission import Admission, AdmissionControl
from tokenmill.platform.auth import (
    AdminPrincipal,
    KeyPrincipal,
    authenticate,
    authenticate_admin,
    authorize_model,
)
from tokenmill.platform.billing import (
    Reservation,
    UsageInfo,
    UsageStatus,
    recover_open_reservations,
    release,
    reserve,
    settle,
)
from tokenmill.platform.db import Database, open_database, sqlite_url
from tokenmill.platform.keys import (
    CreatedKey,
    KeyInfo,
    create_key,
    create_key_for_caller,
    list_keys,
    revoke_key,
)
from tokenmill.platform.ledger import CreditResult, adjust, balance_micros, refund, top_up
from tokenmill.platform.migrate import upgrade
from tokenmill.platform.pricing import Price, cost_micros, get_model_price, list_model_prices, set_model_price
from tokenmill.platform.ratelimit import (
    EffectiveLimits,
    RateLimitDecision,
    RateLimiter,
    RateLimits,
    RateLimitScope,
    TierLimits,
    resolve_scope,
)
from tokenmill.platform.ratelimit_memory import InMemoryRateLimiter
from tokenmill.platform.tiers import TierInfo, effective_limits, get_tier, list_tiers, set_tier_limits
from tokenmill.platform.usage import USAGE_COLUMNS, AccountInfo, UsageRow, usage_report, user_info

__all__ = [
    "USAGE_COLUMNS",
    "AccountInfo",
    "AdminPrincipal",
    "Admission",
    "AdmissionControl",
    "CreatedKey",
    "CreditResult",
    "Database",
    "EffectiveLimits",
    "InMemoryRateLimiter",
    "KeyInfo",
    "KeyPrincipal",
    "OrgInfo",
    "Price",
    "RateLimitDecision",
    "RateLimitScope",
    "RateLimiter",
    "RateLimits",
    "Reservation",
    "TierInfo",
    "TierLimits",
    "UsageInfo",
    "UsageRow",
    "UsageStatus",
    "UserInfo",
    "adjust",
    "admin_key_path",
    "authenticate",
    "authenticate_admin",
    "authorize_model",
    "balance_micros",
    "cost_micros",
    "create_key",
    "create_key_for_caller",
    "create_organization",
    "create_user",
    "effective_limits",
    "ensure_admin_key",
    "get_model_price",
    "get_organization",
    "get_tier",
    "get_user",
    "list_keys",
    "list_model_prices",
    "list_organizations",
    "list_tiers",
    "list_users",
    "open_database",
    "recover_open_reservations",
    "refund",
    "release",
    "reserve",
    "resolve_scope",
    "revoke_key",
    "rotate_admin_key",
    "set_model_price",
    "set_organization_tier",
    "set_tier_limits",
    "settle",
    "sqlite_url",
    "top_up",
    "upgrade",
    "usage_report",
    "user_info",
]
