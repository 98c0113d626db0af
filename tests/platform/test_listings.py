"""Listings on a real database: who may call which model (and that the catalog and request resolution agree
on it), what a caller who may not learns (nothing), who may edit a listing, how models.yaml is applied
again at every start without undoing a provider's edits, and that a refused write writes nothing."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import func, select

from tests.platform.helpers import make_account, reserve_model, unique
from tokenmill.platform.accounts import create_organization, get_organization
from tokenmill.platform.billing import settle
from tokenmill.platform.db import Database
from tokenmill.platform.errors import (
    Conflict,
    InvalidArgument,
    ListingNotFound,
    ListingRetired,
    ModelNotFound,
    NotFound,
    UnknownOrganization,
)
from tokenmill.platform.listing_terms import ListingChanges, ListingSpec
from tokenmill.platform.listings import (
    DEFAULT_PLATFORM_FEE_BPS,
    PLATFORM_PROVIDER,
    ListingInfo,
    apply_listing,
    callable_listings,
    ensure_listing,
    get_listing,
    list_listings,
    own_listings,
    resolve_listing,
    set_listing_status,
    update_listing,
    update_own_listing,
)
from tokenmill.platform.pricing import FREE, Price, get_model_price, set_model_price
from tokenmill.platform.tables import Listing, ModelPrice, Organization

PRICE = Price(1_500_000, 2_000_000)


def _not_found(model: str) -> str:
    return f"The model `{model}` does not exist or you do not have access to it."


def _outcome(db: Database, org_id: str, model: str) -> str:
    try:
        resolve_listing(db, org_id, model)
    except ModelNotFound as exc:
        assert str(exc) == _not_found(model)  # one message, whatever the reason
        return "404"
    except ListingRetired:
        return "410"
    return "ok"


def _rows(db: Database, model: str) -> tuple[int, int]:
    """(listings, prices) stored for `model`."""
    with db.read() as session:
        listings = session.scalar(select(func.count()).where(Listing.model == model))
        prices = session.scalar(select(func.count()).where(ModelPrice.model == model))
    return int(listings or 0), int(prices or 0)


def test_who_may_call_what(db: Database) -> None:
    provider, partner, stranger = (create_organization(db, unique("org")) for _ in range(3))
    specs = {
        "public": ListingSpec(unique("m"), provider=provider.id),
        "private": ListingSpec(unique("m"), provider=provider.name, visibility="private"),
        "shared": ListingSpec(
            unique("m"), provider=provider.id, visibility="shared", shared_with=(partner.name,)
        ),
        "draft": ListingSpec(unique("m"), provider=provider.id, status="draft"),
        "shared draft": ListingSpec(
            unique("m"), provider=provider.id, visibility="shared", shared_with=(partner.id,), status="draft"
        ),
        "retired": ListingSpec(unique("m"), provider=provider.id, status="retired"),
        "platform's": ListingSpec(unique("m")),
    }
    models = {kind: apply_listing(db, spec).model for kind, spec in specs.items()}
    expected = {  # kind: (provider, partner, stranger)
        "public": ("ok", "ok", "ok"),
        "private": ("ok", "404", "404"),
        "shared": ("ok", "ok", "404"),
        "draft": ("ok", "404", "404"),
        "shared draft": ("ok", "404", "404"),
        "retired": ("410", "404", "404"),
        "platform's": ("ok", "ok", "ok"),
    }
    orgs = (provider.id, partner.id, stranger.id)
    assert {kind: tuple(_outcome(db, org, models[kind]) for org in orgs) for kind in models} == expected
    assert _outcome(db, stranger.id, unique("no-such-model")) == "404"

    ours = set(models.values())
    for index, org in enumerate(orgs):
        callable_models = {listing.model for listing in callable_listings(db, org) if listing.model in ours}
        assert callable_models == {models[kind] for kind, row in expected.items() if row[index] == "ok"}
        listed = [listing.model for listing in callable_listings(db, org)]
        assert listed == sorted(listed)
    with pytest.raises(ListingRetired, match="retired"):
        resolve_listing(db, provider.id, models["retired"])
    # The operator sees every listing, in any status.
    everything = [listing.model for listing in list_listings(db)]
    assert ours <= set(everything) and everything == sorted(everything)
    assert get_listing(db, models["retired"]).status == "retired"
    shared = get_listing(db, models["shared"])
    assert (shared.provider, shared.shared_with) == (provider.name, (partner.id,))


def test_retiring_stops_new_requests_and_republishing_restores_them(db: Database) -> None:
    provider, buyer = make_account(db), make_account(db)
    model = apply_listing(db, ListingSpec(unique("m"), provider=provider.org.id, price=PRICE)).model
    assert resolve_listing(db, buyer.org.id, model).price == PRICE
    assert set_listing_status(db, model, "retired").status == "retired"
    assert _outcome(db, buyer.org.id, model) == "404" and _outcome(db, provider.org.id, model) == "410"
    assert model not in {listing.model for listing in callable_listings(db, provider.org.id)}
    set_listing_status(db, model, "published")
    assert _outcome(db, buyer.org.id, model) == "ok"
    with pytest.raises(InvalidArgument, match="^status: must be one of draft, published, retired$"):
        set_listing_status(db, model, "deleted")
    with pytest.raises(ListingNotFound):
        set_listing_status(db, unique("no-such-model"), "retired")


def test_only_the_provider_edits_its_listing_and_a_stranger_learns_nothing(db: Database) -> None:
    provider, partner, stranger = (create_organization(db, unique("org")) for _ in range(3))
    spec = ListingSpec(unique("m"), provider=provider.id, description="original", price=PRICE)
    model = apply_listing(db, spec).model
    platform_model = apply_listing(db, ListingSpec(unique("m"), price=PRICE)).model
    before = get_listing(db, model)

    change = ListingChanges(description="hijacked", price=FREE)
    for org_id, target in [
        (stranger.id, model),
        (stranger.id, platform_model),
        (provider.id, platform_model),
    ]:
        with pytest.raises(ModelNotFound) as refused:
            update_own_listing(db, org_id, target, change)
        assert str(refused.value) == _not_found(target)
    with pytest.raises(ModelNotFound) as refused:
        update_own_listing(db, stranger.id, "no-such-model", change)
    assert str(refused.value) == _not_found("no-such-model")
    assert get_listing(db, model) == before and get_model_price(db, platform_model) == PRICE

    edited = update_own_listing(
        db,
        provider.id,
        model,
        ListingChanges(
            description="better", price=Price(7, 13), visibility="shared", shared_with=(partner.id,)
        ),
    )
    assert (edited.description, edited.price, edited.visibility, edited.shared_with) == (
        "better",
        Price(7, 13),
        "shared",
        (partner.id,),
    )
    assert get_model_price(db, model) == Price(7, 13)  # billing's price moved with the listing
    assert _outcome(db, partner.id, model) == "ok" and _outcome(db, stranger.id, model) == "404"

    # Leaving `shared` drops the list; a list without `shared` is refused, with nothing written.
    assert update_own_listing(db, provider.id, model, ListingChanges(visibility="private")).shared_with == ()
    with pytest.raises(InvalidArgument, match="^shared_with: only with visibility shared"):
        update_own_listing(
            db, provider.id, model, ListingChanges(description="lost", shared_with=(partner.id,))
        )
    # A provider names organizations by id only: a name (guessable) would let its key probe which exist.
    for ref in (unique("nobody"), partner.name):
        with pytest.raises(InvalidArgument, match=r"^shared_with\[0\]: .* is not the id of an organization"):
            update_own_listing(
                db, provider.id, model, ListingChanges(visibility="shared", shared_with=(ref,))
            )
    with pytest.raises(InvalidArgument, match="^shared_with: must name at least one organization"):
        update_listing(db, model, ListingChanges(visibility="shared"))
    after = get_listing(db, model)
    assert (after.description, after.visibility) == ("better", "private")

    # The operator may edit any listing.
    assert update_listing(db, platform_model, ListingChanges(description="ours")).description == "ours"
    with pytest.raises(ListingNotFound):
        update_listing(db, unique("no-such-model"), ListingChanges(description="x"))


def test_a_provider_publishes_its_draft_and_retires_it_but_never_revives_it(db: Database) -> None:
    provider, buyer, stranger = make_account(db), make_account(db, 10_000_000), make_account(db)
    model = apply_listing(
        db, ListingSpec(unique("m"), provider=provider.org.id, price=PRICE, status="draft")
    ).model
    assert _outcome(db, buyer.org.id, model) == "404" and _outcome(db, provider.org.id, model) == "ok"
    # Retiring a draft, or asking for any other status, is refused naming the field, and writes nothing.
    with pytest.raises(
        Conflict, match=r"^status: only a published listing can be retired \(this one is draft\)$"
    ):
        update_own_listing(db, provider.org.id, model, ListingChanges(status="retired", description="lost"))
    with pytest.raises(InvalidArgument, match="^status: a provider may set published or retired only$"):
        update_own_listing(db, provider.org.id, model, ListingChanges(status="draft"))
    with pytest.raises(InvalidArgument, match="^status: must be one of draft, published, retired$"):
        update_own_listing(db, provider.org.id, model, ListingChanges(status="deleted"))
    # Another organization cannot publish it: as if it did not exist.
    with pytest.raises(ModelNotFound):
        update_own_listing(db, stranger.org.id, model, ListingChanges(status="published"))
    draft = get_listing(db, model)
    assert (draft.status, draft.description) == ("draft", "")

    assert (
        update_own_listing(db, provider.org.id, model, ListingChanges(status="published")).status
        == "published"
    )
    assert _outcome(db, buyer.org.id, model) == "ok"
    assert model in {listing.model for listing in callable_listings(db, buyer.org.id)}
    assert (
        update_own_listing(db, provider.org.id, model, ListingChanges(status="published")).status
        == "published"
    )

    # Retiring stops new requests only: one admitted before finishes and is billed at its quoted terms.
    admitted = reserve_model(db, buyer.principal, model, 10, 10)
    with pytest.raises(ModelNotFound):
        update_own_listing(db, stranger.org.id, model, ListingChanges(status="retired"))
    assert (
        update_own_listing(db, provider.org.id, model, ListingChanges(status="retired")).status == "retired"
    )
    assert _outcome(db, buyer.org.id, model) == "404" and _outcome(db, provider.org.id, model) == "410"
    assert model not in {listing.model for listing in callable_listings(db, buyer.org.id)}
    usage = settle(db, admitted, 10, 4, "ok", 0.1)
    assert usage.cost_micros == -(
        -(10 * PRICE.input_micros_per_mtok + 4 * PRICE.output_micros_per_mtok) // 10**6
    )

    # Only the operator brings a retired listing back; the provider's other edits are a 410 as before.
    for status in ("published", "retired"):
        with pytest.raises(Conflict, match="^status: the listing is retired; only the server's operator"):
            update_own_listing(db, provider.org.id, model, ListingChanges(status=status))
    with pytest.raises(ListingRetired):
        update_own_listing(db, provider.org.id, model, ListingChanges(display_name="Back again"))
    assert get_listing(db, model).status == "retired"
    assert set_listing_status(db, model, "published").status == "published"
    assert _outcome(db, buyer.org.id, model) == "ok"


def test_a_provider_renames_and_retags_its_listing(db: Database) -> None:
    provider, buyer = make_account(db), make_account(db)
    spec = ListingSpec(unique("m"), provider=provider.org.id, display_name="Old", tags=("chat",), price=PRICE)
    model = apply_listing(db, spec).model
    edited = update_own_listing(
        db,
        provider.org.id,
        model,
        ListingChanges(display_name="  New name  ", tags=("fast", " code ", "fast")),
    )
    assert (edited.display_name, edited.tags) == ("New name", ("fast", "code"))
    seen = next(listing for listing in callable_listings(db, buyer.org.id) if listing.model == model)
    assert (seen.display_name, seen.tags, seen.price) == ("New name", ("fast", "code"), PRICE)
    # The operator's rules for tags and names hold for the provider too; a refused edit writes nothing.
    refused: list[tuple[ListingChanges, str]] = [
        (ListingChanges(display_name=" ", tags=()), "^display_name: must not be empty$"),
        (ListingChanges(display_name="x" * 201), "^display_name: at most 200 characters$"),
        (ListingChanges(tags=("ok", "x" * 51)), "^tags: at most 50 characters$"),
        (ListingChanges(tags=tuple(f"t{i}" for i in range(33))), "^tags: at most 32 items$"),
        (ListingChanges(tags="chat"), "^tags: must be a list of strings$"),  # type: ignore[arg-type]
        (ListingChanges(tags=("",)), "^tags: must not be empty$"),
    ]
    for changes, message in refused:
        with pytest.raises(InvalidArgument, match=message):
            update_own_listing(db, provider.org.id, model, changes)
    assert get_listing(db, model) == edited
    assert update_own_listing(db, provider.org.id, model, ListingChanges(tags=())).tags == ()
    # The operator may rename, retag and set any status through the same changes.
    operator = update_listing(db, model, ListingChanges(display_name="Ours", tags=("x",), status="draft"))
    assert (operator.display_name, operator.tags, operator.status) == ("Ours", ("x",), "draft")


def test_a_provider_sees_its_own_listings_in_every_status(db: Database) -> None:
    provider, other = make_account(db), make_account(db)
    models = {
        status: apply_listing(db, ListingSpec(unique("m"), provider=provider.org.id, status=status)).model
        for status in ("draft", "published")
    }
    models["retired"] = apply_listing(db, ListingSpec(unique("m"), provider=provider.org.id)).model
    set_listing_status(db, models["retired"], "retired")
    apply_listing(db, ListingSpec(unique("m"), provider=other.org.id))
    apply_listing(db, ListingSpec(unique("m")))  # the platform's own
    own = own_listings(db, provider.org.id)
    assert [listing.model for listing in own] == sorted(models.values())
    assert {listing.model: listing.status for listing in own} == {model: s for s, model in models.items()}
    assert own_listings(db, make_account(db).org.id) == []


def test_an_unchanged_models_yaml_keeps_the_providers_edits(db: Database) -> None:
    provider = create_organization(db, unique("org"))
    spec = ListingSpec(unique("m"), provider=provider.name, description="from the file", price=PRICE)
    model = apply_listing(db, spec, digest="d1").model
    update_own_listing(db, provider.id, model, ListingChanges(description="edited", price=Price(1, 1)))

    # The same file at the next start (whatever it says) changes nothing.
    again = apply_listing(db, ListingSpec(model, description="changed", tags=("x",)), digest="d1")
    assert (again.description, again.price, again.provider_org_id, again.tags) == (
        "edited",
        Price(1, 1),
        provider.id,
        (),
    )
    # A changed file is applied, every field it declares, the price with it.
    changed = ListingSpec(
        model, provider=provider.id, description="file v2", tags=("a", "b", "a"), price=PRICE
    )
    applied = apply_listing(db, changed, digest="d2")
    assert (applied.description, applied.price, applied.tags) == ("file v2", PRICE, ("a", "b"))
    # Without a digest (the operator) it is applied and the file's digest kept.
    assert apply_listing(db, ListingSpec(model, provider=provider.id, description="op")).description == "op"
    assert apply_listing(db, changed, digest="d2").description == "op"
    # A spec without a price keeps the one stored; the provider can be changed by the file.
    moved = apply_listing(db, ListingSpec(model, display_name="Nice name"), digest="d3")
    assert (moved.price, moved.provider_org_id, moved.provider, moved.display_name) == (
        PRICE,
        None,
        PLATFORM_PROVIDER,
        "Nice name",
    )


def test_applying_config_does_not_unretire(db: Database) -> None:
    model = apply_listing(db, ListingSpec(unique("m")), digest="d1").model
    set_listing_status(db, model, "retired")
    applied = apply_listing(db, ListingSpec(model, description="new", status="published"), digest="d2")
    assert (applied.status, applied.description) == ("retired", "new")


def test_a_new_model_is_free_and_a_price_set_earlier_is_kept(db: Database) -> None:
    new = apply_listing(db, ListingSpec(unique("m")))
    assert new.price == FREE and get_model_price(db, new.model) == FREE
    priced = unique("m")
    set_model_price(db, priced, 5, 6)
    assert apply_listing(db, ListingSpec(priced)).price == Price(5, 6)


def test_a_missing_provider_is_refused_or_created_on_request(db: Database) -> None:
    name = unique("Acme Models")
    model = unique("m")
    with pytest.raises(UnknownOrganization, match="^provider: "):
        apply_listing(db, ListingSpec(model, provider=name, price=PRICE))
    assert _rows(db, model) == (0, 0)
    with db.read() as session:
        assert session.scalar(select(Organization).where(Organization.name == name)) is None

    created = apply_listing(db, ListingSpec(model, provider=name, price=PRICE), create_provider=True)
    org = get_organization(db, name)
    assert (created.provider_org_id, created.provider, org.tier) == (org.id, name, "default")
    again = apply_listing(db, ListingSpec(unique("m"), provider=name), create_provider=True)
    assert again.provider_org_id == org.id  # found, not created twice
    # An organization id that does not exist is a typo, never the name of one to create.
    with pytest.raises(UnknownOrganization, match="^provider: "):
        apply_listing(db, ListingSpec(unique("m"), provider="org_0123456789abcdef"), create_provider=True)


def test_fees(db: Database) -> None:
    provider = create_organization(db, unique("org"))
    own_fee = apply_listing(db, ListingSpec(unique("m"), provider=provider.id, platform_fee_bps=0))
    default_fee = apply_listing(db, ListingSpec(unique("m"), provider=provider.id))
    platform = apply_listing(db, ListingSpec(unique("m"), platform_fee_bps=5))
    assert own_fee.fee_bps(DEFAULT_PLATFORM_FEE_BPS) == 0
    assert default_fee.fee_bps(DEFAULT_PLATFORM_FEE_BPS) == DEFAULT_PLATFORM_FEE_BPS
    assert default_fee.fee_bps(3333) == 3333
    assert platform.fee_bps(3333) == 10_000  # the platform keeps the whole sale of its own model


BAD_SPECS: list[tuple[dict[str, Any], str]] = [
    ({"model": "   "}, "model: must not be empty"),
    ({"model": "m" * 201}, "model: at most 200 characters"),
    ({"task": "image"}, "task: must be one of chat, embedding"),
    ({"display_name": "bad \ud800"}, "display_name: "),
    ({"description": "x" * 4001}, "description: at most 4000 characters"),
    ({"description": "nul \x00"}, "description: must not contain NUL characters"),
    ({"tags": tuple(f"t{i}" for i in range(33))}, "tags: at most 32 items"),
    ({"tags": ("x" * 51,)}, "tags: at most 50 characters"),
    ({"tags": "chat"}, "tags: must be a list of strings"),
    ({"tags": ("",)}, "tags: must not be empty"),
    ({"license": "l" * 101}, "license: at most 100 characters"),
    ({"context_length": 0}, "context_length: must be an integer from 1"),
    ({"visibility": "secret"}, "visibility: must be one of public, private, shared"),
    ({"visibility": "shared"}, "shared_with: must name at least one organization when visibility is shared"),
    ({"shared_with": ("someone",)}, "shared_with: only with visibility shared (visibility is public)"),
    ({"status": "gone"}, "status: must be one of draft, published, retired"),
    ({"platform_fee_bps": 10_001}, "platform_fee_bps: must be an integer from 0 to 10000"),
    ({"platform_fee_bps": -1}, "platform_fee_bps: must be an integer from 0 to 10000"),
    ({"platform_fee_bps": 12.5}, "platform_fee_bps: must be an integer from 0 to 10000"),
    ({"platform_fee_bps": True}, "platform_fee_bps: must be an integer from 0 to 10000"),
    ({"price": (1, 2)}, "price: must be a Price"),
    ({"provider": ""}, "provider: must not be empty"),
]


@pytest.mark.parametrize(("fields", "message"), BAD_SPECS)
def test_a_refused_listing_names_the_field_and_writes_nothing(
    db: Database, fields: dict[str, Any], message: str
) -> None:
    spec = ListingSpec(**{"model": unique("m"), "price": PRICE, **fields})
    with pytest.raises(InvalidArgument) as refused:
        apply_listing(db, spec, create_provider=True)
    assert str(refused.value).startswith(message)
    assert _rows(db, spec.model) == (0, 0)


def test_an_unknown_organization_to_share_with_writes_nothing(db: Database) -> None:
    provider = create_organization(db, unique("org"))
    model = unique("m")
    spec = ListingSpec(
        model, provider=provider.id, visibility="shared", shared_with=(unique("nobody"),), price=PRICE
    )
    with pytest.raises(UnknownOrganization, match="^shared_with: "):
        apply_listing(db, spec)
    assert _rows(db, model) == (0, 0)
    with pytest.raises(InvalidArgument, match="^description: at most 4000"):
        update_own_listing(db, provider.id, model, ListingChanges(description="x" * 4001))


def test_ensure_listing_lists_a_served_model_once(db: Database) -> None:
    model = unique("m")
    assert ensure_listing(db, model, task="embedding") is True
    assert ensure_listing(db, model) is False
    listing = get_listing(db, model)
    assert (listing.provider, listing.visibility, listing.status, listing.task, listing.price) == (
        PLATFORM_PROVIDER,
        "public",
        "published",
        "embedding",
        FREE,
    )
    assert listing.display_name == model and listing.provider_org_id is None

    provider = create_organization(db, unique("org"))
    theirs = apply_listing(
        db, ListingSpec(unique("m"), provider=provider.id, visibility="private", price=PRICE)
    )
    assert ensure_listing(db, theirs.model) is False
    assert get_listing(db, theirs.model) == theirs  # an existing listing is never touched
    with pytest.raises(InvalidArgument, match="^task: "):
        ensure_listing(db, unique("m"), task="image")


def _race(num_threads: int, work: Callable[[], object]) -> list[object]:
    barrier = threading.Barrier(num_threads)
    results: list[object] = []
    errors: list[BaseException] = []

    def run() -> None:
        barrier.wait()
        try:
            results.append(work())
        except BaseException as exc:  # surfaced below: a thread must not hide a failure
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(num_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    return results


def test_gateways_starting_together_list_each_model_and_create_each_provider_once(db: Database) -> None:
    model = unique("m")
    assert sorted(_race(8, lambda: ensure_listing(db, model)), key=bool) == [False] * 7 + [True]
    name, declared = unique("Provider"), unique("m")
    spec = ListingSpec(declared, provider=name, price=PRICE)
    infos = _race(8, lambda: apply_listing(db, spec, digest="d", create_provider=True))
    assert {info.provider_org_id for info in infos if isinstance(info, ListingInfo)} == {
        get_organization(db, name).id
    }
    assert _rows(db, declared) == (1, 1)


def test_listing_not_found_is_a_not_found(db: Database) -> None:
    with pytest.raises(NotFound):
        get_listing(db, unique("no-such-model"))
