"""The platform's tables as typed SQLAlchemy models. The schema itself is created only by the Alembic
migrations in `migrations/versions/`; a change here needs a new migration."""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, CheckConstraint, Date, ForeignKey, Index, Integer, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from tokenmill.platform.column_types import BigId, TextList, UTCDateTime, one_of
from tokenmill.platform.column_types import new_id as new_id  # where every module has imported it from

LEDGER_KINDS = ("topup", "charge", "refund", "adjustment", "earning")
LISTING_TASKS = ("chat", "embedding")
LISTING_STATUSES = ("draft", "published", "retired")
LISTING_VISIBILITIES = ("public", "private", "shared")
RESERVATION_STATES = ("open", "settled", "released")
USAGE_STATUSES = ("ok", "client_disconnected", "error")
FILE_PURPOSES = (
    "fine-tune",
    "batch",
    "assistants",
    "vision",
    "user_data",
    "evals",
    "fine-tune-results",
    "batch_output",
)
"""OpenAI's purposes: the first six are uploaded by users, the last two written by the platform's jobs."""
API_KEY_KINDS = ("api", "session")
"""`api`: a key a person or program holds; `session`: the key behind a console sign-in (`people.sign_in`)."""
TIER_LIMIT_COLUMNS = (
    "requests_per_minute",
    "tokens_per_minute",
    "max_concurrent_requests",
    "free_requests_per_minute",
    "free_tokens_per_minute",
    "free_max_concurrent_requests",
)


class Base(DeclarativeBase):
    type_annotation_map: dict[Any, Any] = {datetime: UTCDateTime(), int: BigInteger()}


class Organization(Base):
    __tablename__ = "organizations"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    tier: Mapped[str] = mapped_column(String(32))
    """The name of a row of `rate_limit_tiers`. Not a foreign key: adding one to this existing table on
    SQLite means rebuilding it, which the tables referencing it forbid inside the migration's transaction;
    `tiers.require_tier` checks the name on every write instead, and tiers are never deleted."""
    created_at: Mapped[datetime]


class RateLimitTier(Base):
    """The per-key rate limits of the organizations on a tier, on paid and on free (price 0/0) models; NULL
    is unlimited in that dimension. Changed by `tokenmill admin set-tier-limits`; read on every request."""

    __tablename__ = "rate_limit_tiers"
    __table_args__ = tuple(
        CheckConstraint(f"{column} >= 1", name=f"ck_rate_limit_tiers_{column}")
        for column in TIER_LIMIT_COLUMNS
    )

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    requests_per_minute: Mapped[int | None]
    tokens_per_minute: Mapped[int | None]
    max_concurrent_requests: Mapped[int | None]
    free_requests_per_minute: Mapped[int | None]
    free_tokens_per_minute: Mapped[int | None]
    free_max_concurrent_requests: Mapped[int | None]
    updated_at: Mapped[datetime]


class User(Base):
    __tablename__ = "users"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"), index=True)
    email: Mapped[str] = mapped_column(String(320), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime]
    password_hash: Mapped[str | None] = mapped_column(String(200))
    """argon2 (`people.hash_password`); None: the user signs in with keys only (made by an operator)."""


class ApiKey(Base):
    """A user's key. Only the sha256 of the secret is stored; `prefix` is what lists show."""

    __tablename__ = "api_keys"
    __table_args__ = (CheckConstraint(one_of("kind", API_KEY_KINDS), name="ck_api_keys_kind"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"), index=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    allowed_models: Mapped[list[str] | None] = mapped_column(TextList)
    """None: every model the caller can see; a list: only these."""
    spend_limit_micros: Mapped[int | None]
    requests_per_minute: Mapped[int | None]
    """Per-key rate-limit overrides; None keeps the tier default."""
    tokens_per_minute: Mapped[int | None]
    max_concurrent_requests: Mapped[int | None]
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]
    kind: Mapped[str] = mapped_column(String(16), server_default="api")
    """A session key is an ordinary key to everything that authenticates or bills; only the key lists and
    revocation by id (`keys.py`) leave it out, as the console's sign-in owns it."""


class Invite(Base):
    """A code that lets people sign up while sign-up is by invitation: `uses` counts the sign-ups so far."""

    __tablename__ = "invites"
    __table_args__ = (
        CheckConstraint("max_uses >= 1", name="ck_invites_max_uses"),
        CheckConstraint("uses >= 0 AND uses <= max_uses", name="ck_invites_uses"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    code: Mapped[str] = mapped_column(String(64), unique=True)
    note: Mapped[str] = mapped_column(String(200))
    max_uses: Mapped[int]
    uses: Mapped[int] = mapped_column(server_default="0")
    expires_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]
    created_at: Mapped[datetime]
    created_by: Mapped[str] = mapped_column(String(200))
    """The audit log's actor who made it."""


class LoginFailure(Base):
    """Consecutive failed sign-ins per email (known or not), so guessing passwords slows down per account."""

    __tablename__ = "login_failures"

    email: Mapped[str] = mapped_column(String(320), primary_key=True)
    failures: Mapped[int]
    last_failure_at: Mapped[datetime]


class AdminKey(Base):
    """Operator keys, kept apart from user keys so no user key can ever be promoted to admin."""

    __tablename__ = "admin_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime]
    revoked_at: Mapped[datetime | None]


class ModelPrice(Base):
    __tablename__ = "model_prices"
    __table_args__ = (
        CheckConstraint("input_micros_per_mtok >= 0", name="ck_model_prices_input_nonneg"),
        CheckConstraint("output_micros_per_mtok >= 0", name="ck_model_prices_output_nonneg"),
    )

    model: Mapped[str] = mapped_column(String(200), primary_key=True)
    input_micros_per_mtok: Mapped[int]
    output_micros_per_mtok: Mapped[int]
    updated_at: Mapped[datetime]


class LedgerEntry(Base):
    """Append-only: rows are inserted, never updated or deleted. Balance = SUM(amount_micros)."""

    __tablename__ = "ledger_entries"
    __table_args__ = (
        CheckConstraint(one_of("kind", LEDGER_KINDS), name="ck_ledger_kind"),
        CheckConstraint(
            "(kind = 'topup' AND amount_micros > 0) OR (kind = 'refund' AND amount_micros > 0)"
            " OR (kind = 'charge' AND amount_micros < 0) OR (kind = 'adjustment' AND amount_micros <> 0)"
            " OR (kind = 'earning' AND amount_micros > 0)",
            name="ck_ledger_sign",
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    amount_micros: Mapped[int]
    idempotency_key: Mapped[str | None] = mapped_column(String(200), unique=True)
    reservation_id: Mapped[str | None] = mapped_column(ForeignKey("reservations.id"), unique=True)
    """Set on charges only; unique, so one reservation can never be charged twice."""
    note: Mapped[str] = mapped_column(String(500))
    created_at: Mapped[datetime]


class Reservation(Base):
    """The worst-case cost held at admission. State machine: open -> settled | released."""

    __tablename__ = "reservations"
    __table_args__ = (
        CheckConstraint(one_of("state", RESERVATION_STATES), name="ck_reservation_state"),
        CheckConstraint("reserved_micros >= 0", name="ck_reservation_nonneg"),
        Index("ix_reservations_org_state", "org_id", "state"),
        Index("ix_reservations_key_state", "key_id", "state"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"))
    key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"))
    model: Mapped[str] = mapped_column(String(200))
    prompt_tokens: Mapped[int]
    max_tokens: Mapped[int]
    input_micros_per_mtok: Mapped[int]
    """Prices quoted at admission: settle charges these even if the admin changes the price meanwhile."""
    output_micros_per_mtok: Mapped[int]
    reserved_micros: Mapped[int]
    state: Mapped[str] = mapped_column(String(16))
    owner: Mapped[str] = mapped_column(String(200))
    """The gateway instance that opened it; crash recovery can be limited to one instance's rows."""
    provider_org_id: Mapped[str | None] = mapped_column(String(32))
    """The listing's provider as of admission (None: the platform's own model), credited at settle."""
    platform_fee_bps: Mapped[int] = mapped_column(server_default="0")
    """The platform's share of the sale in basis points, quoted at admission like the prices."""
    created_at: Mapped[datetime]
    closed_at: Mapped[datetime | None]


class UsageRecord(Base):
    """Exactly one per settled reservation (unique reservation_id)."""

    __tablename__ = "usage_records"
    __table_args__ = (
        CheckConstraint(one_of("status", USAGE_STATUSES), name="ck_usage_status"),
        CheckConstraint("cost_micros >= 0", name="ck_usage_cost_nonneg"),
        Index("ix_usage_org_day", "org_id", "day"),
        Index("ix_usage_key", "key_id"),
        Index("ix_usage_provider_day", "provider_org_id", "day"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    reservation_id: Mapped[str] = mapped_column(ForeignKey("reservations.id"), unique=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"))
    key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"))
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id"))
    model: Mapped[str] = mapped_column(String(200))
    prompt_tokens: Mapped[int]
    completion_tokens: Mapped[int]
    cost_micros: Mapped[int]
    latency_ms: Mapped[int]
    status: Mapped[str] = mapped_column(String(24))
    provider_org_id: Mapped[str | None] = mapped_column(String(32))
    provider_micros: Mapped[int] = mapped_column(server_default="0")
    """The provider's credit for this sale; cost_micros = provider_micros + platform_fee_micros, always."""
    platform_fee_micros: Mapped[int] = mapped_column(server_default="0")
    day: Mapped[date] = mapped_column(Date)
    """UTC day of `created_at`, stored so per-day reports group identically on both backends."""
    created_at: Mapped[datetime]


class Listing(Base):
    """A model in the model square: who provides it, who may call it, on what terms. Its prices are the
    `model_prices` row of the same model (billing's single source of prices)."""

    __tablename__ = "listings"
    __table_args__ = (
        CheckConstraint(one_of("task", LISTING_TASKS), name="ck_listing_task"),
        CheckConstraint(one_of("status", LISTING_STATUSES), name="ck_listing_status"),
        CheckConstraint(one_of("visibility", LISTING_VISIBILITIES), name="ck_listing_visibility"),
        CheckConstraint(
            "platform_fee_bps IS NULL OR (platform_fee_bps >= 0 AND platform_fee_bps <= 10000)",
            name="ck_listing_fee",
        ),
    )

    model: Mapped[str] = mapped_column(String(200), primary_key=True)
    provider_org_id: Mapped[str | None] = mapped_column(ForeignKey("organizations.id"), index=True)
    """None: the platform operator's own model (no revenue share)."""
    display_name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str] = mapped_column(String(4000))
    task: Mapped[str] = mapped_column(String(16))
    tags: Mapped[list[str]] = mapped_column(TextList)
    license: Mapped[str] = mapped_column(String(100))
    context_length: Mapped[int | None]
    status: Mapped[str] = mapped_column(String(16))
    visibility: Mapped[str] = mapped_column(String(16))
    shared_with: Mapped[list[str]] = mapped_column(TextList)
    """Organization ids that may call a `shared` listing besides its provider."""
    platform_fee_bps: Mapped[int | None]
    """None: the server's default fee."""
    config_digest: Mapped[str | None] = mapped_column(String(64))
    """Digest of the models.yaml entry last applied: an unchanged file does not undo a provider's edits."""
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]


class AuditEntry(Base):
    """One operator action: who, what, on what, when, and the target before and after. Append-only."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = mapped_column(index=True)
    actor: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(300))
    before: Mapped[Any | None] = mapped_column(JSON)
    after: Mapped[Any | None] = mapped_column(JSON)


class AccessRevision(Base):
    """One row whose `value` the database's own triggers (migration 0004) bump in every transaction that
    changes keys, organizations, tiers, listings or prices. No code writes it; `read_cache` reads it."""

    __tablename__ = "access_revision"
    __table_args__ = (CheckConstraint("id = 1", name="ck_access_revision_one_row"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    value: Mapped[int]


class StoredFile(Base):
    """One file of an organization (the Files API's File object): what it is, here; its bytes, in the
    `FileStore` under `storage_key`. Deleted rows are gone: a file deleted is deleted, not hidden."""

    __tablename__ = "files"
    __table_args__ = (
        CheckConstraint(one_of("purpose", FILE_PURPOSES), name="ck_files_purpose"),
        CheckConstraint("bytes >= 0", name="ck_files_bytes_nonneg"),
        Index("ix_files_org_id", "org_id", "id"),
        Index("ix_files_expires_at", "expires_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"))
    filename: Mapped[str] = mapped_column(String(512))
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int]
    sha256: Mapped[str] = mapped_column(String(64))
    storage_key: Mapped[str] = mapped_column(String(300))
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime | None]
    """None: kept until deleted (or until the organization's retention, `data_controls`, reaches it)."""


class DataControl(Base):
    """An organization's data settings; no row means the defaults (files kept until deleted)."""

    __tablename__ = "data_controls"
    __table_args__ = (
        CheckConstraint(
            "file_retention_days IS NULL OR file_retention_days >= 1", name="ck_data_controls_retention"
        ),
    )

    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"), primary_key=True)
    file_retention_days: Mapped[int | None]
    """Files and job artifacts older than this many days are deleted by the sweeper; None: kept."""
    updated_at: Mapped[datetime]


FINE_TUNING_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
FINE_TUNING_EVENT_TYPES = ("message", "metrics")


class FineTuningJob(Base):
    """One fine-tuning job: a queue entry a trainer worker claims (`status` queued -> running), keeps alive
    with `heartbeat_at`, and closes; its training is billed through `reservation_id`."""

    __tablename__ = "fine_tuning_jobs"
    __table_args__ = (
        CheckConstraint(one_of("status", FINE_TUNING_STATUSES), name="ck_fine_tuning_job_status"),
        Index("ix_fine_tuning_jobs_org_created", "org_id", "created_at"),
        Index("ix_fine_tuning_jobs_status_created", "status", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"))
    key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"))
    model: Mapped[str] = mapped_column(String(200))
    """The base model's id, as the caller named it."""
    base_source: Mapped[str] = mapped_column(String(1000))
    """What the worker loads: the base model's directory, .gguf file or built-in name."""
    max_tokens_per_example: Mapped[int]
    training_file: Mapped[str] = mapped_column(String(64))
    validation_file: Mapped[str | None] = mapped_column(String(64))
    suffix: Mapped[str | None] = mapped_column(String(64))
    hyperparameters: Mapped[Any] = mapped_column(JSON)
    """Resolved at creation (no "auto" left): what the worker trains with and the API reports."""
    seed: Mapped[int]
    user_metadata: Mapped[Any | None] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16))
    error: Mapped[Any | None] = mapped_column(JSON)
    """OpenAI's {code, message, param} once failed."""
    fine_tuned_model: Mapped[str | None] = mapped_column(String(200))
    estimated_tokens: Mapped[int]
    """Tokens of the training file times epochs: what the reservation holds the price of."""
    trained_tokens: Mapped[int | None]
    reservation_id: Mapped[str] = mapped_column(ForeignKey("reservations.id"), unique=True)
    cancel_requested_at: Mapped[datetime | None]
    worker: Mapped[str | None] = mapped_column(String(200))
    heartbeat_at: Mapped[datetime | None]
    attempts: Mapped[int]
    """How many times a worker has claimed it; a job whose worker vanished is resumed once, then failed."""
    created_at: Mapped[datetime]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]


class FineTuningEvent(Base):
    __tablename__ = "fine_tuning_events"
    __table_args__ = (
        CheckConstraint(one_of("type", FINE_TUNING_EVENT_TYPES), name="ck_fine_tuning_event_type"),
        Index("ix_fine_tuning_events_job", "job_id", "id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("fine_tuning_jobs.id"))
    level: Mapped[str] = mapped_column(String(8))
    type: Mapped[str] = mapped_column(String(16))
    message: Mapped[str] = mapped_column(String(2000))
    data: Mapped[Any | None] = mapped_column(JSON)
    created_at: Mapped[datetime]


class FineTuningCheckpoint(Base):
    """A saved adapter at the end of an epoch: what `/checkpoints` lists and a resumed job continues from."""

    __tablename__ = "fine_tuning_checkpoints"
    __table_args__ = (Index("ix_fine_tuning_checkpoints_job", "job_id", "step"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("fine_tuning_jobs.id"))
    step: Mapped[int]
    metrics: Mapped[Any] = mapped_column(JSON)
    path: Mapped[str] = mapped_column(String(1000))
    created_at: Mapped[datetime]


class AdapterModel(Base):
    """A fine-tuned model: a LoRA adapter served on its base model's engine. Its listing (same model id)
    says who may call it and at what price."""

    __tablename__ = "adapter_models"

    model: Mapped[str] = mapped_column(String(200), primary_key=True)
    base_model: Mapped[str] = mapped_column(String(200))
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"), index=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("fine_tuning_jobs.id"), unique=True)
    path: Mapped[str] = mapped_column(String(1000))
    created_at: Mapped[datetime]


BATCH_STATUSES = (
    "validating",
    "failed",
    "in_progress",
    "finalizing",
    "completed",
    "expired",
    "cancelling",
    "cancelled",
)
BATCH_LINE_STATUSES = ("pending", "succeeded", "failed")


class Batch(Base):
    """One Batch API job: its input lines (`batch_lines`) are answered at batch priority by the gateway
    that created it (`owner`), and its results written to output and error files when it closes."""

    __tablename__ = "batches"
    __table_args__ = (
        CheckConstraint(one_of("status", BATCH_STATUSES), name="ck_batch_status"),
        Index("ix_batches_org_created", "org_id", "created_at"),
        Index("ix_batches_owner_status", "owner", "status"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"))
    key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"))
    """The key that created it: every line is billed to it, under its grants and spend limit."""
    endpoint: Mapped[str] = mapped_column(String(64))
    input_file_id: Mapped[str] = mapped_column(String(64))
    completion_window: Mapped[str] = mapped_column(String(16))
    discount_bps: Mapped[int]
    """The share of each model's prices taken off its lines, quoted when the batch was created."""
    status: Mapped[str] = mapped_column(String(16))
    owner: Mapped[str] = mapped_column(String(200))
    """The gateway that dispatches its lines (and resumes them after a restart)."""
    errors: Mapped[Any | None] = mapped_column(JSON)
    """Why the input file was refused (OpenAI's `errors.data`: code, message, line), when it was."""
    user_metadata: Mapped[Any | None] = mapped_column(JSON)
    output_file_id: Mapped[str | None] = mapped_column(String(40))
    error_file_id: Mapped[str | None] = mapped_column(String(40))
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime]
    in_progress_at: Mapped[datetime | None]
    finalizing_at: Mapped[datetime | None]
    completed_at: Mapped[datetime | None]
    failed_at: Mapped[datetime | None]
    expired_at: Mapped[datetime | None]
    cancelling_at: Mapped[datetime | None]
    cancelled_at: Mapped[datetime | None]


class BatchLine(Base):
    """One request of a batch. `pending` until answered; the answer (the response body, or the error) is
    written in the same transaction that charges it, so a line is never answered or charged twice."""

    __tablename__ = "batch_lines"
    __table_args__ = (
        CheckConstraint(one_of("status", BATCH_LINE_STATUSES), name="ck_batch_line_status"),
        Index("ix_batch_lines_batch_status", "batch_id", "status", "line"),
    )

    batch_id: Mapped[str] = mapped_column(ForeignKey("batches.id"), primary_key=True)
    line: Mapped[int] = mapped_column(Integer, primary_key=True)
    """1-based line number in the input file."""
    custom_id: Mapped[str | None] = mapped_column(String(512))
    model: Mapped[str | None] = mapped_column(String(200))
    body: Mapped[Any | None] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16))
    status_code: Mapped[int | None]
    """The HTTP status the request got (200, or the error's); None for an error outside any request
    (expired before it ran)."""
    request_id: Mapped[str | None] = mapped_column(String(64))
    result: Mapped[Any | None] = mapped_column(JSON)
    """The response body: the completion, or OpenAI's {"error": {...}}."""
    finished_at: Mapped[datetime | None]
