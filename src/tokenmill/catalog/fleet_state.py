"""What the fleet holds for each chat model while it serves: `ManagedModel` (its deployment, state, memory
booked and scaling), `Instance` (one load of it: the replica pool and the requests holding it) and `Ticket`
(one request's hold on a loaded model, which routes the request to a replica and may move it to another
before its first output)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tokenmill.catalog.autoscaler import Scaler
from tokenmill.catalog.fleet_model import ModelDeployment, ModelState
from tokenmill.catalog.router import Assignment, ModelOverloaded, Replica, ReplicaPool
from tokenmill.engine.client import EngineClient

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from tokenmill.engine.lora import LoRARequest
    from tokenmill.engine.request import RequestOutput


@dataclass(eq=False)
class Instance:
    """One load of a model. Tickets hold the instance, not the model, so a ticket that outlives a forced
    drain releases into the old instance and never miscounts a later load."""

    pool: ReplicaPool
    loaded_at_s: float
    open_tickets: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.idle.set()

    @property
    def engines(self) -> list[EngineClient]:
        return [r.engine for r in self.pool.replicas]


@dataclass(eq=False)
class ManagedModel:
    deployment: ModelDeployment
    state: ModelState = ModelState.UNLOADED
    reason: str | None = None
    instance: Instance | None = None
    reserved_bytes: int = 0
    """Memory counted against the budget: set when a load is decided, cleared once the engines are down."""
    last_used_s: float | None = None
    num_loads: int = 0
    last_load_s: float | None = None
    load_task: asyncio.Task[None] | None = None
    stop_task: asyncio.Task[None] | None = None
    routing: str = ""
    """How requests pick a replica: the deployment's, until an operator changes it (`set_routing`)."""
    scaler: Scaler | None = None
    """Set at each load of a model with an autoscaling policy (demand before a load says nothing now)."""
    scale_task: asyncio.Task[None] | None = None
    """Replicas being added or drained: the autoscaler decides nothing else for the model meanwhile."""
    last_scaling: str | None = None
    num_scale_ups: int = 0
    num_scale_downs: int = 0

    def __post_init__(self) -> None:
        self.routing = self.routing or self.deployment.routing

    @property
    def scaling(self) -> bool:
        return self.scale_task is not None and not self.scale_task.done()

    @property
    def model_id(self) -> str:
        return self.deployment.model_id

    def recency_s(self) -> float:
        """A fresh load counts as a use, so a model is not evicted before its first request reaches it."""
        loaded_at = self.instance.loaded_at_s if self.instance else float("-inf")
        return max(loaded_at, self.last_used_s if self.last_used_s is not None else float("-inf"))


class Ticket:
    """One request's hold on a loaded model, from checkout until `release` (call it on every path that ends
    the request; a second call does nothing). It routes the request to a replica at most once."""

    def __init__(self, model: ManagedModel, instance: Instance, clock: Callable[[], float]) -> None:
        engine = instance.pool.replicas[0].engine
        self.model_id: str = model.model_id
        self.tokenizer: PreTrainedTokenizerBase = engine.tokenizer
        self.max_model_len: int = engine.max_model_len
        self._model = model
        self._instance = instance
        self._clock = clock
        self._assignment: Assignment | None = None
        self._request: tuple[int, int, Sequence[int] | None] = (0, 1, None)
        """What `assign` was asked: `reroute` asks the same of another replica."""
        self._session: str | None = None
        self._failed: list[Replica] = []
        self._released = False
        self.lora: LoRARequest | None = None
        """Set for an adapter model's request: the adapter its base model's engine applies."""
        instance.open_tickets += 1
        instance.idle.clear()
        model.last_used_s = clock()

    def check_fits(self, num_prompt_tokens: int, max_tokens: int) -> None:
        """Replicas of one model share its context length, so the first one answers for all."""
        self._instance.pool.replicas[0].engine.check_fits(num_prompt_tokens, max_tokens)

    def check_room(self, num_seqs: int = 1) -> None:
        """`ModelOverloaded` at once when every replica is full (before the request is even tokenized)."""
        self._instance.pool.check_room(num_seqs)

    def assign(
        self,
        work_tokens: int,
        num_seqs: int = 1,
        prompt_ids: Sequence[int] | None = None,
        session: str | None = None,
    ) -> EngineClient:
        """The replica to run the request on (`prompt_ids`: for prefix routing, `session`: the request's
        `user`, for session routing); raises `ModelOverloaded` when every replica is full."""
        if self._released:
            raise RuntimeError(f"the ticket for {self.model_id!r} was already released")
        if self._assignment is not None:
            raise RuntimeError(f"the ticket for {self.model_id!r} was already assigned a replica")
        self._request = (work_tokens, num_seqs, prompt_ids)
        self._session = session
        self._assignment = self._instance.pool.assign(
            work_tokens, num_seqs, prompt_ids, self._salt, session=session
        )
        return self._assignment.engine

    def reroute(self, failed: EngineClient) -> EngineClient | None:
        """Another replica for a request whose replica failed (EngineError) before its first output, or
        None when no other one has room. Each replica is tried once; a request of several prompts moves
        once, and its other prompts follow to where the first one went."""
        assignment = self._assignment
        if self._released or assignment is None:
            return None
        if assignment.engine is not failed:
            return assignment.engine
        self._failed.append(assignment.replica)
        try:
            moved = self._instance.pool.assign(
                *self._request, self._salt, exclude=self._failed, session=self._session
            )
        except ModelOverloaded:
            return None
        assignment.release()
        self._assignment = moved
        return moved.engine

    def prompt_done(self, first: RequestOutput) -> None:
        """A prompt's first output: the tokens it computed are work its replica no longer has ahead."""
        if self._assignment is not None:
            self._assignment.done(len(first.prompt_token_ids) - first.num_cached_tokens)

    @property
    def _salt(self) -> str | None:
        """Adapters' requests share no KV with the base model's, so they have prefixes of their own."""
        return None if self.lora is None else self.lora.name

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        if self._assignment is not None:
            self._assignment.release()
        self._instance.open_tickets -= 1
        if self._instance.open_tickets == 0:
            self._instance.idle.set()
        self._model.last_used_s = self._clock()

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()
