"""Two gateways share one database and one Redis; a key may run 2 requests at once. SIGKILL one gateway while
its stream holds a slot, restart it under the same gateway id: within seconds the key runs 2 requests at
once again (the slot was freed at the restart, not ten minutes later)."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

import httpx
import pytest

from tests.e2e.conftest import MODEL, NO_EOS, Platform, books, org_of_key
from tests.platform.conftest import REDIS_URL, redis_unavailable
from tests.serving.server_process import ServerProcess

pytestmark = pytest.mark.slow

MAX_CONCURRENT = 2
FREED_WITHIN_S = 10.0
LONG_STREAM = {
    "model": MODEL,
    "max_tokens": 400,  # most of the tiny model's 512 positions (with the prompt): it generates a while
    "stream": True,
    "messages": [{"role": "user", "content": "Go on."}],
    **NO_EOS,
}


@contextmanager
def _streams(http: httpx.Client, key: str, servers: list[ServerProcess]) -> Iterator[list[int]]:
    """Opens one long stream per server, one after the other, and keeps them open: -> their statuses. An
    admitted stream is read to its first token, so it is generating when the next one is asked for."""
    with ExitStack() as opened:
        statuses, readers = [], []  # (a dropped line iterator would close its connection: the client left)
        for server in servers:
            response = opened.enter_context(
                http.stream(
                    "POST",
                    f"{server.url}/v1/chat/completions",
                    json=LONG_STREAM,
                    headers={"Authorization": f"Bearer {key}"},
                )
            )
            statuses.append(response.status_code)
            if response.status_code == 200:
                readers.append(response.iter_lines())
                next(line for line in readers[-1] if line.startswith("data: "))
        yield statuses


def test_a_restarted_gateway_frees_the_slots_of_its_killed_run(
    platform: Platform, servers: Callable[[ServerProcess], ServerProcess]
) -> None:
    reason = redis_unavailable()
    if reason:
        pytest.skip(reason)
    platform.admin("set-price", MODEL, "1", "2")  # paid: each stream also holds a reservation
    key = platform.account("1", "--max-concurrent", str(MAX_CONCURRENT))
    run = secrets.token_hex(4)  # gateway ids (and so their Redis lease indexes) of this run only
    crashing = servers(platform.server("--redis-url", REDIS_URL, "--gateway-id", f"gw-a-{run}", name="a"))
    other = servers(platform.server("--redis-url", REDIS_URL, "--gateway-id", f"gw-b-{run}", name="b"))
    db = platform.open()
    try:
        org_id = org_of_key(db, key)
        with httpx.Client(timeout=60) as http:
            with _streams(http, key, [crashing]) as statuses:
                assert statuses == [200]
                crashing.kill()
            assert books(db, org_id).num_open == 1  # killed mid-stream: its reservation and slot still held

            crashing.start(timeout_s=120)  # same port, data dir and gateway id
            restarted_at = time.monotonic()
            assert books(db, org_id).num_open == 0
            assert "freed 1 concurrency slot(s)" in crashing.log_path.read_text()
            while True:
                with _streams(http, key, [crashing, other]) as statuses:
                    if statuses == [200] * MAX_CONCURRENT:
                        assert books(db, org_id).num_open == MAX_CONCURRENT  # both generating at once
                        refused = http.post(
                            f"{other.url}/v1/chat/completions", json={**LONG_STREAM, "stream": False},
                            headers={"Authorization": f"Bearer {key}"},
                        )  # fmt: skip
                        assert refused.status_code == 429  # and the limit still holds at 2
                        break
                waited_s = time.monotonic() - restarted_at
                assert waited_s < FREED_WITHIN_S, f"{statuses} after {waited_s:.1f}s: the slot is still held"
    finally:
        db.close()
