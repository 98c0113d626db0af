"""Organizations and users: duplicates and unknown references (organizations, users, rate-limit tiers) are
clear errors that write nothing."""

from __future__ import annotations

import pytest

from tests.platform.helpers import unique
from tokenmill.platform.accounts import (
    create_organization,
    create_user,
    get_organization,
    get_user,
    list_users,
    set_organization_tier,
)
from tokenmill.platform.db import Database
from tokenmill.platform.errors import DuplicateName, InvalidArgument, UnknownOrganization, UnknownTier
from tokenmill.platform.tiers import set_tier_limits


def test_organizations_and_users_are_found_by_id_or_name(db: Database) -> None:
    org = create_organization(db, unique("acme"), tier="pro")
    user = create_user(db, org.id, "Ada@Example.com", "Ada")
    assert get_organization(db, org.name) == get_organization(db, org.id) == org
    assert get_user(db, "ada@example.com") == get_user(db, user.id) == user
    assert user.email == "ada@example.com" and user.org_id == org.id
    assert set_organization_tier(db, org.id, "default").tier == "default"


def test_duplicates_and_unknown_references_write_nothing(db: Database) -> None:
    org = create_organization(db, unique("dup"))
    with pytest.raises(DuplicateName, match="name"):
        create_organization(db, org.name)
    email = f"{unique('u')}@example.com"
    create_user(db, org.id, email)
    with pytest.raises(DuplicateName, match="email"):
        create_user(db, org.id, email.upper())
    with pytest.raises(UnknownOrganization):
        create_user(db, "org_missing", f"{unique('u')}@example.com")
    with pytest.raises(InvalidArgument, match="email"):
        create_user(db, org.id, "not-an-email")
    with pytest.raises(InvalidArgument, match="tier"):
        create_organization(db, unique("org"), tier="Gold Plan")
    assert [u.email for u in list_users(db, org.id)] == [email]


def test_an_organization_is_on_a_tier_that_exists(db: Database) -> None:
    missing = unique("gold")
    with pytest.raises(
        UnknownTier, match=rf"^tier: no rate-limit tier '{missing}'; the tiers are: .*default"
    ):
        create_organization(db, unique("org"), tier=missing)
    org = create_organization(db, unique("org"))
    with pytest.raises(UnknownTier, match="^tier: no rate-limit tier .*; the tiers are: .*unlimited"):
        set_organization_tier(db, org.id, missing)
    assert get_organization(db, org.id).tier == "default"
    set_tier_limits(db, missing, {"requests_per_minute": 5})
    assert set_organization_tier(db, org.id, missing).tier == missing
