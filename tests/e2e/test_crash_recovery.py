"""SIGKILL a server while streams are open (some generating, some queued for a slot), restart it: every
reservation ends settled or released, nothing is charged twice or lost, and the balance equals the
top-up minus the usage records."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import httpx
import pytest

from tests.e2e.conftest import MODEL, NO_EOS, Platform, books, org_of_key
from tests.serving.server_process import ServerProcess

pytestmark = pytest.mark.slow

NUM_STREAMS = 8
TOP_UP = "1"  # 1,000,000 micros: far more than these requests can cost


def _open_stream(url: str, key: str, started: threading.Event) -> None:
    """Reads a stream until the server dies under it."""
    body = {
        "model": MODEL,
        "max_tokens": 400,
        "stream": True,
        "messages": [{"role": "user", "content": "Go on."}],
    }
    try:
        with httpx.stream(
            "POST", f"{url}/v1/chat/completions", json={**body, **NO_EOS},
            headers={"Authorization": f"Bearer {key}"}, timeout=60,
        ) as response:  # fmt: skip
            for _ in response.iter_lines():
                started.set()
                time.sleep(0.05)  # a slow reader: the server keeps generating meanwhile
    except httpx.HTTPError:
        pass  # the connection dies with the server: expected


def test_killed_server_restarts_with_consistent_books(
    sqlite_platform: Platform, servers: Callable[[ServerProcess], ServerProcess]
) -> None:
    platform = sqlite_platform
    platform.admin("set-price", MODEL, "1", "2")
    key = platform.account(TOP_UP)
    # Two sequences at a time: the other streams wait in the engine's queue, holding their reservations.
    server = servers(platform.server("--max-num-seqs", "2", "--gateway-id", "gw-crash"))
    headers = {"Authorization": f"Bearer {key}"}
    finished = httpx.post(
        f"{server.url}/v1/chat/completions", headers=headers, timeout=60,
        json={"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "Hi."}], **NO_EOS},
    )  # fmt: skip
    assert finished.status_code == 200
    started = threading.Event()
    readers = [
        threading.Thread(target=_open_stream, args=(server.url, key, started), daemon=True)
        for _ in range(NUM_STREAMS)
    ]
    for reader in readers:
        reader.start()
    assert started.wait(30), "no stream started"
    db = platform.open()
    try:
        org_id = org_of_key(db, key)
        deadline = time.monotonic() + 30
        while books(db, org_id).num_open < NUM_STREAMS:
            assert time.monotonic() < deadline, books(db, org_id)
            time.sleep(0.05)

        server.kill()
        at_crash = books(db, org_id)
        assert at_crash.num_open >= NUM_STREAMS - 2  # (one of the two generating may just have finished)
        for reader in readers:
            reader.join(timeout=30)

        server.start(timeout_s=120)  # same port, data dir and gateway id
        after = books(db, org_id)
    finally:
        db.close()
    assert after.num_open == 0
    assert after.num_released == at_crash.num_open  # released by the restart: not charged
    assert after.num_settled == after.num_usage_records == at_crash.num_settled
    assert after.usage_cost_micros == -after.charges_micros == at_crash.usage_cost_micros
    assert after.balance_micros == 1_000_000 - after.usage_cost_micros
    info = httpx.get(f"{server.url}/v1/user/info", headers=headers).json()["data"]
    assert info["balance_micros"] == info["available_micros"] == after.balance_micros  # nothing held any more
    assert f"released {at_crash.num_open} reservation(s)" in server.log_path.read_text()
    # The admin key was created and shown on the first start only.
    assert server.log_path.read_text().count("shown only this once") == 1
    served = httpx.post(
        f"{server.url}/v1/chat/completions", headers=headers, timeout=60,
        json={"model": MODEL, "max_tokens": 3, "messages": [{"role": "user", "content": "Back?"}]},
    )  # fmt: skip
    assert served.status_code == 200  # and the restarted server serves again
