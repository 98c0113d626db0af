"""Frozen configuration, one dataclass per component. Built once at the edge (CLI, `LLM(...)`) and passed
down; nothing writes back into a config. Environment variables are read here and nowhere else."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

_DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A setting that cannot work; the message names the field."""


def _require(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: {message}")


def default_data_dir() -> Path:
    return Path(os.environ.get("TOKENMILL_DATA_DIR", Path.home() / ".tokenmill"))


def default_database_url() -> str | None:
    return os.environ.get("TOKENMILL_DATABASE_URL")


def default_redis_url() -> str | None:
    return os.environ.get("TOKENMILL_REDIS_URL")


def default_api_key() -> str | None:
    """The key clients of a server (`tokenmill chat`) use unless given one: $TOKENMILL_KEY, as the README
    exports it, else $OPENAI_API_KEY, as the openai SDK reads it."""
    return next(
        (os.environ[name] for name in ("TOKENMILL_KEY", "OPENAI_API_KEY") if os.environ.get(name)), None
    )


def chat_template_text(value: str) -> str | None:
    """The template `value` names: the content of the file at that path, or `value` itself when it is
    template text; None when it is neither."""
    path = Path(value).expanduser()
    if "{{" not in value and "{%" not in value:
        try:
            value = path.read_text(encoding="utf-8")
        except (OSError, ValueError):
            return None
    return value if "{{" in value or "{%" in value else None


@dataclass(frozen=True, slots=True)
class ModelConfig:
    model: str = "smollm2"
    """A Hugging Face model directory, a `.gguf` file, or a built-in name ("smollm2")."""
    dtype: str = "auto"
    """"auto": bfloat16 on CPUs that compute it natively (about twice as fast as float32) and on GPUs, else
    float32; or a torch dtype name. Comparisons with a float32 reference ask for "float32"."""
    max_model_len: int | None = None
    """Context window; defaults to the model's own."""
    device: str = "auto"
    seed: int = 0
    """Seed for requests that bring none of their own."""
    attention_backend: str = "auto"
    """"kernel": the C decode kernel (CPU only); "torch": torch ops only; "auto": the kernel where it
    applies and compiles, else torch."""
    cpu_kernels: str = "auto"
    """"kernel": the C kernels for a decode step's operators (few-row matrix products on CPUs with AVX-512
    or AVX2; fused residual + RMSNorm, rotary, SiLU * up), and a Llama-family model's whole decode step in
    one call; "per-op": the same kernels called one operator at a time from Python (for comparisons and
    debugging); "torch": torch ops only; "auto": "kernel" where the kernels compile, else torch."""
    quantization: str = "none"
    """"int8": int8 weights with a scale per output row, quantized at load: half the bytes a decode step
    reads (models/quantization.py; `tokenmill bench quality` measures the cost); "none": as loaded."""
    chat_template: str | None = None
    """A Jinja chat template, as text or the path of a file holding it: for a base model whose tokenizer has
    none (Gemma 3 270M; without one it serves completions only), or in place of the tokenizer's own."""

    def __post_init__(self) -> None:
        _require(bool(self.model), "model", "must name a directory, a .gguf file or a built-in model")
        _require(self.dtype == "auto" or self.dtype in _DTYPES, "dtype", f"must be auto or one of {_DTYPES}")
        _require(self.max_model_len is None or self.max_model_len >= 16, "max_model_len", "must be >= 16")
        _require(
            self.attention_backend in ("auto", "kernel", "torch"),
            "attention_backend",
            "must be auto, kernel or torch",
        )
        _require(self.quantization in ("none", "int8"), "quantization", "must be none or int8")
        _require(
            self.chat_template is None or chat_template_text(self.chat_template) is not None,
            "chat_template",
            "must be Jinja template text (with {{ or {%) or the path of a file holding one",
        )
        _require(
            self.cpu_kernels in ("auto", "kernel", "per-op", "torch"),
            "cpu_kernels",
            "must be auto, kernel, per-op or torch",
        )
        _require(
            self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
            "device",
            "must be auto, cpu or cuda[:N]",
        )


@dataclass(frozen=True, slots=True)
class CacheConfig:
    block_size: int = 16
    """Tokens per KV block: the unit of allocation and of prefix sharing."""
    kv_cache_memory: int | None = None
    """Bytes for the KV pool; when None, room for one full context or `max_num_seqs` sequences of 128 tokens,
    whichever is more (see `engine.setup.KV_TOKENS_PER_SEQ`), but at most `kv_cache_fraction` of the memory
    free at start."""
    kv_cache_fraction: float = 0.2
    num_blocks: int | None = None
    """Exact pool size in blocks (tests use it to force preemption); overrides the memory budget."""
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        _require(
            self.block_size in (1, 2, 4, 8, 16, 32, 64, 128), "block_size", "must be a power of 2 <= 128"
        )
        _require(self.kv_cache_memory is None or self.kv_cache_memory > 0, "kv_cache_memory", "must be > 0")
        _require(0.0 < self.kv_cache_fraction <= 0.95, "kv_cache_fraction", "must be in (0, 0.95]")
        _require(self.num_blocks is None or self.num_blocks >= 1, "num_blocks", "must be >= 1")


@dataclass(frozen=True, slots=True)
class BatchBudget:
    """How much of the engine's steps batch work (Batch API lines) may take. Live work always comes first;
    these bound what batch work adds, because a step cannot be interrupted: a live request that arrives
    waits for the step under way, and live streams wait for every step they share."""

    max_slowdown: float = 0.03
    """Batch work may make a step that serves live requests at most this much slower than the live work
    alone would be (0.03: 3%; at 10% live TPOT rose 17% on a 2-core VM, the rest being the batch's own
    work on the CPU beside the engine), judged by the engine's own measured step costs (`StepCosts`): on a CPU a
    few extra rows are nearly free while a step is bound by reading the weights, and not once it is bound
    by arithmetic, which depends on the machine. 0: batch work pauses while live work runs."""
    fill_tokens: int = 16
    """And it never adds more than this many tokens to such a step."""
    idle_tokens: int = 16
    """The most batch tokens in a step with no live work: short enough that a live request arriving
    meanwhile waits little for it (at 32, live TTFT rose 21%; at 16, 3%), long enough for efficient
    prefill."""

    def __post_init__(self) -> None:
        for name in ("fill_tokens", "idle_tokens"):
            value = getattr(self, name)
            _require(type(value) is int and value >= 0, f"batch_budget.{name}", "must be an integer >= 0")
        _require(0.0 <= self.max_slowdown <= 10.0, "batch_budget.max_slowdown", "must be from 0 to 10")


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 512
    """Token budget of one forward pass (decodes plus prefill chunks)."""
    max_num_seqs: int = 64
    """Sequences running at once."""
    target_tpot_ms: float = 0.0
    """While streams decode, steps take only as many prompt tokens (new prompts, chunks of long ones) as keep
    the streams at this many milliseconds a token on average, by the engine's measured step costs
    (`step_costs.TpotPacer`): e.g. 40 keeps them near 25 tokens/s while prompts wait their turn. 0 (the
    default): throughput mode, every step fills the token budget, the most tokens/s and the shortest TTFT,
    and streams slow down while prompts are computed. A target pays while the machine has room to spare; an
    overloaded one (more prompts than it can compute at the target) trades TTFT for it."""
    batch_budget: BatchBudget = field(default_factory=lambda: BatchBudget())

    def __post_init__(self) -> None:
        _require(self.max_num_batched_tokens >= 1, "max_num_batched_tokens", "must be >= 1")
        _require(self.max_num_seqs >= 1, "max_num_seqs", "must be >= 1")
        _require(
            type(self.target_tpot_ms) in (int, float) and 0 <= self.target_tpot_ms <= 60_000,
            "target_tpot_ms",
            "must be from 0 (throughput mode) to 60000",
        )


@dataclass(frozen=True, slots=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    max_loras: int = 8
    """LoRA adapters held in memory at once (slots); more adapters in use take turns, least recently used
    first. Slot memory is allocated when the first adapter loads, so a base-only engine pays nothing."""
    max_lora_rank: int = 64
    """Largest adapter rank accepted; smaller ranks are zero-padded to the largest one loaded."""

    def __post_init__(self) -> None:
        _require(isinstance(self.max_loras, int) and self.max_loras >= 1, "max_loras", "must be >= 1")
        _require(
            isinstance(self.max_lora_rank, int) and 1 <= self.max_lora_rank <= 1024,
            "max_lora_rank",
            "must be an integer from 1 to 1024",
        )

    @classmethod
    def from_kwargs(cls, model: str | None = None, **kwargs: object) -> EngineConfig:
        """`LLM(model, dtype=..., block_size=...)`: route each keyword to the component that owns it."""
        parts: dict[type, dict[str, object]] = {ModelConfig: {}, CacheConfig: {}, SchedulerConfig: {}}
        own: dict[str, object] = {}
        if model is not None:
            parts[ModelConfig]["model"] = model
        for key, value in kwargs.items():
            if key in ("max_loras", "max_lora_rank"):
                own[key] = value
                continue
            owner = next((c for c in parts if key in {f.name for f in fields(c)}), None)
            if owner is None:
                raise ConfigError(f"{key}: unknown engine setting")
            parts[owner][key] = value
        return cls(
            model=ModelConfig(**parts[ModelConfig]),  # type: ignore[arg-type]
            cache=CacheConfig(**parts[CacheConfig]),  # type: ignore[arg-type]
            scheduler=SchedulerConfig(**parts[SchedulerConfig]),  # type: ignore[arg-type]
            **own,  # type: ignore[arg-type]
        )
