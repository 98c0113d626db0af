"""`tokenmill serve` and `tokenmill doctor` (which takes serve's flags): their flags, and from parsed flags to
the settings and the one call that serves (or checks). `cli.py` lists them beside the other commands."""

from __future__ import annotations

import argparse
import re
import socket
from pathlib import Path
from typing import TYPE_CHECKING

from tokenmill.catalog.router import ROUTINGS
from tokenmill.config import (
    BatchBudget,
    ConfigError,
    default_data_dir,
    default_database_url,
    default_redis_url,
)
from tokenmill.platform.errors import InvalidAmount
from tokenmill.platform.listings import DEFAULT_PLATFORM_FEE_BPS
from tokenmill.platform.money import format_micros, parse_units
from tokenmill.serving.fleet_setup import DEFAULT_MAX_QUEUE
from tokenmill.serving.settings import SIGNUP_MODES, CompletionLimits, LoraSpec, ModelSpec, ServerSettings
from tokenmill.serving.tidal import TidalSettings

if TYPE_CHECKING:
    from tokenmill.platform.gateway import PlatformSettings

DEFAULT_CHAT_MODEL = "smollm2"
DEFAULT_EMBEDDING_MODEL = "all-MiniLM-L6-v2"
# Flags passed through to AsyncLLM as keyword arguments (config.EngineConfig.from_kwargs owns them).
ENGINE_FLAGS = (
    "dtype",
    "max_model_len",
    "block_size",
    "kv_cache_memory",
    "max_num_seqs",
    "max_num_batched_tokens",
    "target_tpot_ms",
    "device",
    "seed",
    "max_loras",
    "max_lora_rank",
    "quantization",
    "chat_template",
)
_SIZE = re.compile(r"^(\d+)\s*([kmgt]?)(i?b?)$", re.IGNORECASE)


def byte_size(text: str) -> int:
    """ "1048576", "512M", "2GiB" -> bytes (powers of 1024)."""
    match = _SIZE.match(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 4096, 512M or 2G")
    return int(match.group(1)) * 1024 ** " kmgt".index(match.group(2).lower() or " ")


def _default_max_tokens(text: str) -> int | None:
    if text == "openai":
        return None
    if not text.isascii() or not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a positive integer nor 'openai'")
    return int(text)


def _fee_bps(text: str) -> int:
    if not text.isascii() or not text.isdigit() or not 0 <= int(text) <= 10_000:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer from 0 to 10000")
    return int(text)


def model_spec(text: str) -> ModelSpec:
    try:
        return ModelSpec.parse(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def lora_spec(text: str) -> LoraSpec:
    try:
        return LoraSpec.parse(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _price(text: str) -> int:
    try:
        return parse_units(text, "price", allow_zero=True)
    except InvalidAmount as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _specs(values: list[ModelSpec] | None, default: str) -> list[ModelSpec]:
    """Absent flag: the built-in default; `none`: no model of that kind."""
    return [s for s in (values or [ModelSpec(default)]) if s.source != "none"]


# -- serve -----------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = ServerSettings()
    parser.add_argument(
        "--config",
        type=Path,
        metavar="MODELS.YAML",
        help="the models to serve and their listings (see examples/models.yaml); instead of --model and "
        "--embedding-model",
    )
    parser.add_argument(
        "--replicas",
        type=int,
        default=1,
        metavar="N",
        help="engines per --model chat model, each in a worker process, behind one router (default: 1; "
        "models.yaml sets it per model)",
    )
    parser.add_argument(
        "--routing",
        choices=ROUTINGS,
        default="prefix",
        help="how a request picks among a model's replicas: 'prefix' (default) sends it where its prompt's "
        "prefix was recently served (a warm prefix cache) unless it would queue there, else the least "
        "loaded; 'least-load' always the least loaded; 'session' keeps the requests of one `user` on one "
        "replica (the others by prefix)",
    )
    parser.add_argument(
        "--workers",
        action="store_true",
        help="run every chat model's engine in a worker process of its own, not in the server's process "
        "(always so for a model with more than one replica)",
    )
    parser.add_argument(
        "--ray-address",
        metavar="auto|HOST:PORT",
        help="run every chat model's replicas as Ray actors on this Ray cluster (pip install "
        "'tokenmill[ray]'; the server runs on one of its nodes): 'auto' joins the cluster `ray start` began "
        "on this machine; models.yaml's resources: says what each replica asks of a node",
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        default=DEFAULT_MAX_QUEUE,
        metavar="N",
        help="requests that may wait per replica of a chat model once --max-num-seqs run; more get 503 at "
        f"once (default: {DEFAULT_MAX_QUEUE}; models.yaml may set it per model)",
    )
    parser.add_argument(
        "--memory-budget",
        type=byte_size,
        metavar="SIZE",
        help="memory all chat models together may use (weights + KV cache), e.g. 6G; idle models are "
        "unloaded to make room (default: 80%% of the memory free at start)",
    )
    parser.add_argument(
        "--model",
        action="append",
        type=model_spec,
        metavar="[ID=]PATH",
        help=f"chat/completion model: HF directory, .gguf file or built-in name; repeatable "
        f"(default: {DEFAULT_CHAT_MODEL}; 'none' for no chat model)",
    )
    parser.add_argument(
        "--embedding-model",
        action="append",
        type=model_spec,
        metavar="[ID=]PATH",
        help=f"embedding model: sentence-transformers directory or built-in name; repeatable "
        f"(default: {DEFAULT_EMBEDDING_MODEL}; 'none' for no embedding model)",
    )
    parser.add_argument(
        "--lora",
        action="append",
        type=lora_spec,
        default=[],
        metavar="NAME=PATH[@BASE]",
        help="serve a PEFT LoRA adapter directory as the model NAME on the chat model BASE (default: the only "
        "chat model); repeatable: requests for all adapters and the base share each batch",
    )
    parser.add_argument("--host", default=defaults.host, help=f"default: {defaults.host}")
    parser.add_argument("--port", type=int, default=defaults.port, help=f"default: {defaults.port}")
    parser.add_argument(
        "--max-body-bytes",
        type=byte_size,
        default=defaults.max_body_bytes,
        help="larger request bodies get 413 (default: 8M)",
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    limits = CompletionLimits()
    parser.add_argument(
        "--default-max-tokens",
        type=_default_max_tokens,
        default=limits.default_max_tokens,
        metavar="N|openai",
        help=f"completion length when a request sets no max_tokens (default: {limits.default_max_tokens}); "
        "'openai': chat runs until the context window is full, completions stop at 16",
    )
    parser.add_argument(
        "--max-completion-tokens",
        type=int,
        metavar="N",
        help="the most tokens a request may ask for (default: the context window)",
    )
    platform = parser.add_argument_group("accounts, billing and rate limits")
    platform.add_argument(
        "--data-dir",
        type=Path,
        default=default_data_dir(),
        help="the SQLite database and the admin key file (default: $TOKENMILL_DATA_DIR or ~/.tokenmill)",
    )
    platform.add_argument(
        "--database-url",
        default=default_database_url(),
        help="e.g. postgresql://user@host/db (default: $TOKENMILL_DATABASE_URL or SQLite in --data-dir)",
    )
    platform.add_argument(
        "--redis-url",
        default=default_redis_url(),
        help="share rate limits between gateways through Redis (default: $TOKENMILL_REDIS_URL or in-process)",
    )
    platform.add_argument(
        "--gateway-id",
        help="this gateway's name on its reservations; keep it stable across restarts (default: HOST:PORT)",
    )
    platform.add_argument(
        "--platform-fee-bps",
        type=_fee_bps,
        default=DEFAULT_PLATFORM_FEE_BPS,
        metavar="N",
        help="the platform's share of each sale of a provider's model, in basis points "
        f"(default: {DEFAULT_PLATFORM_FEE_BPS} = {DEFAULT_PLATFORM_FEE_BPS / 100:g}%%; a listing may set its own)",
    )
    platform.add_argument(
        "--signup",
        choices=SIGNUP_MODES,
        default=defaults.signup,
        help=f"who may sign up in the web console (default: {defaults.signup}; invite codes: tokenmill admin "
        "create-invite)",
    )
    platform.add_argument(
        "--fine-tuning-workers",
        type=int,
        default=defaults.fine_tuning_workers,
        metavar="N",
        help=f"trainer worker processes this server runs (default: {defaults.fine_tuning_workers}; 0: none, "
        "jobs then wait for a `tokenmill worker` sharing the database)",
    )
    platform.add_argument(
        "--fine-tuning-price",
        type=_price,
        default=defaults.fine_tuning_price_micros,
        metavar="PRICE",
        help="the price of 1M trained tokens, in currency units "
        f"(default: {format_micros(defaults.fine_tuning_price_micros)})",
    )
    platform.add_argument(
        "--max-file-size",
        type=byte_size,
        default=defaults.max_file_bytes,
        metavar="SIZE",
        help="the largest file one upload to /v1/files may store (default: 512M)",
    )
    platform.add_argument(
        "--org-storage-quota",
        type=byte_size,
        default=defaults.max_org_file_bytes,
        metavar="SIZE",
        help="all the files of one organization together (default: 10G)",
    )
    platform.add_argument(
        "--data-sweep-interval",
        type=int,
        default=defaults.data_sweep_interval_s,
        metavar="SECONDS",
        help="how often files past their expiry or their organization's retention are deleted "
        f"(default: {defaults.data_sweep_interval_s}; 0: never, use tokenmill admin sweep-data)",
    )
    platform.add_argument(
        "--no-auth",
        action="store_true",
        help="private single-user deployment: no API keys, no billing, no rate limits",
    )
    tidal = parser.add_argument_group("batches and tidal scheduling")
    tide = defaults.tidal
    tidal.add_argument(
        "--batch-discount-bps",
        type=int,
        default=tide.batch_discount_bps,
        metavar="N",
        help=f"batch lines pay the model's prices less N basis points (default: {tide.batch_discount_bps})",
    )
    tidal.add_argument(
        "--batch-lines-in-flight",
        type=int,
        default=tide.batch_lines_in_flight,
        metavar="N",
        help=f"batch lines each model works on at once (default: {tide.batch_lines_in_flight})",
    )
    tidal.add_argument(
        "--batch-max-slowdown",
        type=float,
        default=tide.batch_budget.max_slowdown,
        metavar="F",
        help="batch work may make an engine step serving live requests at most F slower, by the engine's "
        f"measured step costs (default: {tide.batch_budget.max_slowdown}; 0: batch work pauses while live "
        "work runs)",
    )
    tidal.add_argument(
        "--batch-fill-tokens",
        type=int,
        default=tide.batch_budget.fill_tokens,
        metavar="N",
        help=f"and adds at most N tokens to it (default: {tide.batch_budget.fill_tokens})",
    )
    tidal.add_argument(
        "--batch-idle-tokens",
        type=int,
        default=tide.batch_budget.idle_tokens,
        metavar="N",
        help=f"the most batch tokens in a step without live work (default: {tide.batch_budget.idle_tokens})",
    )
    tidal.add_argument(
        "--off-peak",
        metavar="HH:MM-HH:MM",
        help="a daily window in which batch work may take more of the machine",
    )
    tidal.add_argument("--timezone", default=tide.timezone, help="of --off-peak (default: UTC)")
    tidal.add_argument(
        "--off-peak-batch-lines-in-flight", type=int, default=tide.off_peak_batch_lines_in_flight, metavar="N"
    )
    tidal.add_argument(
        "--off-peak-batch-fill-tokens", type=int, default=tide.off_peak_batch_budget.fill_tokens, metavar="N"
    )
    tidal.add_argument(
        "--off-peak-batch-max-slowdown",
        type=float,
        default=tide.off_peak_batch_budget.max_slowdown,
        metavar="F",
    )
    tidal.add_argument(
        "--off-peak-batch-idle-tokens", type=int, default=tide.off_peak_batch_budget.idle_tokens, metavar="N"
    )
    tidal.add_argument(
        "--off-peak-live-discount-bps",
        type=int,
        default=tide.off_peak_live_discount_bps,
        metavar="N",
        help="off peak, live requests pay the model's prices less N basis points (default: 0)",
    )
    engine = parser.add_argument_group("engine (each chat model)")
    engine.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    engine.add_argument(
        "--quantization", choices=["none", "int8"], help="int8: weight-only int8 at load (faster decode)"
    )
    engine.add_argument("--max-model-len", type=int, help="context window (default: the model's)")
    engine.add_argument(
        "--chat-template",
        metavar="TEXT|FILE",
        help="a Jinja chat template for a base model that has none (or to replace the model's own)",
    )
    engine.add_argument("--block-size", type=int, help="tokens per KV block")
    engine.add_argument("--kv-cache-memory", type=byte_size, help="bytes for the KV cache, e.g. 2G")
    engine.add_argument("--max-num-seqs", type=int, help="sequences running at once")
    engine.add_argument("--max-num-batched-tokens", type=int, help="token budget of one forward pass")
    engine.add_argument(
        "--target-tpot-ms",
        type=float,
        metavar="MS",
        help="keep decoding streams at MS per token on average by computing prompts beside them at that pace "
        "(default: 0, throughput mode: every step fills the token budget)",
    )
    engine.add_argument("--device", help="auto, cpu or cuda[:N]")
    engine.add_argument("--seed", type=int, help="seed for requests that bring none")
    engine.add_argument("--max-loras", type=int, help="LoRA adapters loaded at once per engine (default: 8)")
    engine.add_argument("--max-lora-rank", type=int, help="the largest adapter rank served (default: 64)")


def platform_settings(args: argparse.Namespace) -> PlatformSettings:
    from tokenmill.platform.gateway import PlatformSettings

    return PlatformSettings(
        data_dir=args.data_dir,
        database_url=args.database_url,
        redis_url=args.redis_url,
        gateway_id=args.gateway_id or f"{socket.gethostname()}:{args.port}",
        platform_fee_bps=args.platform_fee_bps,
    )


def engine_kwargs(args: argparse.Namespace) -> dict[str, object]:
    return {flag: getattr(args, flag) for flag in ENGINE_FLAGS if getattr(args, flag, None) is not None}


def _batch_budget(args: argparse.Namespace, prefix: str) -> BatchBudget:
    """`--{prefix}-max-slowdown`, `--{prefix}-fill-tokens` and `--{prefix}-idle-tokens` as one budget."""
    return BatchBudget(
        **{name: getattr(args, f"{prefix}_{name}") for name in ("max_slowdown", "fill_tokens", "idle_tokens")}
    )


def run(args: argparse.Namespace) -> int:
    from tokenmill.serving.server import serve  # fastapi/uvicorn/torch: not needed for --help

    settings = ServerSettings(
        host=args.host,
        port=args.port,
        max_body_bytes=args.max_body_bytes,
        no_auth=args.no_auth,
        signup=args.signup,
        max_file_bytes=args.max_file_size,
        max_org_file_bytes=args.org_storage_quota,
        data_sweep_interval_s=args.data_sweep_interval,
        fine_tuning_price_micros=args.fine_tuning_price,
        fine_tuning_workers=args.fine_tuning_workers,
        tidal=TidalSettings(
            batch_discount_bps=args.batch_discount_bps,
            batch_lines_in_flight=args.batch_lines_in_flight,
            batch_budget=_batch_budget(args, "batch"),
            off_peak=args.off_peak,
            timezone=args.timezone,
            off_peak_batch_lines_in_flight=args.off_peak_batch_lines_in_flight,
            off_peak_batch_budget=_batch_budget(args, "off_peak_batch"),
            off_peak_live_discount_bps=args.off_peak_live_discount_bps,
        ),
        completion_limits=CompletionLimits(args.default_max_tokens, args.max_completion_tokens),
    )
    if args.replicas < 1:
        raise ConfigError("replicas: must be at least 1")
    if args.config is not None and (args.model or args.embedding_model):
        raise ConfigError("config: give the models either in --config or with --model flags, not both")
    from_flags = args.config is None
    serve(
        settings,
        platform_settings(args),
        _specs(args.model, DEFAULT_CHAT_MODEL) if from_flags else [],
        _specs(args.embedding_model, DEFAULT_EMBEDDING_MODEL) if from_flags else [],
        engine_kwargs(args),
        loras=args.lora,
        config=args.config,
        memory_budget_bytes=args.memory_budget,
        max_queue=args.max_queue,
        workers=args.workers,
        replicas=args.replicas,
        routing=args.routing,
        ray_address=args.ray_address,
        log_level=args.log_level,
    )
    return 0


def run_doctor_command(args: argparse.Namespace) -> int:
    from tokenmill.terminal.doctor import run_doctor

    chat = _specs(args.model, DEFAULT_CHAT_MODEL)
    embedding = _specs(args.embedding_model, DEFAULT_EMBEDDING_MODEL)
    if args.config is not None:  # the file's models (each checked with the server's engine flags)
        from tokenmill.catalog.deployments import load_deployments

        deployments = load_deployments(args.config).models
        chat = [ModelSpec(d.source, d.id) for d in deployments if d.task == "chat"]
        embedding = [ModelSpec(d.source, d.id) for d in deployments if d.task == "embedding"]
    return run_doctor(platform_settings(args), chat, embedding, engine_kwargs(args), no_auth=args.no_auth)
