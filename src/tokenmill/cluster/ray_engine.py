"""RayEngine: an engine replica in a Ray actor (`ray_replica.EngineReplica`) on any node of a Ray cluster,
behind the same `EngineClient` as the in-process `AsyncLLM`.

It is a ProcessEngine whose worker is an actor: `RayWorker` below answers everything ProcessEngine asks of a
`WorkerProcess` (send, check, read the per-step messages, notice death, stop), so streams, aborts, stats,
the batch budget and restarts behave exactly as a worker process's. The per-step messages come through one
Ray streaming generator, read on a thread of their own; commands are actor calls.

Death: Ray fails the stream's pending item as soon as it knows the actor is dead (killed or crashed: at
once; its node lost: once Ray's health checks give the node up), which ends every request in flight on it
with EngineError. Then, as for a worker process, a new actor is created after a pause that doubles with each
failure in a row. Ray's own restarts are off (`max_restarts=0`): a restarted actor starts from nothing all
the same, the gateway would still have to notice the death and read a new stream, and `ray.kill(...,
no_restart=True)` or a lost node would bypass them anyway; one path covers every death."""

from __future__ import annotations

import itertools
import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayError

from tokenmill.cluster.process_engine import ProcessEngine
from tokenmill.cluster.protocol import WorkerInfo, WorkerOptions
from tokenmill.cluster.ray_replica import EngineReplica
from tokenmill.cluster.worker_process import CHECK_TIMEOUT_S
from tokenmill.config import ConfigError, EngineConfig
from tokenmill.engine.client import EngineError

logger = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 5.0
"""How long a cluster address may take to accept a connection before it counts as unreachable (Ray's own
client would keep retrying for much longer)."""

_connecting = threading.Lock()


@dataclass(frozen=True, slots=True)
class ReplicaResources:
    """What one replica asks of a Ray node."""

    num_cpus: float = 1
    num_gpus: float = 0
    memory_bytes: int | None = None
    """Reserved in Ray's accounting (not a limit it enforces): keeps Ray from packing replicas onto a node
    whose memory they would not fit in."""

    def __post_init__(self) -> None:
        if self.num_cpus < 0:
            raise ConfigError("num_cpus: must be at least 0")
        if self.num_gpus < 0:
            raise ConfigError("num_gpus: must be at least 0")
        if self.memory_bytes is not None and self.memory_bytes <= 0:
            raise ConfigError("memory_bytes: must be positive")

    def ray_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.memory_bytes is not None:
            options["memory"] = self.memory_bytes
        return options

    def check_cluster(self, model: str) -> None:
        """Raises ConfigError when no node of the cluster could ever host the replica: Ray itself would leave
        such an actor pending forever. (A node that could, but whose resources are taken now, is fine: the
        actor waits for them.)"""
        nodes = [node for node in ray.nodes() if node.get("Alive")]
        wanted = {"CPU": self.num_cpus, "GPU": self.num_gpus, "memory": self.memory_bytes or 0}
        if any(all(node["Resources"].get(k, 0) >= v for k, v in wanted.items()) for node in nodes):
            return
        field = {"CPU": "num_cpus", "GPU": "num_gpus", "memory": "memory_bytes"}
        short = [
            name for name, need in wanted.items() if all(n["Resources"].get(name, 0) < need for n in nodes)
        ]
        fields = ", ".join(field[name] for name in short or [n for n, need in wanted.items() if need])
        have = "; ".join(_describe(node) for node in nodes) or "no live node"
        raise ConfigError(
            f"{fields}: no node of the Ray cluster can host a replica of {model!r} asking for "
            f"{_describe_amounts(wanted)} (the nodes have: {have})"
        )


def connect(address: str | None, model: str) -> None:
    """Joins the Ray cluster at `address` ("auto", or its head's "host:port"; None: the one this process
    already joined, else Ray's own choice: RAY_ADDRESS, a cluster `ray start` began here, or a new local
    one). A process joins one cluster: once connected, later calls keep that connection."""
    if address is not None and address.startswith("ray://"):
        raise ConfigError(
            f"address: cannot start a replica of {model!r} through Ray Client ({address!r}): it cannot call "
            "the actor's streaming method; run the server on a node of the cluster and pass 'auto' or the "
            "head's host:port"
        )
    if address is not None and address != "auto":
        _probe(address, model)
    try:
        with _connecting:  # replicas are built on threads side by side: one of them connects
            if not ray.is_initialized():
                # A local start needs no dashboard: nothing of tokenmill reads it, and it costs seconds and
                # memory.
                ray.init(address=address, include_dashboard=False if address is None else None)
    except ConnectionError as error:
        # Ray's clusters ask for a token by default, and a driver given an explicit address sends the one in
        # ~/.ray/auth_token only when told to.
        hint = ""
        if address not in (None, "auto"):
            hint = "; a cluster with token authentication (Ray's default) also needs RAY_AUTH_MODE=token here"
        raise ConfigError(
            f"address: cannot start a replica of {model!r}: the Ray cluster at {address!r} could not be "
            f"joined ({error}{hint})"
        ) from None


def _probe(address: str, model: str) -> None:
    """A plain TCP connection first, so an unreachable address fails in seconds with a clear message."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=PROBE_TIMEOUT_S):
            pass
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"address: cannot start a replica of {model!r}: the Ray cluster at {address!r} could not be "
            f"reached ({error})"
        ) from None


class RayWorker:
    """The gateway's handle on one replica actor, shaped like `WorkerProcess` so ProcessEngine drives it."""

    def __init__(self, config: EngineConfig, options: WorkerOptions, resources: ReplicaResources) -> None:
        """Creates the actor and blocks until it has loaded the model (or Ray has found it a node and it has
        loaded there): call it from a worker thread. Raises the actor's own load error."""
        self.actor = EngineReplica.options(
            **resources.ray_options(),
            max_restarts=0,
            max_concurrency=2,  # the event stream and commands
        ).remote(config, options)
        self.pid: int | None = None
        self.node_id: str | None = None
        self.node_ip: str | None = None
        self._commands = itertools.count()
        self._lost = threading.Event()
        self._reader: threading.Thread | None = None
        try:
            reply = ray.get(self.actor.ready.remote())
        except RayError as error:  # died while loading: out of memory, tokenmill missing on the node, ...
            self._stop_actor()
            raise EngineError(
                f"the engine actor of {config.model.model!r} died while loading: {error}"
            ) from None
        if reply[0] == "failed":
            self._stop_actor()
            raise reply[1]
        _, info, (self.node_id, self.node_ip, self.pid) = reply
        self.info: WorkerInfo = info

    @property
    def alive(self) -> bool:
        return not self._lost.is_set()

    def start_reading(self, on_step: Callable[[tuple], None], on_lost: Callable[[], None]) -> None:
        """As `WorkerProcess.start_reading`: `on_step(message)` per step message, then `on_lost()` once the
        actor is gone, both on the reader thread."""
        events = self.actor.events.options(num_returns="streaming").remote()

        def read() -> None:
            try:
                for item in events:
                    for message in ray.get(item):
                        on_step(message)
            except RayError as error:
                if not self._lost.is_set():  # not stopped on purpose
                    logger.warning("engine actor pid %s on %s died: %s", self.pid, self.node_ip, error)
            self._lost.set()
            on_lost()

        self._reader = threading.Thread(target=read, name=f"ray-reader-{self.pid}", daemon=True)
        self._reader.start()

    def lost_error(self) -> EngineError:
        return EngineError(
            f"the engine actor (pid {self.pid} on {self.node_ip}) died; its requests were lost"
        )

    def send(self, message: tuple) -> None:
        """Thread-safe, returns at once. Raises EngineError once the actor is known to be gone; until Ray has
        said so, a message to a dead actor is lost like those in flight (the stream's end reports it)."""
        if self._lost.is_set():
            raise self.lost_error()
        self.actor.send.remote(next(self._commands), message)

    def call(self, kind: str, argument: object) -> None:
        """A check run by the actor, waited for on this (non-loop) thread: returns when it passes, raises the
        actor's InvalidRequestError when it fails, EngineError when the actor is gone."""
        if self._lost.is_set():
            raise self.lost_error()
        try:
            error = ray.get(self.actor.check.remote(kind, argument), timeout=CHECK_TIMEOUT_S)
        except GetTimeoutError:
            raise EngineError(f"the engine actor (pid {self.pid}) did not answer a {kind} check") from None
        except RayError:
            raise self.lost_error() from None
        if error is not None:
            raise error

    def stop(self, timeout_s: float) -> None:
        """Kills the actor at once: its process's end frees its memory and resources, and it has nothing to
        flush. Waits (up to `timeout_s`) until the reader has seen it go."""
        self._stop_actor()
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(timeout_s)

    def kill(self) -> None:
        """At once (a hung actor would not answer): its stream then ends, and the reader sees it gone."""
        ray.kill(self.actor, no_restart=True)

    def _stop_actor(self) -> None:
        self._lost.set()
        ray.kill(self.actor, no_restart=True)


class RayEngine(ProcessEngine):
    def __init__(
        self,
        model: str | None = None,
        *,
        address: str | None = None,
        num_cpus: float = 1,
        num_gpus: float = 0,
        memory_bytes: int | None = None,
        torch_threads: int | None = None,
        auto_restart: bool = True,
        **engine_kwargs: object,
    ) -> None:
        """As `ProcessEngine(model, torch_threads=..., auto_restart=..., **engine_kwargs)`, the worker being
        a Ray actor asking for `num_cpus`, `num_gpus` and `memory_bytes`. Connects to Ray first (`connect`).
        Slow (the actor loads the model before this returns): call it from a worker thread. Raises
        ConfigError for an unreachable cluster or a request no node can satisfy, and the engine's own load
        error (ModelLoadError, ...) for a model that does not load. `torch_threads` None: the actor's
        num_cpus (Ray sets OMP_NUM_THREADS to it)."""
        self.address = address
        self.resources = ReplicaResources(num_cpus, num_gpus, memory_bytes)
        super().__init__(model, torch_threads=torch_threads, auto_restart=auto_restart, **engine_kwargs)

    @property
    def node_id(self) -> str | None:
        """The Ray node the serving actor runs on (None while there is none)."""
        worker = self._worker
        return worker.node_id if worker is not None else None  # type: ignore[attr-defined]

    @property
    def node_ip(self) -> str | None:
        worker = self._worker
        return worker.node_ip if worker is not None else None  # type: ignore[attr-defined]

    @property
    def actor(self) -> ray.actor.ActorHandle | None:
        worker = self._worker
        return worker.actor if worker is not None else None  # type: ignore[attr-defined]

    def _new_worker(self) -> RayWorker:  # type: ignore[override]
        """An actor that has loaded the model; blocking. The cluster is checked each time: a restart may
        find it changed (a node gone)."""
        connect(self.address, self.config.model.model)
        self.resources.check_cluster(self.config.model.model)
        return RayWorker(self.config, self._options, self.resources)


def _describe(node: dict) -> str:
    return f"{node.get('NodeManagerAddress', '?')}: {_describe_amounts(node['Resources'])}"


def _describe_amounts(resources: dict[str, float]) -> str:
    mib = resources.get("memory", 0) / 2**20
    memory = f"{mib / 1024:.1f} GiB" if mib >= 1024 else f"{mib:.0f} MiB"
    return f"{resources.get('CPU', 0):g} CPU, {resources.get('GPU', 0):g} GPU, {memory} memory"
