"""What the fleet says about each chat model: how it is deployed, the states it goes through, its status
as the operator sees it, the errors that refuse a request for it, and the check of a memory budget against
the deployments before anything loads."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
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
class Autoscaling:
    """How a model's replica count follows its demand (catalog/autoscaler.py decides)."""

    min_replicas: int = 1
    """0: an idle model is unloaded entirely, and its next request loads it again (a cold start)."""
    max_replicas: int = 1
    target_in_flight: int = 8
    """Requests per replica the count aims at: ceil(requests in flight / this) replicas are wanted."""
    scale_up_delay_s: float = 0.0
    """How long demand must want more replicas before one is added (0: at the next check)."""
    scale_down_delay_s: float = 60.0
    """... and fewer, before one is drained and removed (each further step waits as long again)."""

    def __post_init__(self) -> None:
        _require(self.min_replicas >= 0, "min_replicas", f"must not be negative, got {self.min_replicas}")
        _require(
            self.max_replicas >= max(1, self.min_replicas),
            "max_replicas",
            f"must be at least 1 and at least min_replicas ({self.min_replicas}), got {self.max_replicas}",
        )
        _require(
            self.target_in_flight >= 1, "target_in_flight", f"must be at least 1, got {self.target_in_flight}"
        )
        for name in ("scale_up_delay_s", "scale_down_delay_s"):
            _require(getattr(self, name) >= 0, name, f"must not be negative, got {getattr(self, name)}")


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
    routing: str = "prefix"
    """How a request picks among several replicas (catalog/router.py): "prefix" or "least-load"."""
    autoscaling: Autoscaling | None = None
    """None: always `num_replicas`. Set: `num_replicas` at each load, then as many as demand wants."""

    def __post_init__(self) -> None:
        _require(bool(self.model_id), "model_id", "must not be empty")
        _require(self.memory_bytes >= 0, "memory_bytes", f"must not be negative, got {self.memory_bytes}")
        _require(self.num_replicas >= 1, "num_replicas", f"must be at least 1, got {self.num_replicas}")
        _require(self.max_running >= 1, "max_running", f"must be at least 1, got {self.max_running}")
        _require(self.max_queue >= 0, "max_queue", f"must not be negative, got {self.max_queue}")
        scaling = self.autoscaling
        if scaling is not None:
            _require(
                max(1, scaling.min_replicas) <= self.num_replicas <= scaling.max_replicas,
                "num_replicas",
                f"must lie between min_replicas and max_replicas, got {self.num_replicas}",
            )
            _require(
                not (self.pinned and scaling.min_replicas == 0),
                "min_replicas",
                "0 unloads an idle model, which a pinned model never is",
            )

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
    healthy: bool = True
    draining: bool = False
    """Being removed: it takes no new requests and stops once its open ones end."""
    pid: int | None = None
    """Its engine's process (None: the server's own, or while it restarts)."""
    node: str | None = None
    """The Ray node it runs on (None: this machine)."""
    prompt_tokens: int = 0
    """Since the replica started: prompt tokens admitted, of which found in its prefix cache."""
    cached_prompt_tokens: int = 0


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
    routing: str = "prefix"
    autoscaling: Autoscaling | None = None
    last_scaling: str | None = None
    """The autoscaler's last decision for the model, as it was logged."""
    num_scale_ups: int = 0
    num_scale_downs: int = 0
    """Replicas added and removed by the autoscaler (an unload to zero counts as a scale-down)."""

    @property
    def prefix_cache_hit_rate(self) -> float | None:
        return prefix_cache_hit_rate(self.replicas)


def prefix_cache_hit_rate(replicas: Iterable[ReplicaStatus]) -> float | None:
    """The share of the replicas' prompt tokens their prefix caches served (None before any)."""
    replicas = list(replicas)
    prompt = sum(r.prompt_tokens for r in replicas)
    return sum(r.cached_prompt_tokens for r in replicas) / prompt if prompt else None


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
