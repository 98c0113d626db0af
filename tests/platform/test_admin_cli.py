"""`tokenmill admin` on a real database (SQLite and PostgreSQL): each action does what it prints, secrets are
printed once, the rate limits it shows are the ones admission enforces, and bad input is one line on stderr
with exit status 2 and nothing written."""

from __future__ import annotations

import csv
import getpass
import io
import os
from pathlib import Path

import pytest
from sqlalchemy import select

from tests.platform.helpers import FakeClock, make_account, priced_model, reserve_model, unique
from tokenmill import cli
from tokenmill.platform.admin_actions import cli_actor
from tokenmill.platform.admission import Admission, AdmissionControl
from tokenmill.platform.auth import authenticate, authenticate_admin
from tokenmill.platform.billing import UsageStatus, settle
from tokenmill.platform.db import Database
from tokenmill.platform.errors import ListingNotFound
from tokenmill.platform.ledger import balance_micros
from tokenmill.platform.listings import get_listing
from tokenmill.platform.pricing import Price, get_model_price
from tokenmill.platform.principal import KeyPrincipal
from tokenmill.platform.ratelimit import RateLimited
from tokenmill.platform.ratelimit_memory import InMemoryRateLimiter
from tokenmill.platform.tables import Reservation


class Admin:
    def __init__(self, db: Database, data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.url = db.url.render_as_string(hide_password=False)
        self.data_dir = data_dir
        self.capsys = capsys

    def run(self, *args: str) -> tuple[int, str, str]:
        status = cli.main(["admin", *args, "--data-dir", str(self.data_dir), "--database-url", self.url])
        out, err = self.capsys.readouterr()
        return status, out.strip(), err.strip()

    def __call__(self, *args: str) -> str:
        status, out, err = self.run(*args)
        assert status == 0, err
        return out

    def fails(self, *args: str) -> str:
        status, out, err = self.run(*args)
        assert status == 2 and out == "" and "Traceback" not in err, (status, out, err)
        return err


@pytest.fixture
def admin(db: Database, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Admin:
    return Admin(db, tmp_path, capsys)


def test_setup_from_nothing_to_a_working_key(admin: Admin, db: Database) -> None:
    org = unique("acme")
    org_id = admin("create-org", org, "--tier", "pro")
    user_id = admin("create-user", org, f"{org}@example.com", "--name", "Alice")
    status, key, err = admin.run("create-key", f"{org}@example.com", "--name", "laptop")
    assert status == 0 and key.startswith("sk-") and "shown only this once" in err and key not in err
    principal = authenticate(db, key)
    assert (principal.org_id, principal.user_id, principal.tier) == (org_id, user_id, "pro")
    assert (
        admin("top-up", org, "12.5", "--idempotency-key", f"{org}-1")
        == f"topped up {org} +12.500000; balance 12.500000"
    )
    again = admin("top-up", org_id, "12.5", "--idempotency-key", f"{org}-1")
    assert "nothing written" in again and balance_micros(db, org_id) == 12_500_000
    assert key not in admin("list-keys", "--org", org) and "laptop" in admin("list-keys", "--org", org)
    assert f"{org}@example.com" in admin("list-users", "--org", org)
    assert any(org in line and "12.500000" in line for line in admin("list-orgs").splitlines())


def test_key_options_become_the_keys_grants(admin: Admin, db: Database) -> None:
    account = make_account(db)
    flags = ["--model", "a", "--model", "b", "--spend-limit", "1.5", "--rpm", "5", "--tpm", "900"]
    key = admin("create-key", account.user.email, *flags, "--max-concurrent", "2", "--expires-in-days", "7")
    principal = authenticate(db, key)
    assert principal.allowed_models == frozenset({"a", "b"}) and principal.spend_limit_micros == 1_500_000
    assert (
        principal.requests_per_minute,
        principal.tokens_per_minute,
        principal.max_concurrent_requests,
    ) == (5, 900, 2)
    assert principal.expires_at is not None
    admin("revoke-key", account.key.info.id)
    with pytest.raises(ValueError):
        authenticate(db, account.key.key)


def test_prices_are_typed_in_units_per_million_tokens(admin: Admin, db: Database) -> None:
    model = unique("model")
    assert (
        admin("set-price", model, "0.15", "0.6") == f"{model}: input 0.150000, output 0.600000 per 1M tokens"
    )
    assert get_model_price(db, model) == Price(150_000, 600_000)
    admin("set-price", model, "0", "0")
    assert any(model in line and line.endswith("yes") for line in admin("list-prices").splitlines())


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (("top-up", "{org}", "abc", "--idempotency-key", "k-{org}"), "amount"),
        (("top-up", "{org}", "0.0000001", "--idempotency-key", "k-{org}"), "amount"),
        (("top-up", "{org}", "0", "--idempotency-key", "k-{org}"), "amount"),
        (("top-up", "no-such-org", "5", "--idempotency-key", "k-{org}"), "organization"),
        (("create-org", "{org}"), "name"),
        (("create-user", "no-such-org", "x@example.com"), "organization"),
        (("create-user", "{org}", "not-an-email"), "email"),
        (("create-key", "nobody@example.com"), "user"),
        (("create-key", "{email}", "--spend-limit", "-1"), "spend_limit"),
        (("revoke-key", "key_0000"), "key_id"),
        (("set-price", "m", "1", "free"), "output"),
        (("usage", "--start-date", "2025-02-01", "--end-date", "2025-01-01"), "start_date"),
        (("create-org", "new-{org}", "--tier", "no-such-tier"), "tier"),
        (("set-tier", "{org}", "no-such-tier"), "tier"),
        (("set-tier", "{org}", "Gold Plan"), "tier"),
        (("set-tier-limits", "t-{org}", "--from", "no-such-tier"), "from"),
        (("set-tier-limits", "Gold Plan", "--rpm", "5"), "tier"),
        (("show-limits", "key_0000"), "key_id"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(
    admin: Admin, db: Database, args: tuple[str, ...], field: str
) -> None:
    account = make_account(db, 1_000)
    filled = [a.format(org=account.org.name, email=account.user.email) for a in args]
    message = admin.fails(*filled)
    assert message.startswith("tokenmill admin: ") and f"{field}: " in message and "\n" not in message
    assert balance_micros(db, account.org.id) == 1_000


def test_a_reused_idempotency_key_for_another_amount_is_refused(admin: Admin, db: Database) -> None:
    account = make_account(db)
    admin("top-up", account.org.id, "1", "--idempotency-key", f"pay-{account.org.id}")
    assert "idempotency_key" in admin.fails(
        "top-up", account.org.id, "2", "--idempotency-key", f"pay-{account.org.id}"
    )
    assert balance_micros(db, account.org.id) == 1_000_000


def test_usage_report_as_table_and_exact_csv(admin: Admin, db: Database) -> None:
    account = make_account(db, 1_000_000)
    model = priced_model(db, 1_000_000, 3_000_000)
    for completion in (5, 7):
        settle(db, reserve_model(db, account.principal, model, 10, 10), 10, completion, UsageStatus.OK, 0.1)
    rows = list(csv.DictReader(io.StringIO(admin("usage", "--org", account.org.name, "--csv"))))
    assert [
        (r["model"], r["num_requests"], r["prompt_tokens"], r["completion_tokens"], r["cost_micros"])
        for r in rows
    ] == [(model, "2", "20", "12", str(20 + 3 * 12))]
    table = admin("usage", "--org", account.org.name)
    assert model in table and "total cost 0.000056" in table


def test_release_reservations_of_a_gone_gateway(admin: Admin, db: Database) -> None:
    account = make_account(db, 1_000_000)
    model = priced_model(db, 1_000_000, 1_000_000)
    gone = unique("gw")
    held = reserve_model(db, account.principal, model, 10, 10, owner=gone)
    assert (
        admin("release-reservations", "--gateway-id", gone)
        == "released 1 open reservation(s); nothing was charged for them"
    )
    with db.read() as session:
        assert session.scalar(select(Reservation.state).where(Reservation.id == held.id)) == "released"
    admin.fails("release-reservations")


def test_rotate_admin_key_prints_a_working_key(admin: Admin, db: Database) -> None:
    key = admin("rotate-admin-key")
    assert authenticate_admin(db, key).key_id and (admin.data_dir / "admin_key").read_text().strip() == key


def _tiers(output: str) -> dict[str, list[str]]:
    """list-tiers (or set-tier-limits) output -> tier -> its cells after the name, orgs last."""
    header, *rows = (line.split() for line in output.splitlines())
    assert header == ["tier", "rpm", "tpm", "concurrent", "free_rpm", "free_tpm", "free_concurrent", "orgs"]
    return {row[0]: row[1:] for row in rows}


def test_list_tiers_shows_the_built_in_tiers(admin: Admin) -> None:
    tiers = _tiers(admin("list-tiers"))
    assert tiers["default"][:6] == ["600", "1000000", "32", "120", "200000", "16"]
    assert tiers["pro"][:6] == ["6000", "10000000", "256", "1200", "2000000", "64"]
    assert tiers["unlimited"][:6] == ["unlimited"] * 6


def test_set_tier_limits_creates_and_changes_a_tier(admin: Admin) -> None:
    gold, silver = unique("gold"), unique("silver")
    created = admin("set-tier-limits", gold, "--from", "pro", "--rpm", "unlimited", "--free-tpm", "7")
    assert _tiers(created) == {gold: ["unlimited", "10000000", "256", "1200", "7", "64", "0"]}
    changed = admin("set-tier-limits", gold, "--max-concurrent", "9", "--free-tpm", "unlimited")
    assert _tiers(changed) == {gold: ["unlimited", "10000000", "9", "1200", "unlimited", "64", "0"]}
    copied = admin("set-tier-limits", silver, "--free-max-concurrent", "2")  # a new tier copies default
    assert _tiers(copied) == {silver: ["600", "1000000", "32", "120", "200000", "2", "0"]}

    org = unique("org")
    admin("create-org", org, "--tier", gold)
    assert _tiers(admin("list-tiers"))[gold][-1] == "1"
    assert admin("set-tier", org, silver) == f"{org}: tier {silver}"
    with pytest.raises(SystemExit) as refused:  # argparse refuses it before anything runs
        admin.run("set-tier-limits", gold, "--rpm", "0")
    assert (
        refused.value.code == 2
        and "'0' is neither 'unlimited' nor an integer" in admin.capsys.readouterr().err
    )


def _num_admitted(db: Database, principal: KeyPrincipal, model: str, *, hold: bool) -> int:
    """Admits requests through a fresh gateway (held open, or finished at once) until one is refused for the
    reason `hold` tests: concurrency, or requests per minute."""
    gate = AdmissionControl(db, InMemoryRateLimiter(clock=FakeClock(1_700_000_040.0)))
    held: list[Admission] = []
    try:
        for num_admitted in range(1_000):
            try:
                admission = gate.admit(principal, gate.resolve(principal, model), 10, 10)
            except RateLimited as refused:
                assert refused.decision.reason == ("concurrency" if hold else "requests")
                return num_admitted
            if hold:
                held.append(admission)
            else:
                gate.finish(admission, 10, 10, "ok", 0.1)
        raise AssertionError("never refused")
    finally:
        for admission in held:
            gate.abort(admission)


def test_show_limits_is_what_admission_enforces(admin: Admin, db: Database) -> None:
    tier = unique("tier")
    admin("set-tier-limits", tier, "--rpm", "5", "--free-rpm", "7", "--free-max-concurrent", "4")
    account = make_account(db, 10**6, tier=tier, max_concurrent_requests=3)
    title, header, *lines = admin("show-limits", account.key.info.id).splitlines()
    assert (
        title
        == f"key {account.key.info.id} ({account.key.info.prefix}...), organization {account.org.id}, tier {tier}"
    )
    assert header.split() == ["models", "limit", "value", "from"]
    shown = {
        (models, limit): (value, " ".join(source)) for models, limit, value, *source in map(str.split, lines)
    }
    assert shown == {
        ("paid", "rpm"): ("5", f"tier {tier}"),
        ("paid", "tpm"): ("1000000", f"tier {tier}"),
        ("paid", "concurrent"): ("3", "key"),
        ("free", "rpm"): ("7", f"tier {tier}"),
        ("free", "tpm"): ("200000", f"tier {tier}"),
        ("free", "concurrent"): ("3", "key"),  # the key's own, not the tier's 4
    }

    principal = authenticate(db, account.key.key)
    paid, free = priced_model(db, 1, 1), priced_model(db, 0, 0)
    assert _num_admitted(db, principal, free, hold=True) == int(shown["free", "concurrent"][0])
    assert _num_admitted(db, principal, paid, hold=True) == int(shown["paid", "concurrent"][0])
    assert _num_admitted(db, principal, free, hold=False) == int(shown["free", "rpm"][0])
    assert _num_admitted(db, principal, paid, hold=False) == int(shown["paid", "rpm"][0])


# -- the model square ----------------------------------------------------------------------------------


def test_listings_from_the_command_line(admin: Admin, db: Database) -> None:
    provider, buyer = make_account(db).org, make_account(db).org
    model = unique("model")
    flags = ["--provider", provider.name, "--input", "0.1", "--output", "0.2", "--tag", "b", "--tag", "a"]
    shown = admin(
        "set-listing", model, *flags, "--license", "MIT", "--context-length", "4096", "--fee-bps", "250",
        "--status", "draft", "--description", "a small model",
    )  # fmt: skip
    header, row = (line.split() for line in shown.splitlines())
    assert header == [
        "model",
        "provider",
        "task",
        "status",
        "visibility",
        "input_per_1m",
        "output_per_1m",
        "fee",
    ]
    assert row == [model, provider.name, "chat", "draft", "public", "0.100000", "0.200000", "2.50%"]
    listing = get_listing(db, model)
    assert (listing.provider_org_id, listing.tags, listing.license, listing.context_length) == (
        provider.id, ("b", "a"), "MIT", 4096,
    )  # fmt: skip
    assert listing.price == Price(100_000, 200_000) and listing.description == "a small model"

    assert admin("publish-listing", model) == f"{model}: published"
    assert any(
        line.split()[:4] == [model, provider.name, "chat", "published"]
        for line in admin("list-listings").splitlines()
    )
    assert admin("retire-listing", model).startswith(f"{model}: retired")

    # Create or replace: the listing becomes what the flags say; a retired one stays retired.
    admin(
        "set-listing",
        model,
        "--free",
        "--visibility",
        "shared",
        "--share-with",
        buyer.name,
        "--task",
        "embedding",
    )
    replaced = get_listing(db, model)
    assert (
        replaced.price == Price(0, 0)
        and replaced.shared_with == (buyer.id,)
        and replaced.provider_org_id is None
    )
    assert (replaced.task, replaced.tags, replaced.license, replaced.status) == (
        "embedding",
        (),
        "",
        "retired",
    )
    line = next(line for line in admin("list-listings").splitlines() if line.startswith(model))
    assert line.split()[1:] == [
        "tokenmill",
        "embedding",
        "retired",
        "shared",
        "0.000000",
        "0.000000",
        "default",
    ]


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (("set-listing", "{model}", "--input", "1"), "output"),
        (("set-listing", "{model}", "--output", "1"), "input"),
        (("set-listing", "{model}", "--input", "1", "--output", "x"), "output"),
        (("set-listing", "{model}", "--free", "--output", "1"), "output"),
        (("set-listing", "{model}", "--visibility", "shared"), "shared_with"),
        (("set-listing", "{model}", "--share-with", "{org}"), "shared_with"),
        (("set-listing", "{model}", "--provider", "no-such-org"), "provider"),
        (("publish-listing", "{model}"), "model"),
        (("retire-listing", "{model}"), "model"),
        (("earnings", "--provider", "no-such-org"), "organization"),
        (("earnings", "--start-date", "2025-02-01", "--end-date", "2025-01-01"), "start"),
        (("audit-log", "--action", " "), "action"),
    ],
)
def test_bad_market_input_is_one_line_and_writes_nothing(
    admin: Admin, db: Database, args: tuple[str, ...], field: str
) -> None:
    org, model = make_account(db).org.name, unique("model")
    message = admin.fails(*(a.format(model=model, org=org) for a in args))
    assert message.startswith("tokenmill admin: ") and f"{field}: " in message and "\n" not in message
    with pytest.raises(ListingNotFound):
        get_listing(db, model)


def test_earnings_per_provider_as_table_and_exact_csv(admin: Admin, db: Database) -> None:
    provider, buyer = make_account(db), make_account(db, 10_000_000)
    model = priced_model(db, 1_000_000, 3_000_000, provider=provider.org.id, platform_fee_bps=2_500)
    for completion in (5, 7):
        settle(db, reserve_model(db, buyer.principal, model, 10, 10), 10, completion, UsageStatus.OK, 0.1)
    csv_text = admin("earnings", "--provider", provider.org.name, "--csv")
    rows = list(csv.DictReader(io.StringIO(csv_text)))
    assert [(r["provider_org_id"], r["model"], r["num_requests"]) for r in rows] == [
        (provider.org.id, model, "2")
    ]
    # Each sale split on its own: 25 -> 18 + 7 and 31 -> 23 + 8 (the provider's share rounded down).
    assert (rows[0]["sales_micros"], rows[0]["earnings_micros"], rows[0]["platform_fee_micros"]) == (
        "56",
        "41",
        "15",
    )
    table = admin("earnings", "--provider", provider.org.name).splitlines()
    assert table[0].split() == [
        "day", "provider", "model", "requests", "prompt_tokens", "completion_tokens", "sales", "earnings", "fee",
    ]  # fmt: skip
    assert table[1].split()[1:] == [
        provider.org.id,
        model,
        "2",
        "20",
        "12",
        "0.000056",
        "0.000041",
        "0.000015",
    ]
    assert table[2].startswith("total 2 requests: sales 0.000056, earnings 0.000041, fee 0.000015 (")
    assert balance_micros(db, provider.org.id) == 41


# -- the audit log -------------------------------------------------------------------------------------


def test_cli_changes_are_in_the_audit_log(admin: Admin, db: Database) -> None:
    org = unique("audited")
    org_id = admin("create-org", org)
    admin("set-tier", org, "pro")
    admin("top-up", org, "2", "--idempotency-key", f"{org}-pay")
    admin("top-up", org, "2", "--idempotency-key", f"{org}-pay")  # a replay: no second row
    admin("create-user", org, f"{org}@example.com")
    key = admin("create-key", f"{org}@example.com")
    key_id = authenticate(db, key).key_id
    admin("revoke-key", key_id)
    admin("revoke-key", key_id)  # changes nothing: no row

    header, *lines = admin("audit-log", "--target", org_id).splitlines()
    assert header.split() == ["id", "when", "actor", "action", "target", "change"]
    assert [line.split()[4] for line in lines] == ["top_up", "set_org_tier", "create_org"]  # newest first
    assert all(line.split()[3] == cli_actor() and line.split()[5] == org_id for line in lines)
    assert "balance_micros: 0 -> 2000000" in lines[0] and "tier: default -> pro" in lines[1]
    assert f"new: id={org_id}; name={org}; tier=default" in lines[2]

    revoked = admin("audit-log", "--target", key_id)
    assert [line.split()[4] for line in revoked.splitlines()[1:]] == ["revoke_key", "create_key"]
    assert "revoked_at: null -> 20" in revoked
    everything = admin("audit-log", "--limit", "1000")
    assert key not in everything and key[len("sk-") + 6 :] not in everything

    newest = admin("audit-log", "--limit", "1", "--action", "create_key").splitlines()
    assert len(newest) == 2 and key_id in newest[1]
    first_id = lines[-1].split()[0]
    older = admin("audit-log", "--target", org_id, "--before-id", first_id)
    assert older.splitlines() == ["id  when  actor  action  target  change"]


def test_rotating_the_admin_key_from_the_cli_is_audited_without_the_key(admin: Admin) -> None:
    key = admin("rotate-admin-key")
    line = admin("audit-log", "--action", "rotate_admin_key", "--limit", "1").splitlines()[1]
    assert key not in line and "active_key_ids" in line and line.split()[3] == cli_actor()


def test_the_cli_actor_is_named_even_without_a_login_name(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_login() -> str:
        raise OSError("No username set in the environment")

    monkeypatch.setattr(getpass, "getuser", no_login)
    assert cli_actor() == f"cli:uid-{os.getuid()}"
    monkeypatch.setattr(getpass, "getuser", lambda: "  ops\udcff ")
    assert cli_actor() == "cli:ops\ufffd"
