"""One streamed request to an OpenAI-compatible endpoint, recorded as the client sees it: httpx reads the SSE
stream directly (no SDK objects in between), and each chunk's arrival time is taken as its line arrives,
before any parsing."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tokenmill.bench.record import RequestRecord
from tokenmill.bench.workload import BenchRequest, Endpoint

if TYPE_CHECKING:
    import httpx

PATHS: dict[Endpoint, str] = {"chat": "/chat/completions", "completions": "/completions"}
MAX_ERROR_DETAIL_CHARS = 300


@dataclass(frozen=True, slots=True)
class Target:
    """Where and how to send: `base_url` ends before the endpoint path, e.g. http://127.0.0.1:8000/v1."""

    base_url: str
    model: str
    endpoint: Endpoint = "chat"
    api_key: str | None = None
    temperature: float | None = 0.0
    extra_body: dict[str, Any] = field(default_factory=dict)
    """Merged into every request body, e.g. {"ignore_eos": true} for vLLM, or a logit_bias against EOS."""

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + PATHS[self.endpoint]

    @property
    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def body(self, request: BenchRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "stream": True,
            "stream_options": {"include_usage": True},  # the server's token counts are the truth
            **request.body(self.endpoint),
        }
        if self.temperature is not None:
            body["temperature"] = self.temperature
        return {**body, **self.extra_body}


def chunk_text(payload: dict[str, Any], endpoint: Endpoint) -> str:
    """The output text a chunk carries (chat: choices[0].delta.content, completions: choices[0].text)."""
    choices = payload.get("choices") or []
    if not choices:
        return ""
    if endpoint == "chat":
        return (choices[0].get("delta") or {}).get("content") or ""
    return choices[0].get("text") or ""


def _fail(record: RequestRecord, kind: str, detail: str) -> RequestRecord:
    record.error, record.error_detail = kind, detail[:MAX_ERROR_DETAIL_CHARS]
    return record


def _stream_error(payload: dict[str, Any]) -> str:
    error = payload.get("error")
    kind = error.get("code") or error.get("type") if isinstance(error, dict) else None
    return f"stream error: {kind or 'unknown'}"


async def send(
    client: httpx.AsyncClient, target: Target, request: BenchRequest, start: float
) -> RequestRecord:
    """Never raises for a failed request: the failure is the record's `error`, so one bad request cannot
    stop a run, and errors are counted by type."""
    import httpx

    def now() -> float:
        return time.perf_counter() - start

    record = RequestRecord(send_s=now())
    try:
        async with client.stream(
            "POST", target.url, json=target.body(request), headers=target.headers
        ) as response:
            if response.status_code != 200:
                detail = (await response.aread()).decode(errors="replace")
                return _fail(record, f"HTTP {response.status_code}", detail)
            done = False
            async for line in response.aiter_lines():
                arrived_s = now()
                if not line.startswith("data:"):
                    continue
                data = line[len("data:") :].strip()
                if data == "[DONE]":
                    done = True
                    break
                payload = json.loads(data)
                if "error" in payload:
                    return _fail(record, _stream_error(payload), data)
                if chunk_text(payload, target.endpoint):
                    record.chunk_times_s.append(arrived_s)
                if usage := payload.get("usage"):
                    record.prompt_tokens = usage.get("prompt_tokens")
                    record.output_tokens = usage.get("completion_tokens")
                    record.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
            if not done:
                _fail(record, "incomplete stream", "the connection closed before data: [DONE]")
    except httpx.HTTPError as exc:
        _fail(record, type(exc).__name__, str(exc))
    except json.JSONDecodeError as exc:
        _fail(record, "invalid SSE payload", str(exc))
    finally:
        record.end_s = now()
    return record


async def first_model(client: httpx.AsyncClient, base_url: str, api_key: str | None) -> str:
    """The first model `GET /models` lists that is not an embedding model (tokenmill's cards carry a
    "type"; other servers' cards may not): the default when --model is not given."""
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    response = await client.get(base_url.rstrip("/") + "/models", headers=headers)
    response.raise_for_status()
    models = [m for m in response.json().get("data") or [] if m.get("type") != "embedding"]
    if not models:
        raise ValueError(f"{base_url}/models lists no generative model; pass --model")
    return str(models[0]["id"])
