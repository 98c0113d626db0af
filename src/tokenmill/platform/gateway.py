"""What one gateway process (a `tokenmill serve`) holds of the platform: the database, the rate limiter (and
the heartbeat keeping its leases) and admission control, opened from `PlatformSettings`, and the startup
sequence that makes a restart safe (migrate, release what a crash left open, bootstrap the admin key, price
and list the served models)."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.exc import OperationalError

from tokenmill.platform.admin_key import ensure_admin_key
from tokenmill.platform.admission import AdmissionControl
from tokenmill.platform.auth import authenticate, authorize_model, parse_key, reject_expired
from tokenmill.platform.billing import DEFAULT_OWNER, recover_open_reservations
from tokenmill.platform.db import Database, open_database, sqlite_url
from tokenmill.platform.errors import InvalidArgument
from tokenmill.platform.keys import hash_key
from tokenmill.platform.listings import DEFAULT_PLATFORM_FEE_BPS, ListingInfo, ensure_listing
from tokenmill.platform.migrate import upgrade
from tokenmill.platform.pricing import BPS_PER_UNIT, register_free_models
from tokenmill.platform.principal import KeyPrincipal
from tokenmill.platform.ratelimit import LeaseHeartbeat, RateLimiter
from tokenmill.platform.ratelimit_memory import InMemoryRateLimiter
from tokenmill.platform.read_cache import ReadCache

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PlatformSettings:
    data_dir: Path
    """Holds the embedded SQLite database (unless `database_url` names another) and the admin key file."""
    database_url: str | None = None
    """None: `sqlite:///<data_dir>/tokenmill.db`."""
    redis_url: str | None = None
    """None: rate limits are counted in this process; a URL: in Redis, shared by every gateway using it."""
    gateway_id: str = DEFAULT_OWNER
    """Names this gateway's reservations and rate-limit leases; at startup only those with this name are
    recovered, so it must be stable across restarts and distinct between gateways that share a database
    or a Redis."""
    platform_fee_bps: int = DEFAULT_PLATFORM_FEE_BPS
    """The platform's share of each sale of a provider's model, in basis points, unless its listing sets
    its own. Quoted on each reservation at admission."""

    def __post_init__(self) -> None:
        if not self.gateway_id.strip() or len(self.gateway_id) > 200:
            raise InvalidArgument("gateway_id: must be a non-empty name of at most 200 characters")
        fee = self.platform_fee_bps
        if type(fee) is not int or not 0 <= fee <= BPS_PER_UNIT:
            raise InvalidArgument(f"platform_fee_bps: must be an integer from 0 to {BPS_PER_UNIT}")

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or sqlite_url(self.data_dir)


def open_migrated_database(settings: PlatformSettings) -> Database:
    """The database at its latest schema: both `serve` and the admin CLI start here, in either order. An
    unreachable server is an `InvalidArgument` naming the setting, not a driver traceback."""
    db = open_database(settings.resolved_database_url)
    try:
        upgrade(db)
    except OperationalError as exc:
        db.close()
        raise InvalidArgument(
            f"database_url: cannot open {settings.resolved_database_url!r}: {exc.orig}"
        ) from None
    except BaseException:
        db.close()
        raise
    return db


@dataclass(frozen=True, slots=True)
class StartupReport:
    admin_key: str | None
    """The new admin key on the very first start (to be shown once), else None."""
    released_reservation_ids: tuple[str, ...]
    """Reservations an earlier crash of this gateway left open, released now (nothing charged)."""
    num_released_leases: int = 0
    """Concurrency slots an earlier crash of this gateway left held in Redis, freed now."""


def _limiter(redis_url: str | None, owner: str) -> RateLimiter:
    if not redis_url:
        return InMemoryRateLimiter(owner=owner)
    import redis  # only when asked for

    from tokenmill.platform.ratelimit_redis import RedisRateLimiter

    client = redis.Redis.from_url(redis_url, socket_connect_timeout=5)
    try:
        client.ping()
    except redis.RedisError as exc:
        client.close()
        raise InvalidArgument(f"redis_url: cannot reach {redis_url!r}: {exc}") from None
    return RedisRateLimiter(client, owner=owner)


class Gateway:
    """The platform side of a serving process. Every method is synchronous (database and Redis I/O): the
    HTTP layer calls them from a worker thread, never on the event loop; only the `remembered_*` lookups,
    which read nothing but `ReadCache.revision`, are for the event loop."""

    def __init__(self, settings: PlatformSettings, db: Database, limiter: RateLimiter) -> None:
        self.settings = settings
        self.db = db
        self.limiter = limiter
        self.admission = AdmissionControl(
            db, limiter, owner=settings.gateway_id, default_fee_bps=settings.platform_fee_bps
        )
        self.heartbeat = LeaseHeartbeat(limiter)
        self.reads = ReadCache(db)

    @classmethod
    def open(cls, settings: PlatformSettings) -> Gateway:
        """Connects to both stores now, so a wrong URL stops the server at startup with a message naming
        the setting, not at its first request."""
        db = open_migrated_database(settings)
        try:
            return cls(settings, db, _limiter(settings.redis_url, settings.gateway_id))
        except BaseException:
            db.close()
            raise

    def start(self) -> StartupReport:
        """Run before the gateway accepts requests. Releasing this gateway's open reservations and held
        rate-limit leases is safe only then: no request of this process can hold one yet. From here until
        `close()` the heartbeat keeps the leases of this process's requests."""
        released = recover_open_reservations(self.db, owner=self.settings.gateway_id)
        num_released_leases = self.limiter.release_previous_leases()
        if num_released_leases:
            logger.warning(
                "freed %d concurrency slot(s) an earlier run of gateway %s left held",
                num_released_leases,
                self.settings.gateway_id,
            )
        self.heartbeat.start()
        admin_key = ensure_admin_key(self.db, self.settings.data_dir)
        return StartupReport(
            admin_key=admin_key,
            released_reservation_ids=tuple(released),
            num_released_leases=num_released_leases,
        )

    def register_models(self, models: Iterable[str], *, task: str = "chat") -> list[str]:
        """The served models declared without a listing (`--model`): each one without a price becomes free,
        and each one without a listing is listed as the platform's own, public and published. A price or
        listing that exists is never touched. Returns the models registered as free by this call."""
        models = list(models)
        registered = register_free_models(self.db, models)
        if registered:
            logger.info("no price set for %s: registered as free models", ", ".join(registered))
        listed = [model for model in models if ensure_listing(self.db, model, task=task)]
        if listed:
            logger.info("listed %s publicly as the platform's own models", ", ".join(listed))
        return registered

    def authenticate(self, raw_key: str | None) -> KeyPrincipal:
        """Who `raw_key` is; the AuthenticationError family when it is no one (`auth.authenticate`)."""
        remembered = self.remembered_principal(raw_key)
        if remembered is not None:
            return remembered
        revision = self.reads.revision()
        principal = authenticate(self.db, raw_key)
        self.reads.put(("key", hash_key(parse_key(raw_key))), principal, revision)
        return principal

    def remembered_principal(self, raw_key: str | None) -> KeyPrincipal | None:
        """`authenticate`'s answer if it is remembered (see `ReadCache`), else None."""
        principal = self.reads.get(("key", hash_key(parse_key(raw_key))))
        assert principal is None or isinstance(principal, KeyPrincipal)
        return None if principal is None else reject_expired(principal, self.db.now())

    def resolve(self, principal: KeyPrincipal, model: str) -> ListingInfo:
        """The listing a request is for (403, 404 or 410 when it may not call it): `admission.resolve`."""
        remembered = self.remembered_listing(principal, model)
        if remembered is not None:
            return remembered
        revision = self.reads.revision()
        listing = self.admission.resolve(principal, model)
        self.reads.put(("listing", principal.org_id, model), listing, revision)
        return listing

    def remembered_listing(self, principal: KeyPrincipal, model: str) -> ListingInfo | None:
        """`resolve`'s answer if it is remembered, else None; a model outside the key's grant still raises."""
        authorize_model(principal, model)
        listing = self.reads.get(("listing", principal.org_id, model))
        assert listing is None or isinstance(listing, ListingInfo)
        return listing

    def close(self) -> None:
        self.heartbeat.stop()
        self.reads.close()
        close = getattr(self.limiter, "close", None)
        if close is not None:
            close()
        self.db.close()
