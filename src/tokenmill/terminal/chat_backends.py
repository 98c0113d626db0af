"""The two ways `tokenmill chat` reaches a model, behind one `ChatBackend`: an OpenAI-compatible server over
HTTP (streamed server-sent events), or a model loaded into this process through AsyncLLM. Either way, closing a
reply's iterator early stops the generation, so Ctrl-C frees the model's work at once."""

from __future__ import annotations

import asyncio
import json
import queue
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import httpx

if TYPE_CHECKING:
    from tokenmill.engine.async_engine import AsyncLLM
    from tokenmill.engine.sampling_params import SamplingParams

CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 600.0
"""Long: a busy server may queue a request for a while before its first token."""
MAX_ERROR_CHARS = 300


class ChatError(Exception):
    """A failure the user reads as one line (an API error, an unreachable server, a conversation too long for
    the model); the conversation can go on after it."""


@dataclass(frozen=True, slots=True)
class Message:
    role: str
    """"system", "user" or "assistant"."""
    content: str


@dataclass(frozen=True, slots=True)
class ReplyParams:
    temperature: float
    max_tokens: int


class ChatBackend(Protocol):
    """`stream` yields a reply's text piece by piece, as the model produces it. Closing the iterator before it
    ends (the REPL does on Ctrl-C) must stop the generation; failures are raised as ChatError."""

    model: str

    def stream(self, messages: list[Message], params: ReplyParams) -> Iterator[str]: ...

    def close(self) -> None: ...


def _one_line(text: str) -> str:
    return " ".join(text.split())[:MAX_ERROR_CHARS]


# -- over HTTP -------------------------------------------------------------------------------------


class HttpChatBackend:
    def __init__(self, client: httpx.Client, base_url: str, model: str) -> None:
        self._client = client
        self.base_url = base_url
        self.model = model

    @classmethod
    def open(cls, base_url: str, api_key: str | None, model: str | None) -> HttpChatBackend:
        """Without a model id, the server's first chat model: what a newcomer means by "the model"."""
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        client = httpx.Client(headers=headers, timeout=httpx.Timeout(CONNECT_TIMEOUT_S, read=READ_TIMEOUT_S))
        backend = cls(client, base_url.rstrip("/"), model or "")
        try:
            backend.model = model or backend._first_chat_model()
        except BaseException:
            client.close()
            raise
        return backend

    def stream(self, messages: list[Message], params: ReplyParams) -> Iterator[str]:
        body = {
            "model": self.model,
            "messages": [{"role": m.role, "content": m.content} for m in messages],
            "stream": True,
            "temperature": params.temperature,
            "max_tokens": params.max_tokens,
        }
        try:
            # Leaving this block early closes the connection: the server sees the disconnect and aborts.
            with self._client.stream("POST", f"{self.base_url}/chat/completions", json=body) as response:
                if response.status_code != 200:
                    response.read()
                    raise ChatError(_api_error(response))
                yield from _sse_texts(response.iter_lines())
        except httpx.HTTPError as exc:
            raise ChatError(self._describe(exc)) from exc

    def close(self) -> None:
        self._client.close()

    def _first_chat_model(self) -> str:
        try:
            response = self._client.get(f"{self.base_url}/models")
        except httpx.HTTPError as exc:
            raise ChatError(self._describe(exc)) from exc
        if response.status_code != 200:
            raise ChatError(_api_error(response))
        try:
            cards = response.json()["data"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ChatError(f"{self.base_url}/models did not answer with a model list") from exc
        # Other OpenAI-compatible servers give no `type`: their models are taken to be chat models.
        chat = [card["id"] for card in cards if card.get("type", "chat") == "chat"]
        if not chat:
            raise ChatError(f"{self.base_url} serves no chat model")
        return chat[0]

    def _describe(self, exc: httpx.HTTPError) -> str:
        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
            return f"cannot reach {self.base_url} ({_one_line(str(exc)) or type(exc).__name__})"
        return f"{self.base_url}: {type(exc).__name__}: {_one_line(str(exc))}"


def _api_error(response: httpx.Response) -> str:
    """OpenAI's error body `{"error": {"message": ...}}` when there is one, else the start of the body."""
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text
    return f"{_one_line(str(message))} (HTTP {response.status_code})"


def _sse_texts(lines: Iterable[str]) -> Iterator[str]:
    """`data: {chunk}` lines -> choices[0].delta.content, up to `data: [DONE]`; an error event raises."""
    for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[len("data:") :].strip()
        if data == "[DONE]":
            return
        try:
            payload: dict[str, Any] = json.loads(data)
        except ValueError as exc:
            raise ChatError(f"the server sent an unreadable event: {_one_line(data)}") from exc
        if "error" in payload:
            error = payload["error"]
            raise ChatError(_one_line(str(error.get("message") if isinstance(error, dict) else error)))
        choices = payload.get("choices") or [{}]
        text = (choices[0].get("delta") or {}).get("content")
        if text:
            yield text
    raise ChatError("the server closed the stream before the reply ended")


# -- in this process -------------------------------------------------------------------------------


class LocalChatBackend:
    """AsyncLLM runs on an event loop in a daemon thread; the REPL's thread reads the reply through a queue.
    Ctrl-C reaches the REPL's thread, which cancels the request's task: AsyncLLM then aborts the request."""

    def __init__(self, engine: AsyncLLM, loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
        self._engine = engine
        self._loop = loop
        self._thread = thread
        self._num_requests = 0
        self.model = engine.model_id

    @classmethod
    def open(cls, model: str, engine_kwargs: Mapping[str, object]) -> LocalChatBackend:
        from tokenmill.engine.async_engine import AsyncLLM  # torch: only when a model is loaded here

        engine = AsyncLLM(model, **engine_kwargs)
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="chat-engine-loop", daemon=True)
        thread.start()
        asyncio.run_coroutine_threadsafe(engine.start(), loop).result()
        return cls(engine, loop, thread)

    def stream(self, messages: list[Message], params: ReplyParams) -> Iterator[str]:
        from tokenmill.engine.sampling_params import SamplingParams

        prompt_ids = self._render(messages)
        sampling = SamplingParams(temperature=params.temperature, max_tokens=params.max_tokens)
        self._num_requests += 1
        pieces: queue.SimpleQueue[str | Exception | None] = queue.SimpleQueue()
        generation = self._generate(prompt_ids, sampling, f"chat-{self._num_requests}", pieces)
        task = asyncio.run_coroutine_threadsafe(generation, self._loop)
        try:
            while (piece := pieces.get()) is not None:
                if isinstance(piece, Exception):
                    raise piece
                yield piece
        finally:
            task.cancel()  # a no-op once the reply is complete

    def close(self) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self._engine.shutdown(), self._loop).result()
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()

    def _render(self, messages: list[Message]) -> list[int]:
        """The server's own rendering, so a local chat sees exactly the prompt `tokenmill serve` would build."""
        from tokenmill.serving.errors import APIError
        from tokenmill.serving.prompts import render_chat
        from tokenmill.serving.protocol import ChatMessage

        chat = [ChatMessage(role=m.role, content=m.content) for m in messages]  # type: ignore[arg-type]
        try:
            return render_chat(self._engine.tokenizer, chat, self.model)
        except APIError as exc:
            raise ChatError(exc.message) from exc

    async def _generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str, pieces: queue.SimpleQueue
    ) -> None:
        """Snapshots are cumulative: only the new text goes to the REPL. Cancelling this task leaves the
        engine's stream early, which is AsyncLLM's abort."""
        from tokenmill.engine.client import EngineError
        from tokenmill.engine.sampling_params import InvalidRequestError

        shown = ""
        try:
            async with aclosing(self._engine.generate(prompt_ids, params, request_id)) as outputs:
                async for output in outputs:
                    text = output.outputs[0].text
                    if len(text) > len(shown):
                        pieces.put(text[len(shown) :])
                        shown = text
        except (InvalidRequestError, EngineError) as exc:  # e.g. the conversation outgrew the context window
            pieces.put(ChatError(_one_line(str(exc))))
        except Exception as exc:  # noqa: BLE001 - a bug: raised again in the REPL's thread, with its traceback
            pieces.put(exc)
        finally:
            pieces.put(None)
