"""The request log: what the client saw of one request, with times on its own clock. Every metric of
`tokenmill bench serve` is a pure function of a list of these, so the math is testable without a server."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class RequestRecord:
    """Times are seconds from the start of the load point (`time.perf_counter` based). A record with
    `error` set failed; its other fields say how far it got."""

    send_s: float
    """When the request left the client (just before the HTTP call)."""
    end_s: float = 0.0
    """When the stream ended ([DONE], an error, or the connection closed)."""
    chunk_times_s: list[float] = field(default_factory=list)
    """Arrival time of each streamed chunk that carried output text; the first is the first token."""
    prompt_tokens: int | None = None
    """From the server's final `usage` (None: the server sent no usage)."""
    output_tokens: int | None = None
    """`usage.completion_tokens` (None: the server sent no usage)."""
    cached_tokens: int | None = None
    """`usage.prompt_tokens_details.cached_tokens`, when the server reports prefix-cache hits."""
    error: str | None = None
    """The failure's type: "HTTP 429", "ReadTimeout", "stream error: <code>", ...; None on success."""
    error_detail: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def first_token_s(self) -> float | None:
        return self.chunk_times_s[0] if self.chunk_times_s else None

    @property
    def streamed_tokens(self) -> int:
        """The client's own count: one token per text-bearing chunk. A server that merges several tokens
        into one chunk (or holds back a partial UTF-8 character) makes this differ from `usage`."""
        return len(self.chunk_times_s)

    @property
    def num_output_tokens(self) -> int:
        """The server's count when it sent one (the truth for billing), else the client's."""
        return self.output_tokens if self.output_tokens is not None else self.streamed_tokens
