"""A newcomer's path, as the README tells it: start the server (the admin key is shown once and kept in a
0600 file), create an organization, a user and a key with the admin CLI, top up, call the API with the
`openai` SDK, read the usage report; a revoked key then gets 401."""

from __future__ import annotations

import csv
import io
import stat
from collections.abc import Callable

import openai
import pytest

from tests.e2e.conftest import MODEL, NO_EOS, Platform
from tests.serving.server_process import ServerProcess

pytestmark = pytest.mark.slow


def test_admin_cli_key_then_openai_sdk_then_revocation(
    sqlite_platform: Platform, servers: Callable[[ServerProcess], ServerProcess]
) -> None:
    admin = sqlite_platform.admin
    server = servers(sqlite_platform.server())
    admin_key_file = sqlite_platform.data_dir / "admin_key"
    assert stat.S_IMODE(admin_key_file.stat().st_mode) == 0o600
    assert admin_key_file.read_text().strip() in server.log_path.read_text()  # printed once at first start

    admin("create-org", "acme")
    admin("create-user", "acme", "alice@acme.com", "--name", "Alice")
    key = admin("create-key", "alice@acme.com", "--name", "laptop")
    assert admin("top-up", "acme", "5", "--idempotency-key", "invoice-1").endswith("balance 5.000000")
    assert "nothing written" in admin("top-up", "acme", "5", "--idempotency-key", "invoice-1")
    admin("set-price", MODEL, "0.5", "1.5")  # per 1M tokens

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello!"}], max_tokens=6, extra_body=NO_EOS
    )
    assert chat.usage.completion_tokens == 6
    expected_micros = -(-(chat.usage.prompt_tokens * 500_000 + 6 * 1_500_000) // 1_000_000)  # rounded up
    info = client.get("/user/info", cast_to=object)["data"]
    assert info["balance_micros"] == 5_000_000 - expected_micros

    (row,) = list(csv.DictReader(io.StringIO(admin("usage", "--org", "acme", "--csv"))))
    assert (row["model"], row["num_requests"], row["cost_micros"]) == (MODEL, "1", str(expected_micros))
    assert "acme" in admin("list-orgs") and "alice@acme.com" in admin("list-users", "--org", "acme")

    (laptop_key,) = [
        line.split()[0] for line in admin("list-keys", "--org", "acme").splitlines() if "laptop" in line
    ]
    assert key not in admin("list-keys")  # secrets are never shown again
    admin("revoke-key", laptop_key)
    with pytest.raises(openai.AuthenticationError) as refused:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Still there?"}])
    assert refused.value.code == "invalid_api_key"
