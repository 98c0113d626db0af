"""Settings of the HTTP server: built once at the edge (CLI, tests) and handed to `create_app`."""

from __future__ import annotations

from dataclasses import dataclass

from tokenmill.config import ConfigError


@dataclass(frozen=True, slots=True)
class ServerSettings:
    host: str = "127.0.0.1"
    """Loopback by default: exposing the API to a network is a decision the operator makes explicitly."""
    port: int = 8000
    max_body_bytes: int = 8 * 1024 * 1024
    """Requests with a larger body get 413 before any of it is parsed (protects memory and the tokenizer)."""
    shutdown_timeout_s: int = 5
    """How long open streams may keep the process alive after a stop signal."""
    no_auth: bool = False
    """A private single-user deployment: no keys, no billing, no rate limits, no database; every request
    acts as the built-in `local` principal (see `deps.LOCAL_PRINCIPAL`). Off unless asked for."""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError("port: must be in [0, 65535]")
        if self.max_body_bytes < 1024:
            raise ConfigError("max_body_bytes: must be at least 1024")
        if self.shutdown_timeout_s < 0:
            raise ConfigError("shutdown_timeout_s: must be >= 0")

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """One `--model` / `--embedding-model` value: `PATH` or `ID=PATH` (PATH may be a built-in name)."""

    source: str
    model_id: str | None = None
    """The id clients send; None: the model's own name (its directory name, or the built-in name)."""

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        model_id, sep, source = text.partition("=")
        if not sep:
            return cls(source=text)
        if not model_id or not source:
            raise ConfigError(f"model: {text!r} must be PATH or ID=PATH")
        return cls(source=source, model_id=model_id)
