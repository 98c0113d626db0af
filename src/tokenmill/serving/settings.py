"""Settings of the HTTP server: built once at the edge (CLI, tests) and handed to `create_app`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from tokenmill.config import ConfigError
from tokenmill.serving.tidal import TidalSettings

SIGNUP_MODES = ("open", "invite", "closed")
"""Who may create an account in the web console: anyone, people with an invite code, or no one."""
OPENAI_COMPLETIONS_DEFAULT_MAX_TOKENS = 16
"""OpenAI's legacy /v1/completions stops at 16 tokens when a request sets no max_tokens."""


@dataclass(frozen=True, slots=True)
class CompletionLimits:
    """How long a completion may be, per model. Without a server-side default, a request that forgets
    max_tokens runs to the end of the context window (minutes of text from a small model at temperature 1)
    and is reserved and rate-limited at that worst case."""

    default_max_tokens: int | None = 1024
    """Used when a request sets no max_tokens (cut to `max_completion_tokens` and to what the context window
    has left). None: OpenAI's behaviour, chat runs until the window is full and completions stop at 16."""
    max_completion_tokens: int | None = None
    """The most a request may ask for; None: only the context window limits it."""

    def __post_init__(self) -> None:
        for name in ("default_max_tokens", "max_completion_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name}: must be at least 1, or None")


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
    completion_limits: CompletionLimits = field(default_factory=CompletionLimits)
    """For every chat model, unless `model_completion_limits` names it."""
    model_completion_limits: Mapping[str, CompletionLimits] = field(default_factory=dict)
    max_file_bytes: int = 512 * 1024 * 1024
    """The largest file one upload to /v1/files may store; refused (413) while it is read."""
    max_org_file_bytes: int = 10 * 1024 * 1024 * 1024
    """All the files of one organization together (uploads and its jobs' results)."""
    data_sweep_interval_s: int = 3600
    """How often files past their expiry or their organization's retention are deleted; 0: never (run
    `tokenmill admin sweep-data` instead)."""
    fine_tuning_price_micros: int = 1_000_000
    """The price of 1M trained tokens (tokens of the training file times epochs), in micro-units."""
    fine_tuning_workers: int = 1
    """Trainer worker processes this server keeps running; 0: none (jobs wait for a `tokenmill worker`)."""
    tidal: TidalSettings = field(default_factory=TidalSettings)
    """Batch prices and pace, and the off-peak window."""
    signup: str = "invite"
    """One of `SIGNUP_MODES`. By invitation unless the operator opens it: a server reachable from a network
    should not hand out free accounts to whoever finds it."""

    def __post_init__(self) -> None:
        if self.signup not in SIGNUP_MODES:
            raise ConfigError(f"signup: must be one of {', '.join(SIGNUP_MODES)}")
        if not 0 <= self.port <= 65535:
            raise ConfigError("port: must be in [0, 65535]")
        if self.max_body_bytes < 1024:
            raise ConfigError("max_body_bytes: must be at least 1024")
        if self.shutdown_timeout_s < 0:
            raise ConfigError("shutdown_timeout_s: must be >= 0")
        for name in ("max_file_bytes", "max_org_file_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be at least 1")
        if self.fine_tuning_price_micros < 0:
            raise ConfigError("fine_tuning_price_micros: must be >= 0")
        if not 0 <= self.fine_tuning_workers <= 64:
            raise ConfigError("fine_tuning_workers: must be from 0 to 64")
        if self.data_sweep_interval_s < 0:
            raise ConfigError("data_sweep_interval_s: must be >= 0 (0: never)")

    def limits_for(self, model: str) -> CompletionLimits:
        return self.model_completion_limits.get(model, self.completion_limits)

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


@dataclass(frozen=True, slots=True)
class LoraSpec:
    """One `--lora` value: `NAME=PATH` or `NAME=PATH@BASE`, a PEFT LoRA adapter directory served as the
    model NAME on the chat model BASE (which may be left out when the server runs one chat model)."""

    name: str
    path: str
    base: str | None = None

    @classmethod
    def parse(cls, text: str) -> LoraSpec:
        name, sep, rest = text.partition("=")
        path, at, base = rest.rpartition("@") if "@" in rest else (rest, "", "")
        if not sep or not name or not path or (at and not base):
            raise ConfigError(f"lora: {text!r} must be NAME=PATH or NAME=PATH@BASE")
        return cls(name=name, path=path, base=base or None)
