"""`tokenmill doctor`: what this machine offers and what `tokenmill serve` would do on it, with the same flags,
before anything is loaded or written: Python and torch, the CPU, free memory, the C compiler of the decode
kernel, the built-in models, the database and Redis, and each model's plan (dtype, context, KV cache, the
memory it will take, and why). Every problem comes with the command that fixes it."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import make_url

from tokenmill.platform.gateway import PlatformSettings
from tokenmill.serving.settings import ModelSpec

RUNTIME_OVERHEAD_BYTES = 700 * 2**20
"""Python, torch, the tokenizers, the GGUF reader and the server around the models: what a default
`tokenmill serve` holds beyond its weights and KV cache (1.6 GiB peak in all, measured on 2026-11-30)."""


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    detail: str


def run_doctor(
    platform_settings: PlatformSettings,
    chat_models: list[ModelSpec],
    embedding_models: list[ModelSpec],
    engine_kwargs: Mapping[str, object],
    no_auth: bool,
) -> int:
    """Prints one line per check; 0 when `serve` would start with these settings, else 1."""
    checks: list[Check] = [_python(), _torch(), _cpu(), _memory(), _compiler()]
    planned_bytes = RUNTIME_OVERHEAD_BYTES
    for spec in chat_models:
        check, num_bytes = _chat_model(spec, engine_kwargs)
        checks.append(check)
        planned_bytes += num_bytes
    for spec in embedding_models:
        check, num_bytes = _embedding_model(spec)
        checks.append(check)
        planned_bytes += num_bytes
    checks.append(Check("serve needs", True, f"about {_gib(planned_bytes)} of memory with these settings"))
    if no_auth:
        checks.append(Check("database", True, "none: --no-auth serves without accounts or billing"))
    else:
        checks.append(_database(platform_settings))
        checks.append(_redis(platform_settings.redis_url))
    width = max(len(check.name) for check in checks)
    for check in checks:
        print(f"{'ok ' if check.ok else 'NO '} {check.name.ljust(width)}  {check.detail}")
    failed = [check.name for check in checks if not check.ok]
    print(f"\n{'problems: ' + ', '.join(failed) if failed else 'ready: tokenmill serve will start'}")
    return 1 if failed else 0


def _guarded(name: str, probe: Callable[[], Check]) -> Check:
    try:
        return probe()
    except Exception as exc:  # noqa: BLE001 - a doctor reports what it finds, it does not stop at it
        return Check(name, False, f"{type(exc).__name__}: {exc}")


def _python() -> Check:
    try:
        tokenmill = importlib.metadata.version("tokenmill")
    except importlib.metadata.PackageNotFoundError:
        tokenmill = "(not installed as a package)"
    detail = f"{platform.python_version()} at {sys.executable}; tokenmill {tokenmill}"
    return Check("python", sys.version_info >= (3, 11), detail)


def _torch() -> Check:
    import torch

    cuda = (
        f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s)"
        if torch.cuda.is_available()
        else "no GPU"
    )
    return Check("torch", True, f"{torch.__version__}, {torch.get_num_threads()} threads, {cuda}")


def _cpu() -> Check:
    import torch

    from tokenmill.engine.hardware import native_bf16_flag

    flag = native_bf16_flag()
    bf16 = f"native bfloat16 ({flag})" if flag else "no native bfloat16"
    capability = torch.backends.cpu.get_cpu_capability()
    return Check("cpu", True, f"{platform.machine()}, {capability}, {bf16}")


def _memory() -> Check:
    import torch

    from tokenmill.engine.hardware import free_memory_bytes

    free = free_memory_bytes(torch.device("cpu"))
    return Check("memory", free is not None, "unknown" if free is None else f"{_gib(free)} available")


def _compiler() -> Check:
    compiler = shutil.which("cc") or shutil.which("gcc")
    detail = (
        f"{compiler}: the CPU kernels (decode attention, decode products, fused norms) are built on first use"
        if compiler
        else "no C compiler: decode runs on torch ops (slower); install gcc"
    )
    return Check("c compiler", True, detail)


def _chat_model(spec: ModelSpec, engine_kwargs: Mapping[str, object]) -> tuple[Check, int]:
    from tokenmill.config import EngineConfig
    from tokenmill.engine.setup import plan_engine

    name = f"chat model {spec.model_id or spec.source}"
    try:
        plan = plan_engine(EngineConfig.from_kwargs(spec.source, **engine_kwargs))
    except (ValueError, FileNotFoundError) as exc:
        return Check(name, False, str(exc)), 0
    where = plan.source.path / (plan.source.gguf_file or "")
    detail = f"{where}: {_gib(plan.weight_bytes)} of weights, {plan.describe()}"
    return Check(name, True, detail), plan.weight_bytes + plan.kv_cache_bytes


def _embedding_model(spec: ModelSpec) -> tuple[Check, int]:
    from tokenmill.engine.embedder import Embedder

    name = f"embedding model {spec.model_id or spec.source}"
    try:
        embedder = Embedder(spec.source, model_id=spec.model_id)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        return Check(name, False, str(exc)), 0
    weights = sum(path.stat().st_size for path in Path(embedder.path).glob("*.safetensors"))
    detail = (
        f"{embedder.path}: {_gib(weights)} of weights, {embedder.dimensions} dimensions, "
        f"at most {embedder.max_input_tokens} tokens per input"
    )
    return Check(name, True, detail), weights


def _database(settings: PlatformSettings) -> Check:
    """Looks without writing: a SQLite file that does not exist yet is created by the first `serve`."""
    url = make_url(settings.resolved_database_url)
    shown = url.render_as_string(hide_password=True)
    if url.get_backend_name() == "sqlite":
        path = Path(url.database or "")
        if not path.exists():
            writable = _writable(path.parent)
            detail = f"{shown}: created at the first start" if writable else f"{path.parent} is not writable"
            return Check("database", writable, detail)
    return _guarded("database", lambda: _database_revision(settings, shown))


def _database_revision(settings: PlatformSettings, shown: str) -> Check:
    from tokenmill.platform.db import open_database
    from tokenmill.platform.migrate import current_revision, head_revision

    db = open_database(settings.resolved_database_url)
    try:
        current = current_revision(db)
    finally:
        db.close()
    head = head_revision()
    state = "up to date" if current == head else f"schema {current or 'empty'}, upgraded to {head} at start"
    return Check("database", True, f"{shown}: {state}")


def _redis(url: str | None) -> Check:
    if not url:
        return Check("redis", True, "not used: rate limits are counted in this process (one gateway)")

    def ping() -> Check:
        import redis

        client = redis.Redis.from_url(url, socket_connect_timeout=3)
        try:
            client.ping()
        finally:
            client.close()
        return Check("redis", True, f"{url}: reachable, rate limits shared by every gateway using it")

    return _guarded("redis", ping)


def _writable(directory: Path) -> bool:
    """Whether `serve` could create `directory` (or write into it)."""
    while not directory.exists():
        directory = directory.parent
    return directory.is_dir() and os.access(directory, os.W_OK)


def _gib(num_bytes: float) -> str:
    return f"{num_bytes / 2**30:.2f} GiB" if num_bytes >= 2**30 else f"{num_bytes / 2**20:.0f} MiB"
