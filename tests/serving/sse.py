"""Reading server-sent events the way the openai SDK does, for tests that check the raw wire format."""

from __future__ import annotations

import json
from typing import Any

from fastapi.testclient import TestClient


def parse_events(body: str) -> tuple[list[dict[str, Any]], bool]:
    """-> (JSON payloads in order, whether the stream ended with [DONE])."""
    events: list[dict[str, Any]] = []
    done = False
    for block in body.split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), f"not an SSE data event: {block!r}"
        data = block[len("data: ") :]
        assert not done, "events after [DONE]"
        if data == "[DONE]":
            done = True
        else:
            events.append(json.loads(data))
    return events, done


def stream_events(client: TestClient, path: str, body: dict[str, Any]) -> tuple[list[dict[str, Any]], bool]:
    with client.stream("POST", path, json=body) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-request-id"]
        text = "".join(response.iter_text())
    return parse_events(text)
