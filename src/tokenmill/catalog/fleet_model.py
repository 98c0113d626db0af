"""What the fleet says about each chat model: how it is deployed, the states it goes through, its status
as the operator sees it, the errors that refuse a request for it, and the check of a memory budget against
the deployments before anything loads."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from tokenmill.config import ConfigError
from tokenmill.engine.client import EngineClient


class ModelState(StrEnum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    LOADED = "loaded"
    DRAINING = "draining"
    STOPPED = "stopped"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class ModelDeployment:
    model_id: str
    memory_bytes: int
    """Weights plus KV cache of one replica, estimated before loading (the budget is checked against it)."""
    make_replica: Callable[[], EngineClient]
    """Builds one replica's engine; synchronous and slow (it reads weights), so it runs in a worker thread."""
    pinned: bool = False
    """Loaded at start and never unloaded to make room for another model (an operator may still unload it)."""
    num_replicas: int = 1
    max_running: int = 8
    """Sequences one replica runs at once: its engine's max_num_seqs."""
    max_queue: int = 16
    """Sequences one replica lets wait beyond those; past that it is full and requests are refused."""

    def __post_init__(self) -> None:
        _require(bool(self.model_id), "model_id", "must not be empty")
        _require(self.memory_bytes >= 0, "memory_bytes", f"must not be negative, got {self.memory_bytes}")
        _require(self.num_replicas >= 1, "num_replicas", f"must be at least 1, got {self.num_replicas}")
        _require(self.max_running >= 1, "max_running", f"must be at least 1, got {self.max_running}")
        _require(self.max_queue >= 0, "max_queue", f"must not be negative, got {self.max_queue}")

    @property
    def total_memory_bytes(self) -> int:
        return self.memory_bytes * self.num_replicas


class UnknownModel(LookupError):
    def __init__(self, model: str) -> None:
        super().__init__(f"The model {model!r} does not exist.")
        self.model = model


class ModelUnavailable(Exception):
    """The model exists but cannot take requests now; `retry_after_s` is set when waiting will help."""

    def __init__(self, model: str, state: ModelState, reason: str, retry_after_s: int | None = None) -> None:
        super().__init__(f"The model {model!r} is unavailable: {reason}.")
        self.model = model
        self.state = state
        self.reason = reason
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class ReplicaStatus:
    index: int
    running_seqs: int
    waiting_seqs: int
    in_flight_seqs: int
    """Sequences the router has assigned and not seen released (running, queued, or not yet submitted)."""
    outstanding_tokens: int
    kv_cache_usage: float


@dataclass(frozen=True)
class ModelStatus:
    model_id: str
    state: ModelState
    reason: str | None
    pinned: bool
    memory_bytes: int
    """All replicas together."""
    in_flight: int
    """Open tickets: requests holding the model."""
    idle_s: float | None
    """Seconds since the last request ended (0 while one is open); None if it was never used."""
    num_loads: int
    last_load_s: float | None
    replicas: tuple[ReplicaStatus, ...]


def check_budget(deployments: Sequence[ModelDeployment], budget: int | None) -> None:
    """Refuses at start what could never work: a model that can never load, pinned models that cannot all
    be loaded together, or two deployments answering to one id."""
    seen: set[str] = set()
    for d in deployments:
        _require(d.model_id not in seen, "models", f"the model id {d.model_id!r} is deployed twice")
        seen.add(d.model_id)
    if budget is None or not deployments:
        return
    _require(budget > 0, "memory_budget", f"must be positive, got {budget}")
    smallest = min(deployments, key=lambda d: d.total_memory_bytes)
    _require(
        smallest.total_memory_bytes <= budget,
        "memory_budget",
        f"{format_bytes(budget)} is smaller than the smallest model, {smallest.model_id} "
        f"({format_bytes(smallest.total_memory_bytes)})",
    )
    for d in deployments:
        _require(
            d.total_memory_bytes <= budget,
            "memory_budget",
            f"{format_bytes(budget)} is smaller than the model {d.model_id} "
            f"({format_bytes(d.total_memory_bytes)}), which could never load",
        )
    pinned = [d for d in deployments if d.pinned]
    pinned_bytes = sum(d.total_memory_bytes for d in pinned)
    _require(
        pinned_bytes <= budget,
        "memory_budget",
        f"the pinned models ({', '.join(d.model_id for d in pinned)}) need {format_bytes(pinned_bytes)} "
        f"together, more than the {format_bytes(budget)} budget",
    )


def _require(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: {message}")


def format_bytes(num_bytes: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if num_bytes >= size:
            return f"{round(num_bytes / size, 1):g} {unit}"
    return f"{num_bytes} bytes"
